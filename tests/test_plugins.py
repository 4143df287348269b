"""Plugins: the example package loaded from outside (file path, dotted name, entry
point), bad plugins and their messages, the registry unchanged after a failure, and
the commands (list, check-module, profile, run, report) with ``--plugin``."""
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnbench.plugins import loader as plugins
from attnbench.cli import main
from attnbench.modules import build_model
from attnbench.modules.registry import REGISTRY, RegistrationError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "attnbench-coordatt"
COORDATT = EXAMPLE / "attnbench_coordatt" / "coordatt.py"


def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


pytestmark = pytest.mark.usefixtures("clean_plugins")


def write(tmp_path, name, body):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return path


def forward_ok(name, **opts):
    model = build_model("resnet18", name, num_classes=10, **opts).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 80))
    assert y.shape == (1, 10)
    return model


# ----------------------------------------------------------------------------- ways in
def test_example_by_file_path():
    assert "coordatt" not in REGISTRY
    plugins.load_all([str(COORDATT)])
    spec = REGISTRY.get("coordatt")
    assert spec.kind == "gate" and spec.defaults == {"reduction": 32, "min_channels": 8}
    assert spec.source == f"plugin {COORDATT}"
    assert plugins.loaded_plugins() == [str(COORDATT)]
    assert plugins.plugin_names() == {str(COORDATT): ["coordatt"]}
    model = forward_ok("coordatt", reduction=16)
    assert any(type(m).__name__ == "CoordAtt" for m in model.modules())


def test_loading_twice_is_a_no_op_and_paths_are_absolute(monkeypatch):
    monkeypatch.chdir(EXAMPLE)
    first = plugins.load_plugin("attnbench_coordatt/coordatt.py")
    second = plugins.load_all([str(COORDATT), "./attnbench_coordatt/coordatt.py"])
    assert second == [first, first]  # no second import, so no clash with itself
    assert plugins.loaded_plugins() == [str(COORDATT)]


def test_example_by_dotted_name(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    plugins.load_all(["attnbench_coordatt.coordatt"])
    assert REGISTRY.get("coordatt").source == "plugin attnbench_coordatt.coordatt"
    assert plugins.loaded_plugins() == ["attnbench_coordatt.coordatt"]
    forward_ok("coordatt")


def test_file_of_an_already_imported_plugin_is_not_imported_again(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    module = plugins.load_plugin("attnbench_coordatt.coordatt")  # as an entry point would
    assert plugins.load_plugin(str(COORDATT)) is module  # no clash with itself
    assert plugins.loaded_plugins() == ["attnbench_coordatt.coordatt", str(COORDATT)]


def test_same_file_name_in_two_folders(tmp_path):
    body = """
        from torch import nn
        from attnbench.modules.registry import register
        @register("{name}", "gate")
        class G(nn.Identity):
            def __init__(self, channels):
                super().__init__()
    """
    a = write(tmp_path, "a/attn.py", body.format(name="attn-a"))
    b = write(tmp_path, "b/attn.py", body.format(name="attn-b"))
    plugins.load_all([str(a), str(b)])
    assert "attn-a" in REGISTRY and "attn-b" in REGISTRY
    assert REGISTRY.get("attn-a").factory is not REGISTRY.get("attn-b").factory


def _entry_point(name, value):
    return importlib.metadata.EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP)


def test_entry_point_monkeypatched(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    calls = []

    def fake_entry_points(**kw):
        calls.append(kw)
        return [_entry_point("coordatt", "attnbench_coordatt.coordatt")] \
            if kw.get("group") == "attnbench.modules" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(plugins, "_entry_points", _real_entry_points)
    assert plugins.load_all([]) == []
    assert "coordatt" in REGISTRY
    assert calls == [{"group": "attnbench.modules"}]
    assert plugins.loaded_plugins() == []  # entry points need not be passed to workers
    assert plugins.load_entry_points() == []  # once per process
    assert len(calls) == 1
    forward_ok("coordatt")


def _real_entry_points():
    from importlib import metadata
    return list(metadata.entry_points(group=plugins.ENTRY_POINT_GROUP))


def test_entry_point_found_in_installed_metadata(tmp_path, monkeypatch):
    """A real lookup: a *.dist-info with entry_points.txt on sys.path, as pip leaves it."""
    dist = tmp_path / "attnbench_coordatt-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: attnbench-coordatt\n"
                                   "Version: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[attnbench.modules]\ncoordatt = attnbench_coordatt.coordatt\n")
    shutil.copytree(EXAMPLE / "attnbench_coordatt", tmp_path / "attnbench_coordatt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points", _real_entry_points)
    assert plugins.load_entry_points() == ["coordatt"]
    spec = REGISTRY.get("coordatt")
    assert spec.source == "plugin attnbench_coordatt.coordatt (attnbench-coordatt)"
    forward_ok("coordatt")


def test_broken_entry_point_warns_rolls_back_and_spares_the_rest(tmp_path, monkeypatch):
    write(tmp_path, "brokenplug.py", """
        from torch import nn
        from attnbench.modules.registry import register
        @register("halfway", "gate")
        class G(nn.Identity):
            def __init__(self, channels):
                super().__init__()
        raise RuntimeError("plugin exploded")
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    eps = [_entry_point("broken", "brokenplug"),
           _entry_point("coordatt", "attnbench_coordatt.coordatt")]
    monkeypatch.setattr(plugins, "_entry_points", lambda: eps)
    before = set(REGISTRY.names())
    with pytest.warns(RuntimeWarning, match="skipped a broken plugin"):
        assert plugins.load_entry_points() == ["coordatt"]
    assert set(REGISTRY.names()) == before | {"coordatt"}  # no 'halfway'
    (err,) = plugins.entry_point_errors()
    assert "entry point 'broken' = 'brokenplug'" in err
    assert "brokenplug.py, line 8" in err and "RuntimeError: plugin exploded" in err
    with pytest.raises(plugins.PluginError, match="plugin exploded"):
        plugins.load_entry_points(strict=True, force=True)


# ----------------------------------------------------------------------------- bad plugins
def _load_bad(tmp_path, body, name="bad.py"):
    path = write(tmp_path, name, body)
    before = REGISTRY.snapshot()
    loaded = plugins.loaded_plugins()
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_all([str(path)])
    assert REGISTRY.snapshot() == before, "a failed plugin must leave the registry as it was"
    assert plugins.loaded_plugins() == loaded
    return path, info.value


def test_import_error_names_file_line_and_cause(tmp_path):
    path, err = _load_bad(tmp_path, """
        import torch
        import not_a_real_package_xyz
    """)
    assert str(err).startswith(f"{path} failed to load ({path}, line 3): ModuleNotFoundError: "
                               f"No module named 'not_a_real_package_xyz'")
    assert isinstance(err.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize("in_checkout", [True, False], ids=["checkout", "elsewhere"])
@pytest.mark.parametrize("line, old, new", [
    ("from modules.registry import register", "modules", "attnbench.modules"),
    ("import modules", "modules", "attnbench.modules"),
    ("from bench.report import build", "bench", "attnbench"),
])
def test_old_top_level_import_names_the_new_one(tmp_path, monkeypatch, in_checkout, line, old,
                                                new):
    """A plugin written for the old names: from a checkout the folders refuse to be imported
    by them; elsewhere the names do not exist. Either way the message says what to write."""
    if in_checkout:
        monkeypatch.syspath_prepend(str(ROOT))
    else:
        monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])
    path, err = _load_bad(tmp_path, f"""
        from torch import nn
        {line}
    """)
    assert str(err).startswith(f"{path} failed to load ({path}, line 3): ")
    assert f"it imports '{old}', the old top-level name of '{new}'" in str(err)
    assert "`from attnbench import register`" in str(err)
    assert isinstance(err.__cause__, ImportError)
    assert (type(err.__cause__) is ModuleNotFoundError) is not in_checkout
    assert old not in sys.modules


def test_cli_old_top_level_import_exits_2_naming_the_new_one(tmp_path, capsys):
    old = write(tmp_path, "oldgate.py", """
        from torch import nn
        from modules.registry import register

        @register("oldgate", "gate")
        class G(nn.Identity):
            def __init__(self, channels):
                super().__init__()
    """)
    assert main(["list", "--plugin", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnbench: error: {old} failed to load ({old}, line 3): ")
    assert "`from attnbench import register`" in err
    assert "oldgate" not in REGISTRY


def test_error_after_registering_rolls_back_every_name(tmp_path):
    path, err = _load_bad(tmp_path, """
        from torch import nn
        from attnbench.modules.registry import register

        @register("first-ok", "gate")
        class A(nn.Identity):
            def __init__(self, channels):
                super().__init__()

        @register("se", "gate", replace=True)     # even a deliberate override is undone
        class B(nn.Identity):
            def __init__(self, channels):
                super().__init__()

        1 / 0
    """)
    assert f"({path}, line 15): ZeroDivisionError" in str(err)
    assert "first-ok" not in REGISTRY
    assert REGISTRY.get("se").source == "builtin"
    forward_ok("se")


def test_syntax_error(tmp_path):
    path, err = _load_bad(tmp_path, "def broken(:\n    pass\n")
    assert f"({path}, line 1): SyntaxError" in str(err)


def test_name_clash_with_builtin_is_refused(tmp_path):
    path, err = _load_bad(tmp_path, """
        from torch import nn
        from attnbench.modules.registry import register

        @register("se", "gate", defaults={"reduction": 16})
        class MySE(nn.Identity):
            def __init__(self, channels, reduction=16):
                super().__init__()
    """)
    assert f"({path}, line 5): RegistrationError: module name 'se' is already registered " \
           f"(by builtin); choose another name, or pass replace=True to override it on " \
           f"purpose" in str(err)
    assert isinstance(err.__cause__, RegistrationError)
    assert REGISTRY.get("se").factory.__name__ == "SEGate"


def test_replace_true_overrides_a_builtin_on_purpose(tmp_path):
    path = write(tmp_path, "myse.py", """
        from torch import nn
        from attnbench.modules.registry import register

        @register("se", "gate", defaults={"reduction": 16}, replace=True)
        class MySE(nn.Identity):
            def __init__(self, channels, reduction=16):
                super().__init__()
    """)
    plugins.load_all([str(path)])
    spec = REGISTRY.get("se")
    assert spec.factory.__name__ == "MySE" and spec.source == f"plugin {path}"
    assert plugins.plugin_names() == {str(path): ["se"]}


def test_clash_between_two_plugins_names_the_first(tmp_path):
    plugins.load_all([str(COORDATT)])
    path, err = _load_bad(tmp_path, """
        from torch import nn
        from attnbench.modules.registry import register
        @register("coordatt", "gate")
        class Mine(nn.Identity):
            def __init__(self, channels):
                super().__init__()
    """)
    assert f"'coordatt' is already registered (by plugin {COORDATT})" in str(err)


@pytest.mark.parametrize("decl, message", [
    ('@register("nochan", "gate")\ndef make():\n    return None',
     "module 'nochan': a gate factory must take the 'channels' argument first, as "
     "factory(channels, **options); got signature ()"),
    ('@register("noopt", "gate", defaults={"reduction": 16})\n'
     'def make(channels):\n    return None',
     "module 'noopt': factory signature (channels) does not accept the default option(s) "
     "reduction"),
    ('@register("badkind", "gat")\ndef make(channels):\n    return None',
     "module 'badkind': kind 'gat' is not one of gate, conv, block, network, head"),
    ('@register("Bad Name", "gate")\ndef make(channels):\n    return None',
     "module name 'Bad Name' must be short, lowercase"),
])
def test_bad_registration_messages(tmp_path, decl, message):
    _, err = _load_bad(tmp_path, "from attnbench.modules.registry import register\n" + decl + "\n")
    assert "RegistrationError: " + message in str(err)


def test_missing_file_and_unknown_module():
    with pytest.raises(plugins.PluginError, match=r"plugin file 'nowhere/attn\.py' not found "
                                                  r"\(looked for .*nowhere/attn\.py\)"):
        plugins.load_all(["nowhere/attn.py"])
    with pytest.raises(plugins.PluginError, match="plugin 'no_such_pkg.attn': no module named "
                                                  "'no_such_pkg'"):
        plugins.load_all(["no_such_pkg.attn"])
    with pytest.raises(plugins.PluginError, match="neither an existing .py file"):
        plugins.load_all(["not a module"])


def test_error_inside_a_dotted_module_names_its_file(tmp_path, monkeypatch):
    path = write(tmp_path, "brokenplug2.py", "x = 1\nraise ValueError('bad value')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_all(["brokenplug2"])
    assert f"brokenplug2 failed to load ({path}, line 2): ValueError: bad value" in str(info.value)
    sys.modules.pop("brokenplug2", None)


def test_a_failed_plugin_keeps_the_ones_before(tmp_path):
    bad = write(tmp_path, "bad.py", "raise ImportError('nope')\n")
    with pytest.raises(plugins.PluginError):
        plugins.load_all([str(COORDATT), str(bad)])
    assert "coordatt" in REGISTRY
    assert plugins.loaded_plugins() == [str(COORDATT)]


# ----------------------------------------------------------------------------- commands
def test_cli_bad_plugin_exits_2_with_message(tmp_path, capsys):
    bad = write(tmp_path, "bad.py", "import not_a_real_package_xyz\n")
    assert main(["list", "--plugin", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnbench: error: {bad} failed to load ({bad}, line 1): "
                          f"ModuleNotFoundError")


def test_cli_plugin_before_the_subcommand(capsys):
    assert main(["--plugin", str(COORDATT), "list"]) == 0
    assert "coordatt" in capsys.readouterr().out


def test_cli_plugins_before_and_after_the_subcommand_both_load(tmp_path, capsys):
    other = write(tmp_path, "other_gate.py",
                  "from torch import nn\nfrom attnbench.modules.registry import register\n"
                  "@register('othergate', 'gate')\nclass G(nn.Identity):\n"
                  "    def __init__(self, channels):\n        super().__init__()\n")
    assert main(["--plugin", str(COORDATT), "list", "--plugin", str(other)]) == 0
    out = capsys.readouterr().out
    assert "coordatt" in out and "othergate" in out


def test_cli_list_shows_the_plugin(capsys):
    assert main(["list", "--plugin", str(COORDATT)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("coordatt"))
    assert "gate" in line and str(COORDATT) in line


def test_cli_check_module_with_plugin(capsys):
    code = main(["check-module", "coordatt", "--plugin", str(COORDATT), "--resolutions", "64",
                 "--no-flops", "--option", "reduction=16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reduction=16" in out and "-- conforms" in out


def _command_missing(module):
    return not _has_module(module)


@pytest.mark.skipif(_command_missing("attnbench.cli.profile"),
                    reason="attnbench profile (bench/cmd_profile.py) is not written yet")
def test_cli_profile_with_plugin(capsys):
    code = main(["profile", "resnet18", "coordatt", "--plugin", str(COORDATT),
                 "--option", "reduction=16", "--num-classes", "10", "--resolution", "64",
                 "--batch", "1", "--mode", "eval", "--repeats", "1", "--warmup", "0",
                 "--no-memory"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resnet18 + coordatt" in out
    attention = build_model("resnet18", "coordatt", num_classes=10, reduction=16)
    plain = build_model("resnet18", num_classes=10)
    extra = sum(p.numel() for p in attention.parameters()) - \
        sum(p.numel() for p in plain.parameters())
    line = next(ln for ln in out.splitlines() if ln.startswith("attention params"))
    assert str(extra) in line.replace(",", "")


TINY = """
name = "plug"
device = "cpu"
backbones = ["resnet18"]
num_classes = 10
threads = 1
baseline = true

[timing]
warmup = 0
repeats = 1
timeout_s = 300

[[modules]]
name = "coordatt"
options = {reduction = 16}

[[sweeps]]
metrics = ["params"]
resolutions = [64]
batches = [1]
modes = ["eval"]
"""


@pytest.mark.skipif(_command_missing("attnbench.matrix.runner"),
                    reason="attnbench run (bench/runner.py) is not written yet")
def test_cli_run_one_cell_matrix_and_report(tmp_path, capsys):
    cfg = tmp_path / "plug.toml"
    cfg.write_text(TINY)
    results = tmp_path / "results"
    # the config names a plugin module: without --plugin it is unknown
    assert main(["run", str(cfg), "--results", str(results), "--no-progress"]) == 2
    assert "coordatt" in capsys.readouterr().err
    code = main(["run", "--plugin", str(COORDATT), str(cfg), "--results", str(results),
                 "--run-id", "plug", "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    import json
    rows = [json.loads(ln) for ln in (results / "plug" / "rows.jsonl").read_text().splitlines()]
    mine = [r for r in rows if r["module"] == "coordatt" and r["metric"] == "params"]
    assert mine and mine[0]["status"] == "ok", rows  # measured in a worker process
    assert mine[0]["value"] == sum(p.numel() for p in
                                   build_model("resnet18", "coordatt", num_classes=10,
                                               reduction=16).parameters())
    if _command_missing("attnbench.report.build"):
        pytest.skip("attnbench report (bench/report.py) is not written yet")
    code = main(["report", "--results", str(results), "--out", str(tmp_path / "reports"),
                 "--run", "plug"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    text = "".join(p.read_text() for p in (tmp_path / "reports").rglob("*.md"))
    assert "coordatt" in text.lower()


@pytest.mark.slow
@pytest.mark.skipif(not _has_module("setuptools"), reason="needs setuptools to build the example")
def test_pip_installed_example_is_found_by_entry_point(tmp_path):
    """The example's pyproject.toml, built and installed (into a folder, not the venv)."""
    target = tmp_path / "site"
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                   "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(source)],
                   check=True, cwd=tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    out = subprocess.run([sys.executable, "-m", "attnbench", "list"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("coordatt"))
    assert "attnbench-coordatt" in line


@pytest.mark.parametrize("kind", ["file", "module"])
def test_a_plugin_that_registers_nothing_is_an_error(tmp_path, kind, capsys):
    spec = str(write(tmp_path, "nothing.py", "x = 1\n")) if kind == "file" else "os"
    before = REGISTRY.snapshot()
    with pytest.raises(plugins.PluginError, match="registered no attention module"):
        plugins.load_plugin(spec)
    assert REGISTRY.snapshot() == before and plugins.loaded_plugins() == []
    assert main(["list", "--plugin", spec]) == 2
    assert "registered no attention module" in capsys.readouterr().err
