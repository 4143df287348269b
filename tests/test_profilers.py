"""Profilers: parameter counts, FLOP counters and their added rules, speed, memory,
the measure_cell / measure_group glue and ``attnbench profile``.

Small models and inputs throughout (resnet18, 32-64 px); the ResNet-50 FLOP checks
against REFERENCE.md take a few seconds each. No timing assertions beyond sanity.
"""
import json
import os
import platform
import subprocess
import sys
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnbench.profilers import flops

from attnbench.matrix import measure

from attnbench.profilers import memory

from attnbench.profilers import params

from attnbench.profilers import speed
from attnbench.modules.builder import build_model

SCHEMA_COLUMNS = ("backbone", "module", "label", "options", "stages", "resolution", "batch",
                  "mode", "device", "metric", "value", "unit", "method", "status", "error")


# --------------------------------------------------------------------------- params

def test_param_counts_resnet50_reference():
    assert params.count_params(build_model("resnet50")) == 25_557_032
    se = build_model("resnet50", "se")
    assert params.count_params(se) == 28_071_976
    assert params.attention_params(se, "resnet50", 1000) == 28_071_976 - 25_557_032


def test_attention_params_same_num_classes_and_defaults_from_model():
    m = build_model("resnet18", "se", num_classes=10)
    plain = build_model("resnet18", num_classes=10)
    expected = params.count_params(m) - params.count_params(plain)
    assert expected > 0
    assert params.attention_params(m, "resnet18", 10) == expected
    assert params.attention_params(m) == expected            # from attnbench_config
    assert params.attention_params(plain) == 0


def test_count_params_counts_shared_parameters_once():
    lin = nn.Linear(4, 4)
    assert params.count_params(nn.Sequential(lin, lin)) == 20


# --------------------------------------------------------------------------- flops

@pytest.mark.parametrize("module, stock, reference", [
    (None, 4.112, 4.112),   # plain ResNet-50: REFERENCE 4.112 G
    ("se", 4.114, 4.120),   # our SE pools with mean(): stock fvcore skips it
])
def test_fvcore_resnet50_matches_reference(module, stock, reference):
    m = build_model("resnet50", module)
    with_rules = flops.count_fvcore(m, 224)
    plain_fv = flops.count_fvcore(m, 224, rules=False)
    assert with_rules.gmac == pytest.approx(reference, rel=0.005)
    assert plain_fv.gmac == pytest.approx(reference, rel=0.005)
    assert plain_fv.gmac == pytest.approx(stock, abs=0.0006)
    # with the rules, SE's global pooling is counted: exactly REFERENCE's 4.120
    assert with_rules.gmac == pytest.approx(reference, abs=0.0006)
    assert with_rules.method.startswith("fvcore+rules(") and plain_fv.method == "fvcore"


def test_ptflops_resnet50_plain_matches_reference():
    pt = flops.count_ptflops(build_model("resnet50"), 224)
    assert pt.gmac == pytest.approx(4.132, abs=0.001)
    assert pt.method.startswith("ptflops-pytorch")


class _PerSampleConv(nn.Module):
    """AW-style: weights made per sample, one functional conv with groups = N."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))

    def forward(self, x):
        n = x.shape[0]
        w = (self.weight * 1.5).repeat(n, 1, 1, 1)
        y = F.conv2d(x.reshape(1, n * 3, *x.shape[2:]), w, padding=1, groups=n)
        return y.view(n, 8, *y.shape[2:])


class _Contraction(nn.Module):
    """FCA's DCT pooling: element-wise product with fixed filters, summed over H, W."""

    def __init__(self, c=3, s=8):
        super().__init__()
        self.register_buffer("dct", torch.randn(c, s, s))

    def forward(self, x):
        return (x * self.dct).sum((2, 3), keepdim=True)


class _ChannelSum(nn.Module):
    """TD eq. 7 written as a product and a channel sum: A = sum_c S_c X_c."""

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return (s * x).sum(1, keepdim=True)


class _TransposedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, 4, 4))  # (C_in, C_out, k, k)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, stride=2, padding=1)


class _Bicubic(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)


class _FunctionalBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("rm", torch.zeros(2, 3))
        self.register_buffer("rv", torch.ones(2, 3))

    def forward(self, x):  # multi-flow BN: statistics of flow 1
        return F.batch_norm(x, self.rm[1], self.rv[1], self.weight, self.bias, False)


class _Einsum(nn.Module):
    def forward(self, x):
        return torch.einsum("nchw,nchw->nhw", x, x)


class _MatmulOperator(nn.Module):
    def forward(self, x):  # (1, 3, 64) @ (1, 64, 3): 3 * 64 * 3 multiply-adds
        v = x.flatten(2)
        return v @ v.transpose(1, 2)


# input (1, 3, 8, 8): 192 elements
@pytest.mark.parametrize("module, counter, added", [
    # fvcore counts functional grouped / transposed convs itself; ptflops needs the rule
    (_PerSampleConv, "ptflops", 8 * 3 * 9 * 64),
    (_TransposedFunctional, "ptflops", 3 * 4 * 16 * 64),
    (_FunctionalBN, "ptflops", 2 * 192),
    # the product-and-sum contraction: one multiply-add per product element
    (_Contraction, "fvcore", 192),
    (_Contraction, "ptflops", 192),
    # mean pooling (192) + channel sum of S*X (192)
    (_ChannelSum, "fvcore", 192 + 192),
    (_ChannelSum, "ptflops", 192 + 192),
    (_Einsum, "ptflops", 192),
    (_MatmulOperator, "ptflops", 3 * 64 * 3),
    # bicubic: 16 per output element (fvcore lacks it; ptflops counts 1 per output)
    (_Bicubic, "fvcore", 16 * 3 * 16 * 16),
])
def test_rule_adds_the_expected_count(module, counter, added):
    count = flops.count_fvcore if counter == "fvcore" else flops.count_ptflops
    m = module()
    stock = count(m, 8, rules=False).macs
    ruled = count(m, 8, rules=True)
    assert ruled.macs - stock == added
    assert sum(ruled.by_rule.values()) == added


def test_stock_counters_on_functional_ops():
    """What the rules are for: stock ptflops misses functional convs; fvcore has them."""
    conv = _PerSampleConv()
    assert flops.count_ptflops(conv, 8, rules=False).macs == 0
    assert flops.count_fvcore(conv, 8, rules=False).macs == 8 * 3 * 9 * 64
    assert flops.count_fvcore(_TransposedFunctional(), 8, rules=False).macs == 3 * 4 * 16 * 64


def test_module_conv_not_counted_twice_by_ptflops_rules():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    stock = flops.count_ptflops(m, 8, rules=False)
    ruled = flops.count_ptflops(m, 8, rules=True)
    assert ruled.macs == stock.macs == 4 * 3 * 9 * 64 + 2 * 4 * 64
    assert ruled.by_rule == {}


def test_uncounted_ops_are_listed_and_contracted_products_are_not():
    m = _Contraction()
    fv = flops.count_fvcore(m, 8)
    assert not any(u.startswith("aten::mul") for u in fv.uncounted)
    gate = nn.Sequential(_Contraction(), nn.Sigmoid())
    assert any("sigmoid" in u for u in flops.count_fvcore(gate, 8).uncounted)
    assert any("sigmoid" in u for u in flops.count_ptflops(gate, 8).uncounted)


def test_counting_restores_training_mode_and_patches():
    m = build_model("resnet18", "se", num_classes=10).train()
    flops.flops_both(m, 32)
    assert all(mod.training for mod in m.modules())
    assert not isinstance(F.relu, type(flops)) and F.relu.__module__ == "torch.nn.functional"
    assert torch.Tensor.mul.__name__ == "mul"


def test_flops_both_and_disagreement_flag():
    both = flops.flops_both(build_model("resnet18", "se", num_classes=10), 32)
    assert both.fvcore.gmac > 0 and both.ptflops.gmac > 0
    assert both.disagreement_pct == pytest.approx(
        100 * abs(both.ptflops.macs - both.fvcore.macs) / both.fvcore.macs)
    assert not both.disagree and "DISAGREE" not in both.method
    big = flops.FlopsBoth(both.fvcore, flops.FlopCount("ptflops-pytorch", both.fvcore.macs * 2,
                                                       "ptflops-pytorch"), 100.0)
    assert big.disagree and "DISAGREE" in big.method


# --------------------------------------------------------------------------- speed

def _tiny(module=None):
    torch.manual_seed(0)
    return build_model("resnet18", module, num_classes=10)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_time_model_stats_are_sane(mode):
    s = speed.time_model(_tiny(), mode, batch=2, resolution=32, warmup=1, repeats=4,
                         threads=1)
    assert s.repeats == 4 and len(s.times_ms) == 4
    assert all(math.isfinite(t) and t > 0 for t in s.times_ms)
    assert s.p25_ms <= s.median_ms <= s.p75_ms
    assert s.throughput == pytest.approx(2 / (s.median_ms / 1e3))
    assert s.threads == 1 and "1 threads" in s.method
    assert s.mode == mode and s.device == "cpu"


def test_train_step_updates_weights_and_eval_does_not():
    m = _tiny()
    before = m.fc.weight.detach().clone()
    speed.time_model(m, "eval", batch=2, resolution=32, warmup=0, repeats=1)
    assert torch.equal(before, m.fc.weight)
    speed.time_model(m, "train", batch=2, resolution=32, warmup=0, repeats=1)
    assert not torch.equal(before, m.fc.weight)


def test_quantile_linear_interpolation():
    assert speed.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert speed.quantile([1, 2, 3, 4], 0.25) == 1.75
    assert speed.quantile([5], 0.75) == 5


def test_interleaved_ratio_of_a_model_against_itself():
    a = _tiny()
    b = _tiny()
    b.load_state_dict(a.state_dict())
    res = speed.time_interleaved({"none": a, "copy": b}, "eval", batch=2, resolution=32,
                                 warmup=1, rounds=6, threads=1)
    assert res.baseline == "none"
    assert len(res.orders) == 6 and all(sorted(o) == ["copy", "none"] for o in res.orders)
    assert len({tuple(o) for o in res.orders}) == 2                  # seeded random order
    assert res.orders == speed.time_interleaved(
        {"none": a, "copy": b}, "eval", batch=2, resolution=32, warmup=0, rounds=6,
        threads=1).orders                                             # same seed, same order
    assert res.ratios["none"].per_round == [1.0] * 6
    assert res.stop == "fixed rounds" and res.load[0] >= 0
    r = res.ratios["copy"]
    assert len(r.per_round) == 6 and r.p25 <= r.interval.estimate <= r.p75
    assert 0.33 < r.interval.estimate < 3.0                                      # loose: shared CPU
    for st in res.stats.values():
        assert st.repeats == 6 and st.p25_ms <= st.median_ms <= st.p75_ms


class _Boom(nn.Module):
    """Fails like an out-of-memory model on its ``fail_at``-th call."""

    def __init__(self, fail_at=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 10.8 GiB")
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("fail_at", [1, 4])  # in warm-up, or after some timed rounds
def test_interleaved_isolates_a_failing_model(fail_at):
    models = {"none": _tiny(), "boom": _Boom(fail_at), "se": _tiny("se")}
    res = speed.time_interleaved(models, "eval", batch=1, resolution=32, warmup=1, rounds=5,
                                 threads=1)
    assert set(res.errors) == {"boom"} and isinstance(res.errors["boom"], torch.OutOfMemoryError)
    assert set(res.stats) == {"none", "se"}
    assert res.stats["se"].repeats == res.stats["none"].repeats >= 5
    assert len(res.ratios["se"].per_round) == res.stats["se"].repeats


def test_interleaved_adaptive_rounds_stop_at_the_target_or_the_cap():
    a, b = _tiny(), _tiny()
    b.load_state_dict(a.state_dict())
    res = speed.time_interleaved({"none": a, "copy": b}, "eval", batch=1, resolution=32,
                                 warmup=1, rounds=6, threads=1, ci_target=1e-9, max_rounds=9)
    assert res.stop == "max rounds" and len(res.orders) == 9
    # a target any 6 rounds meet: with +-90 % a single stalled round (the other xdist worker
    # busy) once widened the 6-round order-statistic interval past it (CI, 2026-12-04)
    res = speed.time_interleaved({"none": a, "copy": b}, "eval", batch=1, resolution=32,
                                 warmup=1, rounds=6, threads=1, ci_target=1e3, max_rounds=50)
    assert res.stop == "target reached" and len(res.orders) == 6
    assert res.ratios["copy"].interval.half_width <= 1e3
    res = speed.time_interleaved({"none": a, "copy": b}, "eval", batch=1, resolution=32,
                                 warmup=0, rounds=6, threads=1, ci_target=1e-9, budget_s=0.0)
    assert res.stop == "time budget" and len(res.orders) == 6


def test_rounds_plan_stops_for_each_reason():
    plan = speed.Rounds(min_rounds=6, ci_target=0.01, max_rounds=20, budget_s=100)
    flat = {"none": [10.0] * 6, "m": [12.0] * 6}
    assert plan.stop({"none": [10.0] * 5, "m": [12.0] * 5}, "none", 0) is None
    assert plan.stop(flat, "none", 0) == "target reached"           # zero-width interval
    noisy = {"none": [10.0] * 6, "m": [10.0, 14.0, 9.0, 13.0, 8.0, 12.0]}
    assert plan.stop(noisy, "none", 0) is None
    assert plan.stop(noisy, "none", 100) == "time budget"
    many = {k: v * 4 for k, v in noisy.items()}
    assert plan.stop(many, "none", 0) == "max rounds"


def test_interleaved_finds_plain_backbone_by_label():
    res = speed.time_interleaved({"a": _tiny("se"), "b": _tiny()}, "eval", batch=1,
                                 resolution=32, warmup=0, rounds=2)
    assert res.baseline == "b"
    assert speed.time_interleaved({"a": _tiny("se")}, "eval", batch=1, resolution=32,
                                  warmup=0, rounds=1).ratios["a"] is None


# --------------------------------------------------------------------------- memory

def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def test_train_peak_exceeds_eval_peak_and_is_deterministic():
    ev = memory.peak_memory(_small_cnn(), "eval", batch=4, resolution=32)
    tr = memory.peak_memory(_small_cnn(), "train", batch=4, resolution=32)
    assert ev.peak_mib > ev.start_mib > 0
    param_bytes = params.count_params(_small_cnn()) * 4
    input_bytes = 4 * 3 * 32 * 32 * 4
    assert ev.start_bytes >= param_bytes + input_bytes
    # eval: at least one 4x32x32x32 float activation on top of the start
    assert ev.peak_bytes - ev.start_bytes >= 4 * 32 * 32 * 32 * 4
    # a train step holds activations for backward, gradients and momentum buffers
    assert tr.start_bytes >= ev.start_bytes + param_bytes          # + momentum
    assert tr.peak_bytes > ev.peak_bytes + param_bytes             # + grads, saved maps
    again = memory.peak_memory(_small_cnn(), "train", batch=4, resolution=32)
    assert again.peak_bytes == tr.peak_bytes
    assert tr.method.startswith("cpu.profiler-peak") and tr.mode == "train"


def test_live_bytes_counts_shared_storage_once():
    t = torch.zeros(256)
    assert memory.live_bytes([t, t[:10], t.view(16, 16)]) == 1024


# --------------------------------------------------------------------------- 4-D input

def test_profilers_feed_4d_inputs_and_model_rejects_others():
    m = _tiny()
    step = speed.Step(m, "eval", batch=3, resolution=40)
    assert step.x.shape == (3, 3, 40, 40) and step.y.shape == (3,)
    assert flops._input(m, 40).shape == (1, 3, 40, 40)
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(3, 40, 40))


# --------------------------------------------------------------------------- measure

def _cell(**kw):
    cell = dict(backbone="resnet18", module="se", options={"reduction": 16}, stages=None,
                resolution=32, batch=2, mode="eval", device="cpu",
                metrics=["params", "flops", "latency", "memory"], warmup=1, repeats=2,
                threads=1, num_classes=10)
    cell.update(kw)
    return cell


def test_measure_cell_rows_follow_the_schema():
    rows = measure.measure_cell(_cell())
    metrics = [r["metric"] for r in rows]
    assert metrics == ["params", "params_attention", "flops", "flops", "flops",
                       "flops_disagreement", "latency", "latency_p25", "latency_p75",
                       "throughput", "peak_tensor_memory", "rss_increase"]
    units = {r["metric"]: r["unit"] for r in rows}
    assert units == {"params": "count", "params_attention": "count", "flops": "GMac",
                     "flops_disagreement": "%", "latency": "ms", "latency_p25": "ms",
                     "latency_p75": "ms", "throughput": "img/s", "peak_tensor_memory": "MiB",
                     "rss_increase": "MiB"}
    for r in rows:
        assert all(c in r for c in SCHEMA_COLUMNS), r
        assert "run_id" not in r and "cell" not in r
        assert r["status"] == "ok" and r["error"] == "" and math.isfinite(r["value"])
        assert r["label"] == "SE" and r["options"] == '{"reduction":16}' and r["stages"] is None
        assert r["mode"] == (None if r["metric"] in ("params", "params_attention", "flops",
                                                     "flops_disagreement") else "eval")
        json.dumps(r)
    assert [r["method"].split("+")[0].split(" ")[0] for r in rows if r["metric"] == "flops"] \
        == ["fvcore", "ptflops-pytorch", "torch.utils.flop_counter"]
    lat = {r["metric"]: r["value"] for r in rows}
    assert lat["latency_p25"] <= lat["latency"] <= lat["latency_p75"]
    assert next(r for r in rows if r["metric"] == "latency")["threads"] == 1


def test_measure_cell_mode_none_measures_both_and_failures_are_rows():
    rows = measure.measure_cell(_cell(metrics=["memory"], mode=None))
    assert [r["mode"] for r in rows] == ["eval", "eval", "train", "train"]  # tensor, RSS
    bad = measure.measure_cell(_cell(module="nope", metrics=["params", "flops"]))
    assert [r["metric"] for r in bad] == ["params", "params_attention", "flops", "flops", "flops",
                                          "flops_disagreement"]
    for r in bad:
        assert r["status"] == "failed" and r["value"] is None
        assert "UnknownNameError" in r["error"] and all(c in r for c in SCHEMA_COLUMNS)


def test_measure_group_speed_ratio_rows():
    cells = [_cell(module="none", options={}, metrics=["latency"], repeats=6),
             _cell(metrics=["latency"], repeats=6)]
    rows = measure.measure_group(cells)
    by = {(r["module"], r["metric"]): r for r in rows}
    for module in ("none", "se"):
        for metric in ("latency", "latency_p25", "latency_p75", "throughput", "speed_ratio"):
            r = by[(module, metric)]
            assert r["status"] == "ok" and all(c in r for c in SCHEMA_COLUMNS)
    assert by[("none", "speed_ratio")]["value"] == 1.0
    se = by[("se", "speed_ratio")]
    assert se["ratio_lo"] <= se["value"] <= se["ratio_hi"] and se["unit"] == "x"
    assert se["ratio_ci"] == pytest.approx((se["ratio_hi"] - se["ratio_lo"]) / 2 / se["value"])
    # the A/A control: a second plain backbone in the same rounds, carried by every row
    assert se["control_lo"] <= se["control_ratio"] <= se["control_hi"]
    assert isinstance(se["distinct"], bool) and "paired per-round ratio" in se["method"]
    assert by[("none", "speed_ratio")]["control_ratio"] == se["control_ratio"]
    assert {r["module"] for r in rows} == {"none", "se"}  # the control has no rows of its own
    # without a plain cell the backbone is still timed, but returns no rows
    only = measure.measure_group([_cell(metrics=["latency"], repeats=1)])
    assert {r["module"] for r in only} == {"se"}


# --------------------------------------------------------------------------- CLI

def test_profile_command_prints_one_table(capsys):
    from attnbench.cli import main
    rc = main(["profile", "resnet18", "se", "--resolution", "32", "--batch", "1",
               "--no-speed", "--no-memory", "--option", "reduction=16"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "FLOPs fvcore" in out and "FLOPs ptflops-pytorch" in out
    assert "device: cpu" in out and "attention params" in out


def test_profile_command_in_bf16_with_blocks(capsys):
    from attnbench.cli import main
    rc = main(["profile", "resnet18", "se", "--resolution", "32", "--batch", "1",
               "--mode", "eval", "--no-memory", "--precision", "bf16", "--repeats", "4",
               "--block-rounds", "2", "--threads", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "FLOPs fvcore" in out
    assert "4 rounds in 2 block(s)" in out
    assert main(["profile", "resnet18", "se", "--precision", "fp16", "--no-speed"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_profile_command_unknown_module_and_bad_option(capsys):
    from attnbench.cli import main
    assert main(["profile", "resnet18", "nope", "--no-speed"]) == 2
    assert "unknown attention module" in capsys.readouterr().err
    assert main(["profile", "resnet18", "se", "--option", "reduction"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_profile_paper_lookup_and_option_parsing():
    from attnbench.cli import profile as cmd_profile
    assert cmd_profile.paper_figures("resnet50", "SE", 28_071_976)[:2] == (28.07, 4.13)
    assert cmd_profile.paper_figures("resnet50", "TDtop(T=2,m=3)", 27_789_352) is None
    assert cmd_profile.paper_figures("resnet50", "TDtop(T=2,m=3)", 27_655_208)[1] == 5.98
    assert cmd_profile.parse_options(["steps=2", "variant=top", "flag=true"]) == \
        {"steps": 2, "variant": "top", "flag": True}
    assert cmd_profile.parse_stages('{"3": [0, 1], "4": "all"}') == {"3": [0, 1], "4": "all"}
    assert cmd_profile.parse_stages("paper") == "paper"


def test_measure_takes_cells_and_dicts_alike():
    from attnbench.results import Cell
    cell = Cell(backbone="resnet18", module="se", resolution=32, batch=1, metrics=("params",),
                num_classes=10, label="mine")
    rows = measure.measure_cell(cell)
    assert rows == measure.measure_cell(cell.to_dict())
    assert [r["label"] for r in rows] == ["SE", "SE"]  # the model's label, not the cell's
    assert rows[0]["value"] == params.count_params(build_model("resnet18", "se", num_classes=10))


def test_measure_strict_raises_and_stock_flop_rules():
    from attnbench.modules.registry import UnknownNameError
    with pytest.raises(UnknownNameError):
        measure.measure_cell(_cell(module="nope", metrics=["params"]), strict=True)
    with pytest.raises(UnknownNameError):
        measure.measure_group([_cell(module="nope", metrics=["latency"])], strict=True)
    stock = measure.measure_cell(_cell(metrics=["flops"]), flop_rules=False)
    assert [r["method"] for r in stock if r["metric"] == "flops"][:2] == \
        ["fvcore", "ptflops-pytorch"]
    gap = next(r for r in stock if r["metric"] == "flops_disagreement")
    assert gap["method"].startswith("100*|ptflops-pytorch or torch.utils.flop_counter - fvcore|")


def test_profile_formats_what_the_measurement_returns(capsys, monkeypatch):
    """``attnbench profile`` measures through measure_cell / measure_group."""
    calls = []
    real_cell, real_group = measure.measure_cell, measure.measure_group

    def spy_cell(cell, **kw):
        calls.append(("cell", cell.metrics, cell.mode, kw))
        return real_cell(cell, **kw)

    def spy_group(cells, **kw):
        calls.append(("group", cells[0].metrics, cells[0].mode, kw))
        return real_group(cells, **kw)
    monkeypatch.setattr(measure, "measure_cell", spy_cell)
    monkeypatch.setattr(measure, "measure_group", spy_group)
    from attnbench.cli import main
    assert main(["profile", "resnet18", "se", "--resolution", "32", "--batch", "1",
                 "--mode", "eval", "--repeats", "2", "--warmup", "0", "--num-classes", "10",
                 "--stock-flops"]) == 0
    out = capsys.readouterr().out
    assert [c[:3] for c in calls] == [("cell", ("params",), "eval"), ("cell", ("flops",), None),
                                      ("group", ("latency",), "eval"),
                                      ("cell", ("memory",), "eval")]
    assert calls[1][3] == {"flop_rules": False, "strict": True}
    for words in ("resnet18 + SE", "FLOPs fvcore", "fvcore, batch 1, 32px", "latency eval",
                  "throughput eval", "speed ratio eval", "interleaved: 2 rounds x 3 models",
                  "A/A control",
                  "peak memory eval", "cpu.profiler-peak"):
        assert words in out, words
    assert "train" not in out
    calls.clear()
    assert main(["profile", "resnet18", "se", "--resolution", "32", "--batch", "2",
                 "--mode", "train", "--repeats", "1", "--warmup", "0", "--num-classes", "10",
                 "--no-flops", "--no-memory", "--alone"]) == 0
    out = capsys.readouterr().out
    assert [c[:3] for c in calls] == [("cell", ("params",), "train"),
                                      ("cell", ("latency",), "train")]
    assert "latency train" in out and "speed ratio" not in out and "(timed alone)" in out


def test_cuda_timer_uses_the_configured_device(monkeypatch):
    """CUDA events are recorded with the configured device current, on its stream."""
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream):
            calls.append(("record", stream))

        def synchronize(self):
            calls.append(("sync-event",))

        def elapsed_time(self, other):
            return 2.5

    class FakeDevice:
        def __init__(self, dev):
            calls.append(("device", str(dev)))

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", str(d))))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: f"stream-of-{d}")
    timer = speed._RunTimer.__new__(speed._RunTimer)
    timer.fn, timer.device = (lambda: calls.append(("step",))), torch.device("cuda:1")
    assert timer() == 2.5
    assert calls == [("device", "cuda:1"), ("sync", "cuda:1"), ("record", "stream-of-cuda:1"),
                     ("step",), ("record", "stream-of-cuda:1"), ("sync-event",)]


def test_mps_is_refused_before_timing():
    from attnbench.modules.registry import AttnbenchError
    with pytest.raises(AttnbenchError, match="mps.*not supported"):
        speed.Step(_tiny(), "eval", 1, 32, "mps")


_SEEN_INSTANCES = []


class _Tracks(nn.Module):
    """Records which instance ran (a deep copy is another instance)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        _SEEN_INSTANCES.append(id(self))
        return self.conv(x).mean((2, 3))


def test_blocked_rounds_renew_the_instances_and_stop_at_block_ends():
    _SEEN_INSTANCES.clear()
    base, tracked = _tiny(), _Tracks()
    res = speed.time_interleaved({"none": base, "t": tracked}, "eval", batch=1, resolution=32,
                                 warmup=1, rounds=5, threads=1, block_rounds=3)
    assert len(res.orders) == 6                       # 5 rounds asked, rounded up to a block
    assert res.ratios["t"].blocks == [0, 0, 0, 1, 1, 1]
    iv = res.ratios["t"].interval
    assert iv.blocks == 2 and iv.n == 6
    # block 0 on the original, block 1 on a fresh copy; each: the step's class-count
    # probe, one warm-up call and 3 timed rounds
    assert len(set(_SEEN_INSTANCES)) == 2 and _SEEN_INSTANCES[0] == id(tracked)
    copy_id = _SEEN_INSTANCES[-1]
    assert _SEEN_INSTANCES.count(id(tracked)) == _SEEN_INSTANCES.count(copy_id) == 1 + 1 + 3
    assert _SEEN_INSTANCES.index(copy_id) == 5


def test_blocked_plan_judges_the_target_only_from_three_blocks():
    plan = speed.Rounds(min_rounds=2, ci_target=0.5, max_rounds=100, block_rounds=2)
    flat = lambda n: {"none": [10.0] * n, "m": [12.0] * n}  # noqa: E731
    assert plan.stop(flat(3), "none", 0) is None       # mid-block
    assert plan.stop(flat(4), "none", 0) is None       # 2 blocks: too few for the target
    assert plan.stop(flat(6), "none", 0) == "target reached"
    budget = speed.Rounds(min_rounds=2, ci_target=1e-9, budget_s=0.0, block_rounds=2)
    assert budget.stop(flat(3), "none", 10) is None    # the budget also waits for the block
    assert budget.stop(flat(4), "none", 10) == "time budget"


def test_timing_flushes_denormals_on_the_cpu_and_restores_after():
    tiny = torch.tensor([1e-39])                     # a denormal float32
    assert (tiny * 1.0).item() != 0.0
    with speed.flush_denormal(torch.device("cpu")):
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
    m = _tiny()
    st = speed.time_model(m, "train", batch=2, resolution=32, warmup=0, repeats=1)
    assert "denormals flushed" in st.method and (tiny * 1.0).item() != 0.0


def test_the_forkservers_preload_imports_the_counters_without_warnings():
    """fvcore's import calls torch.jit.script (a FutureWarning in torch >= 2.10); the
    runner's forkserver imports it through attnbench.profilers.preload, silently."""
    import subprocess
    import sys
    from attnbench.matrix import worker
    assert "attnbench.profilers.preload" in worker._PRELOAD
    code = "import attnbench.profilers.preload, sys; print('fvcore.nn' in sys.modules)"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


_FAULTS = """
import resource, sys, torch
from attnbench.profilers import speed
kept = speed.keep_freed_memory(torch.device("cpu"))
def work():   # 100 MB in tensors of 4 MB, freed and made again, as in a model's step
    a = [torch.ones(1_000_000) for _ in range(25)]
    del a
for _ in range(3):
    work()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    work()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc",
                    reason="glibc mallopt")
def test_timing_keeps_freed_memory_so_steps_do_not_fault_pages_in_again():
    """With the setting a repeated step faults no pages in; with glibc's defaults
    (``ATTNBENCH_MALLOC=system``) glibc trims the freed 100 MB and every repeat faults
    them in again (~24k pages) -- in most processes: in about one in five (measured),
    something allocated above them on the heap keeps glibc from trimming, so the control
    runs in up to five processes and must fault in one of them."""
    def faults(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.split()
        return out[0] == "True", float(out[1])
    kept, with_setting = faults()
    assert kept and with_setting < 5, with_setting
    controls = []
    for _ in range(5):
        system, without = faults(ATTNBENCH_MALLOC="system")
        assert not system
        controls.append(without)
        if without > 100:
            break
    assert max(controls) > 100, controls


def test_cpu_latency_method_says_freed_memory_is_kept():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    stats = speed.time_model(m, "eval", batch=1, resolution=16, warmup=0, repeats=2)
    assert stats.malloc_kept == speed.keep_freed_memory(torch.device("cpu"))
    assert ("freed memory kept (glibc mallopt)" in stats.method) == stats.malloc_kept
