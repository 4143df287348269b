"""Matrix configs: validation messages, expansion counts, stable cell ids, filters."""
from __future__ import annotations

import pytest

from attnbench import modules
from attnbench.matrix.config import (ConfigError, expand, load_config, parse_config,
                                     resolve_path, units)
from attnbench.results import Cell, cell_id

SWEEP = list(range(168, 449, 28))

BASE = """
backbones = ["resnet18"]
[[modules]]
name = "se"
"""


def parse(text, name="x.toml"):
    from pathlib import Path
    return parse_config(text, Path(name))


def err(text):
    with pytest.raises(ConfigError) as info:
        parse(text)
    msg = str(info.value)
    assert msg.startswith("x.toml: "), msg
    return msg


def test_builtin_configs_validate_and_resolve():
    for name in ("default", "paper", "tiny"):
        cfg = load_config(name)
        assert cfg.path == resolve_path(name) and cfg.path.name == f"{name}.toml"
        assert cfg.name == name and expand(cfg)


def test_tiny_counts():
    cfg = load_config("tiny")
    assert [e.label for e in cfg.modules] == ["none", "SE", "ECA"]
    cells = expand(cfg)
    # 3 models x 2 resolutions x (params, flops, latency) + memory at 64 px
    assert len(cells) == 3 * 2 * 3 + 3
    assert len(units(cells)) == 6 + 6 + 2 + 3
    assert {c.num_classes for c in cells} == {10}
    assert all(isinstance(c, Cell) for c in cells)
    # ids are stable across versions: resumed runs and committed results rely on them
    assert (cells[0].id, cells[0].module, cells[0].resolution) == ("67d09ec6a1a1", "none", 64)


def test_default_covers_every_module_metric_and_the_sweep():
    cfg = load_config("default")
    cells = expand(cfg)
    assert set(modules.REGISTRY.names()) <= {c.module for c in cells}
    labels = {c.label for c in cells}
    assert {"TDjoint(T=2,m=1)", "TDtop(T=2,m=1)", "TDtop(T=2,m=3)", "AW", "AW-SE",
            "SE", "CBAM", "ECA", "none"} <= labels
    assert {c.metrics[0] for c in cells} == {"params", "flops", "latency", "memory"}
    # FLOPs over the whole sweep; memory and latency at four of its points (the ~10 min budget)
    four = (168, 224, 336, 448)
    for metric, points in (("flops", SWEEP), ("memory", four), ("latency", four)):
        for label in labels:
            res = {c.resolution for c in cells
                   if c.metrics == (metric,) and c.label == label}
            assert set(points) <= res, (metric, label)
    timed = [c for c in cells if c.metrics == ("latency",)]
    assert {c.ci_target for c in timed} == {0.015} and all(c.group for c in timed)
    assert all(c.block_rounds and c.block_rounds >= 3 for c in timed)   # blocked intervals
    assert {c.mode for c in timed if c.resolution == 224 and c.batch == 1} == {"eval", "train"}
    assert {c.backbone for c in cells} == {"resnet50"} and cfg.device == "cpu"
    aw_se = next(c for c in cells if c.label == "AW-SE")
    assert aw_se.options["gate"] == "se"
    m3 = next(c for c in cells if c.label == "TDtop(T=2,m=3)")
    assert m3.stages == "paper-r50-m3" and m3.options["m"] == 3
    assert {c.mode for c in cells if c.metrics == ("memory",)} == {"eval", "train"}


def test_paper_matrix():
    cfg = load_config("paper")
    cells = expand(cfg)
    assert cfg.device == "cuda" and cfg.amp is False
    r101 = {c.label for c in cells if c.backbone == "resnet101"}
    assert {"SE", "CBAM", "FCA-TS", "TDjoint(T=2,m=1)", "TDjoint(T=2,m=1,L4)"} <= r101
    assert "ECA" not in r101 and "TDtop(T=2,m=3)" not in r101
    assert {c.batch for c in cells if c.metrics == ("memory",)} == {256}


def test_resolution_range_and_units():
    cfg = parse(BASE + """
[[sweeps]]
metrics = ["flops", "latency"]
resolutions = {start = 168, stop = 448, step = 28}
batches = [1, 2]
modes = ["eval", "train"]
""")
    cells = expand(cfg)
    flops = [c for c in cells if c.metrics == ("flops",)]
    lat = [c for c in cells if c.metrics == ("latency",)]
    assert len(flops) == 2 * 11 * 2 and {c.batch for c in flops} == {1}
    # forward counts, and forward + backward where a training step is timed
    assert sorted({(c.mode or "", c.resolution) for c in flops}) == \
        sorted((m, r) for m in ("", "train") for r in range(168, 449, 28))
    assert len(lat) == 2 * 11 * 2 * 2
    groups = [u for u in units(cells) if len(u) > 1]
    assert len(groups) == 11 * 2 * 2 and all(len(g) == 2 for g in groups)
    assert all({c.module for c in g} == {"none", "se"} for g in groups)
    assert len(units(cells)) == len(flops) + len(groups)


def test_cell_ids_are_stable_unique_and_shared_across_sweeps():
    text = BASE + """
[[sweeps]]
metrics = ["params", "flops"]
resolutions = [224]
[[sweeps]]
metrics = ["flops"]
resolutions = [224, 256]
"""
    cells = expand(parse(text))
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids)) == 2 * 3  # flops@224 only once
    assert ids == [c.id for c in expand(parse(text))]
    assert all(len(i) == 12 and cell_id(c) == i for c, i in zip(cells, ids))
    assert [c.id for c in expand(parse("# hi\n" + text))] == ids
    # timing settings change latency cells only
    timed = BASE + '[[sweeps]]\nmetrics = ["params", "latency"]\n'
    a, b = expand(parse(timed)), expand(parse(timed + "repeats = 9\n"))
    same = [x.id == y.id for x, y in zip(a, b)]
    assert same == [c.metrics != ("latency",) for c in a] and len(a) == 4


def test_a_sweep_sets_its_cells_threads_and_the_others_keep_the_configs():
    cfg = parse('threads = 2\n' + BASE + '[[sweeps]]\nmetrics = ["flops"]\nthreads = 1\n'
                '[[sweeps]]\nmetrics = ["latency"]\n[[sweeps]]\nmetrics = ["latency"]\n'
                'threads = 1\n')
    cells = expand(cfg)
    flops = [c for c in cells if c.metrics == ("flops",)]
    timed = [c for c in cells if c.metrics == ("latency",)]
    assert flops and {c.threads for c in flops} == {1}
    assert sorted(c.threads for c in timed) == [1, 1, 2, 2]
    # the thread count is part of the timing: a group never mixes two of them
    assert len({c.group for c in timed}) == 2
    assert all(len({c.threads for c in u}) == 1 for u in units(cells))
    assert len({c.id for c in cells}) == len(cells)


def test_default_counts_untimed_cells_two_at_once_on_one_thread_each():
    cfg = load_config("default")
    cells = expand(cfg)
    assert cfg.jobs == 2 and cfg.threads == 2
    assert {c.threads for c in cells if c.metrics != ("latency",)} == {1}
    assert {c.threads for c in cells if c.metrics == ("latency",)} == {2}


def test_interleave_off_gives_single_cells():
    cfg = parse(BASE + '[timing]\ninterleave = false\n')
    cells = expand(cfg)
    assert all(c.group is None for c in cells)
    assert len(units(cells)) == len(cells) == 2 * 4


@pytest.mark.parametrize("text, where, words", [
    ('colour = 1\n' + BASE, "colour", "unknown key"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "sx"\n', "modules[0].name",
     "unknown attention module 'sx'. Did you mean 'se'"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "se"\noptions = {reduce = 4}\n',
     "modules[0].options", "unknown option 'reduce'"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "se"\noptions = {reduction = "x"}\n',
     "modules[0].options", "must be int"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "se"\nstage = 3\n',
     "modules[0].stage", "did you mean 'stages'"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "td"\nstages = "nope"\n',
     "modules[0].stages", "preset"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "se"\nstages = {3 = 7}\n',
     "modules[0].stages", "asks for 7 blocks"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "tdaf"\nstages = [3]\n',
     "modules[0].stages", "takes no stages"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "none"\noptions = {a = 1}\n',
     "modules[0].options", "plain backbone takes no options"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "se"\n[[modules]]\nname = "se"\n',
     "modules[1]", "listed twice"),
    ('backbones = ["resnet18"]\n[[modules]]\nname = "td"\n[[modules]]\nname = "td"\n'
     'stages = [4]\n', "modules[1]", "give one a label"),
    ('backbones = ["resnet5"]\n[[modules]]\nname = "se"\n', "backbones", "unknown backbone"),
    ('backbones = ["resnet18"]\n', "modules", "missing"),
    (BASE + '[timing]\nrepeats = 0\n', "timing.repeats", "integer >= 1"),
    (BASE + '[timing]\nrepeat = 3\n', "timing.repeat", "did you mean 'repeats'"),
    (BASE + '[timing]\ntimeout_s = 0\n', "timing.timeout_s", "number > 0"),
    (BASE + '[[sweeps]]\nmetrics = ["flop"]\n', "sweeps[0].metrics", "'flop' is not one of"),
    (BASE + '[[sweeps]]\nmodes = ["test"]\n', "sweeps[0].modes", "not one of eval, train"),
    (BASE + '[[sweeps]]\nresolutions = {start = 448, stop = 168}\n', "sweeps[0].resolutions",
     "below start"),
    (BASE + '[[sweeps]]\nresolutions = {start = 168}\n', "sweeps[0].resolutions",
     "needs 'start' and 'stop'"),
    (BASE + '[[sweeps]]\nbatches = []\n', "sweeps[0].batches", "non-empty list"),
    (BASE + '[[sweeps]]\nbackbones = ["resnet50"]\n', "sweeps[0].backbones",
     "not one of the config's backbones"),
    (BASE + '[[sweeps]]\nwidth = 3\n', "sweeps[0].width", "unknown key"),
    (BASE + '[[sweeps]]\nthreads = 0\n', "sweeps[0].threads", "integer >= 1"),
    ('device = "gpu"\n' + BASE, "device", "'cpu', 'cuda'"),
    ('resolutions = [0]\n' + BASE, "resolutions", "integer >= 8"),
])
def test_validation_errors_name_file_and_key(text, where, words):
    msg = err(text)
    assert f"x.toml: {where}: " in msg and words in msg, msg


def test_bad_toml_and_missing_file(tmp_path):
    msg = err("name = \n")
    assert "not valid TOML" in msg
    with pytest.raises(ConfigError, match="no such config file.*built-in configs: "
                                          "default, latency, paper, tiny"):
        load_config(tmp_path / "nope.toml")


def test_only_filters():
    cfg = parse(BASE.replace('name = "se"', 'name = "se"\n[[modules]]\nname = "eca"') + """
[[sweeps]]
metrics = ["params", "latency"]
resolutions = [64, 96]
""")
    all_cells = expand(cfg)
    assert len(all_cells) == 3 * 2 * 2
    se = expand(cfg, ["module=se"])
    # the plain backbone stays in the latency groups as the speed ratios' reference
    assert {(c.module, c.metrics[0]) for c in se} == \
        {("se", "params"), ("se", "latency"), ("none", "latency")}
    assert len(expand(cfg, ["module=se,eca", "resolution=64"])) == 2 + 3
    assert len(expand(cfg, ["metric=params", "resolutions=96"])) == 3
    assert len(expand(cfg, ["label=ECA", "metric=latency"])) == 4
    assert len(expand(cfg, ["mode=none"])) == 6  # params cells have mode null
    assert len(expand(cfg, ["module=none"])) == 4
    assert len(expand(cfg, ["backbone=resnet18"])) == 12
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        expand(cfg, ["colour=red"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        expand(cfg, ["module"])
    with pytest.raises(ConfigError,
                       match=r"module=cbam matches no cell \(present: eca, none, se\)"):
        expand(cfg, ["module=cbam"])


@pytest.mark.parametrize("module, options, message", [
    ("td", 'variant = "sideways"', "variant='sideways' must be one of"),
    ("td", "m = 9", "m=9 (feedback distance) must be 1..3"),
    ("se", "reduction = 0", "reduction=0 must be a positive integer"),
    ("se", "reduction = 100000", "reduction=100000 is larger than the channel count 256"),
    ("cbam", "kernel_size = 4", "kernel_size=4 must be a positive odd integer"),
    ("tdaf", "anar = 4", "anar=4 must be one of 3, 5, 7"),
])
def test_option_values_fail_at_load_with_the_factory_check(module, options, message):
    text = (f'name = "x"\nbackbones = ["resnet50"]\nmetrics = ["params"]\n'
            f'[[modules]]\nname = "{module}"\noptions = {{{options}}}\n')
    with pytest.raises(ConfigError, match=r"modules\[0\]\.options: .*" + message.replace(
            "(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_config(text)


def test_a_binary_config_is_a_config_error(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)
