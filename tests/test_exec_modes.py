"""Execution modes as matrix axes (precision, channels_last, torch.compile) and the
timm-style batch back-off on out-of-memory.

Small models throughout (resnet18 at 32 px, batch 1-8, 1-2 rounds). torch.compile is
replaced by a recording wrapper in the unit tests (a real compile takes ~50 s on this
CPU); one real compile runs under the ``slow`` marker. No timing assertions.
"""
import time

import pytest
import torch
from torch import nn

from attnbench.matrix import measure
from attnbench.matrix.config import ConfigError, expand, parse_config, units
from attnbench.profilers import speed
from attnbench.results import MEASURE_KEYS, Cell, short_hash

BASE = """
name = "modes"
device = "{device}"
backbones = ["resnet18"]
{top}
[[modules]]
name = "se"
[[sweeps]]
metrics = ["params", "flops", "latency", "memory"]
resolutions = [32]
batches = [2]
modes = ["eval"]
{sweep}
"""


def _config(top="", sweep="", device="cpu"):
    return parse_config(BASE.format(top=top, sweep=sweep, device=device))


def _by_metric(cells, metric):
    return [c for c in cells if c.metrics == (metric,)]


# --------------------------------------------------------------------------- config

def test_the_axes_multiply_latency_and_memory_cells_and_groups_never_mix_them():
    cells = expand(_config(sweep='precision = ["fp32", "bf16"]\nchannels_last = [false, true]\n'
                                 'compile = [false, true]'))
    latency, memory = _by_metric(cells, "latency"), _by_metric(cells, "memory")
    assert len(latency) == len(memory) == 2 * 2 * 2 * 2          # modules x the three axes
    assert {(c.precision, c.channels_last, c.compile) for c in latency} == {
        (p, cl, co) for p in ("fp32", "bf16") for cl in (False, True) for co in (False, True)}
    assert all(c.amp == (c.precision == "bf16") for c in latency + memory)
    # params and FLOPs: once per model, eager, the first precision and channels_last
    for metric in ("params", "flops"):
        static = _by_metric(cells, metric)
        assert len(static) == 2
        assert all((c.precision, c.channels_last, c.compile) == ("fp32", False, False)
                   for c in static)
    groups = [u for u in units(cells) if len(u) > 1]
    assert len(groups) == 8 and all({c.module for c in g} == {"none", "se"} for g in groups)
    for g in groups:
        assert len({(c.precision, c.channels_last, c.compile) for c in g}) == 1
        measure_keys = [{k: getattr(c, k) for k in measure.GROUP_KEYS} for c in g]
        assert all(k == measure_keys[0] for k in measure_keys)
    assert len({c.id for c in cells}) == len(cells)


def test_single_values_top_level_defaults_and_sweep_overrides():
    cells = expand(_config(top='precision = "bf16"\nchannels_last = true\ncompile = true'))
    timed = _by_metric(cells, "latency") + _by_metric(cells, "memory")
    assert all(c.precision == "bf16" and c.amp and c.channels_last and c.compile for c in timed)
    assert all(not c.compile for c in _by_metric(cells, "flops"))   # FLOPs: the eager model
    cells = expand(_config(top='precision = "bf16"', sweep='precision = "fp32"'))
    assert {c.precision for c in cells} == {"fp32"}


def test_defaults_given_explicitly_keep_every_cell_id_and_group():
    plain = expand(_config())
    explicit = expand(_config(top='precision = "fp32"\nchannels_last = false\ncompile = false',
                              sweep="oom_backoff = true"))
    assert [c.id for c in plain] == [c.id for c in explicit]
    assert [c.group for c in plain] == [c.group for c in explicit]
    for c in plain:   # the id is the hash of MEASURE_KEYS alone, as before the axes
        keys = {k: getattr(c, k) for k in MEASURE_KEYS}
        keys.update({k: getattr(c, k) for k in ("ci_target", "max_rounds", "budget_s")
                     if getattr(c, k) is not None})
        keys["interleaved"] = bool(c.group)
        assert c.id == short_hash(keys)


@pytest.mark.parametrize("device, precision", [("cpu", "bf16"), ("cuda", "fp16")])
def test_amp_true_is_the_devices_autocast_dtype_with_the_ids_it_always_had(device, precision):
    amp = expand(_config(top="amp = true", device=device))
    given = expand(_config(top=f'precision = "{precision}"', device=device))
    assert {c.precision for c in amp} == {precision} and all(c.amp for c in amp)
    assert [c.id for c in amp] == [c.id for c in given]
    assert [c.group for c in amp] == [c.group for c in given]


def test_cell_precision_and_compile_join_the_id_only_when_not_implied():
    kw = dict(backbone="resnet18", module="se", resolution=32, batch=2, metrics=["latency"],
              mode="eval")
    assert Cell(**kw, amp=True).precision == "bf16"
    assert Cell(**kw, amp=True, device="cuda").precision == "fp16"
    assert Cell(**kw, precision="bf16").amp is True
    assert Cell(**kw, precision="bf16").id == Cell(**kw, amp=True).id
    cuda_bf16 = Cell(**kw, precision="bf16", device="cuda")
    assert cuda_bf16.id != Cell(**kw, amp=True, device="cuda").id
    assert Cell(**kw, compile=True).id != Cell(**kw).id
    assert Cell(**kw, oom_backoff=False).id == Cell(**kw).id      # not a measurement setting
    assert Cell.from_dict(cuda_bf16.to_dict()) == cuda_bf16
    assert Cell(**kw, precision="bf16", compile=True).describe() == \
        "resnet18 None 32px b2 eval bf16 compiled latency"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Cell(**kw, precision="fp8")


@pytest.mark.parametrize("top, sweep, message", [
    ('precision = "fp16"', "", "<config>: precision: 'fp16' needs a CUDA device "
                               "(device = 'cpu'); autocast on the CPU is bfloat16: use \"bf16\""),
    ("", 'precision = ["fp32", "fp16"]', "<config>: sweeps[0].precision: 'fp16' needs a CUDA "
                                         "device (device = 'cpu')"),
    ('precision = "fp8"', "", "precision: 'fp8' is not one of fp32, bf16, fp16"),
    ('channels_last = "yes"', "", "channels_last: must be true, false or a non-empty list of "
                                  "them, got 'yes'"),
    ("", "compile = []", "sweeps[0].compile: must be true, false or a non-empty list"),
    ('amp = true\nprecision = "fp32"', "", "amp: contradicts precision = 'fp32'"),
    ("", "oom_backoff = 1", "sweeps[0].oom_backoff: must be true or false, got 1"),
])
def test_bad_axes_are_one_line_config_errors_naming_key_and_value(top, sweep, message):
    with pytest.raises(ConfigError) as err:
        _config(top=top, sweep=sweep)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_fp16_loads_on_a_cuda_device_and_oom_backoff_reaches_the_cells():
    cells = expand(_config(top='precision = ["fp16", "bf16"]', device="cuda",
                           sweep="oom_backoff = false"))
    assert {c.precision for c in _by_metric(cells, "latency")} == {"fp16", "bf16"}
    assert not any(c.oom_backoff for c in cells)
    assert all(c.oom_backoff for c in expand(_config()))


# --------------------------------------------------------------------------- precision

class _Recorder(nn.Module):
    """Records the dtype its convolution computes in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)
        self.seen = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y.dtype)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kw, dtype", [({"precision": "bf16"}, torch.bfloat16),
                                       ({"amp": True}, torch.bfloat16),
                                       ({}, torch.float32)])
def test_the_step_autocasts_to_the_precision(mode, kw, dtype):
    model = _Recorder()
    step = speed.Step(model, mode, batch=2, resolution=16, **kw)
    step()
    assert model.seen[-1] == dtype
    assert step.scaler is None           # a GradScaler only for fp16 on CUDA


def _cell(metric, **kw):
    fields = dict(backbone="resnet18", module="se", resolution=32, batch=1, metrics=[metric],
                  mode="eval", warmup=0, repeats=1, threads=1)
    fields.update(kw)
    return Cell(**fields)


def test_bf16_latency_rows_record_the_precision():
    rows = measure.measure_cell(_cell("latency", precision="bf16"))
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all(r["precision"] == "bf16" and r["amp"] is True and r["compile"] is False
               and r["batch_used"] == 1 for r in rows)
    assert "amp bf16" in rows[0]["method"]


# --------------------------------------------------------------------------- compile

@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced by a wrapper whose first call takes 0.2 s longer."""
    calls = []

    class Compiled(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.2)
            return self.inner(x)

    def compile_(model, *args, **kwargs):
        calls.append(model)
        return Compiled(model)
    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_a_compiled_cell_records_its_compile_time_apart(fake_compile):
    rows = measure.measure_cell(_cell("latency", compile=True, repeats=2))
    assert len(fake_compile) == 1
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert all(r["compile"] is True and r["compile_s"] >= 0.2 for r in rows)
    assert rows[0]["value"] < 200       # ms: the compiling call is not a timed run
    assert "torch.compile" in rows[0]["method"]
    memory = measure.measure_cell(_cell("memory", compile=True))
    assert len(fake_compile) == 2 and all(r["compile"] is True for r in memory)
    eager = measure.measure_cell(_cell("latency"))
    assert len(fake_compile) == 2 and "compile_s" not in eager[0]


def test_a_compiled_group_compiles_every_model_before_the_rounds(fake_compile):
    cells = [_cell("latency", module="none", compile=True, group="g"),
             _cell("latency", compile=True, group="g")]
    rows = measure.measure_group(cells)
    assert len(fake_compile) == 3                    # plain, se and the A/A control
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["compile_s"] >= 0.2 for r in rows)
    with pytest.raises(ValueError, match="cells differ in amp, precision, compile"):
        measure.measure_group([_cell("latency", group="g"),
                               _cell("latency", precision="bf16", compile=True, group="g")])


def test_flops_of_a_compiled_cell_are_not_counted_and_say_why():
    rows = measure.measure_cell(_cell("flops", mode=None, compile=True))
    assert rows and all(r["status"] == "failed" for r in rows)
    assert all("FLOPs are counted on the eager model" in r["error"] for r in rows)


@pytest.mark.slow
def test_a_real_torch_compile_on_the_cpu():
    rows = measure.measure_cell(_cell("latency", compile=True, repeats=2))
    assert [r["status"] for r in rows] == ["ok"] * 4, rows[0]["error"]
    assert rows[0]["compile_s"] > 0 and rows[0]["compile"] is True


# --------------------------------------------------------------------------- OOM back-off

class _OomAbove(nn.Module):
    """A model that runs out of memory above batch ``limit``."""

    def __init__(self, inner, limit, error=torch.OutOfMemoryError):
        super().__init__()
        self.inner, self.limit, self.error = inner, limit, error
        self.attnbench_label = getattr(inner, "attnbench_label", None)
        self.attnbench_config = getattr(inner, "attnbench_config", None)

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise self.error("CUDA out of memory. Tried to allocate 10.8 GiB")
        return self.inner(x)


@pytest.fixture
def oom_se(monkeypatch):
    """``se`` models run out of memory above batch 2 (limit changeable)."""
    state = {"limit": 2, "error": torch.OutOfMemoryError}
    build = measure.build

    def fake(cell):
        model = build(cell)
        if cell.module == "se":
            return _OomAbove(model, state["limit"], state["error"])
        return model
    monkeypatch.setattr(measure, "build", fake)
    return state


@pytest.mark.parametrize("metric", ["latency", "memory"])
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_a_cell_out_of_memory_backs_off_to_a_batch_that_fits(oom_se, metric, error):
    oom_se["error"] = error
    rows = measure.measure_cell(_cell(metric, batch=8))
    assert rows and all(r["status"] == "ok" for r in rows), rows[0]["error"]
    assert all(r["batch"] == 8 and r["batch_used"] == 2 for r in rows)
    assert all("batch backed off 8 -> 2 (out of memory)" in r["method"] for r in rows)


def test_without_backoff_or_at_batch_one_the_cell_fails(oom_se):
    rows = measure.measure_cell(_cell("latency", batch=8, oom_backoff=False))
    assert all(r["status"] == "failed" and "out of memory" in r["error"].lower()
               and r["batch"] == 8 for r in rows)
    oom_se["limit"] = 0
    rows = measure.measure_cell(_cell("latency", batch=8))
    assert all(r["status"] == "failed" and r["batch"] == 8 and "batch_used" not in r
               for r in rows)
    assert "(out of memory down to batch 1, requested 8)" in rows[0]["error"]
    rows = measure.measure_cell(_cell("flops", mode=None, batch=1))   # FLOPs never back off
    assert all(r["status"] == "failed" and "down to batch" not in r["error"] for r in rows)


def _group(**kw):
    return [_cell("latency", module="none", batch=8, group="g", repeats=2, **kw),
            _cell("latency", module="eca", batch=8, group="g", repeats=2, **kw),
            _cell("latency", batch=8, group="g", repeats=2, **kw)]


def test_in_a_group_only_the_model_out_of_memory_backs_off_with_its_own_pair(oom_se):
    rows = measure.measure_group(_group())
    by = {}
    for r in rows:
        by.setdefault(r["module"], []).append(r)
    assert set(by) == {"none", "eca", "se"}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    assert all(r["batch"] == 8 for r in rows)
    assert all(r["batch_used"] == 8 for r in by["none"] + by["eca"])     # the group intact
    assert all(r["batch_used"] == 2 for r in by["se"])
    ratio = [r for r in by["se"] if r["metric"] == "speed_ratio"]
    assert len(ratio) == 1 and ratio[0]["value"] > 0
    assert "batch backed off 8 -> 2" in ratio[0]["method"]


def test_in_a_group_without_backoff_only_its_own_rows_fail(oom_se):
    rows = measure.measure_group(_group(oom_backoff=False))
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and {r["module"] for r in failed} == {"se"}
    assert all("out of memory" in r["error"].lower() for r in failed)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["module"] for r in ok} == {"none", "eca"}
    assert len([r for r in ok if r["metric"] == "speed_ratio"]) == 2


# --------------------------------------------------------------------------- the runner

OOM_PLUGIN = '''
import torch
from torch import nn
from attnbench.modules.registry import register


@register("oomgate", "gate")
class OomGate(nn.Module):
    """An identity gate that runs out of memory above batch 2."""

    def __init__(self, channels):
        super().__init__()

    def forward(self, x):
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.8 GiB")
        return x
'''

RUN_CONFIG = """
name = "oom"
backbones = ["resnet18"]
threads = 1
[timing]
warmup = 0
repeats = 2
oom_backoff = {backoff}
[[modules]]
name = "se"
[[modules]]
name = "oomgate"
[[sweeps]]
metrics = ["latency", "memory"]
resolutions = [32]
batches = [8]
modes = ["eval"]
"""


@pytest.mark.usefixtures("clean_plugins")
@pytest.mark.parametrize("backoff", [True, False])
def test_the_runner_records_the_backed_off_batch_and_isolates_the_failure(tmp_path, backoff):
    from attnbench import results as R
    from attnbench.matrix.runner import run_config
    from attnbench.plugins import loader as plugins
    plugin = tmp_path / "oomplug.py"
    plugin.write_text(OOM_PLUGIN)
    plugins.load_all([str(plugin)])
    config = tmp_path / "oom.toml"
    config.write_text(RUN_CONFIG.format(backoff=str(backoff).lower()))
    s = run_config(config, results_dir=tmp_path / "results", run_id="oom",
                   plugins=[str(plugin)], progress=False)
    df, _ = R.load_run(tmp_path / "results" / "oom")
    gate, others = df[df.module == "oomgate"], df[df.module != "oomgate"]
    assert set(others.module) == {"none", "se"} and (others.status == "ok").all()
    assert (others.batch == 8).all() and (others.batch_used == 8).all()
    assert len(gate) and (gate.batch == 8).all()
    if backoff:
        assert s.exit_code == 0 and (gate.status == "ok").all()
        assert (gate.batch_used == 2).all()
        assert "speed_ratio" in set(gate.metric)
    else:
        assert s.exit_code == 1 and (gate.status == "failed").all()
        assert gate.error.str.contains("out of memory").all()


def test_only_filters_by_execution_mode():
    from attnbench.matrix.config import apply_filters, parse_filters
    cells = expand(_config(sweep='precision = ["fp32", "bf16"]\ncompile = [false, true]'))
    kept = apply_filters(cells, parse_filters(["precision=bf16", "compile=true"]))
    assert kept and all(c.precision == "bf16" and c.compile for c in kept)
    assert {c.metrics[0] for c in kept} == {"latency", "memory"}
