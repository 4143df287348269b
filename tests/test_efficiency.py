"""`attnbench efficiency` (bench/matrix/efficiency.py): ratios beside FLOPs limits."""
import math

import pytest

from attnbench.cli import main
from attnbench.matrix import efficiency as E


def test_flops_limit_is_plain_over_module():
    rows = [{"metric": "flops", "status": "ok", "method": "fvcore+rules", "label": "none",
             "value": 4.0},
            {"metric": "flops", "status": "ok", "method": "fvcore+rules", "label": "SE",
             "value": 5.0},
            {"metric": "flops", "status": "ok", "method": "ptflops", "label": "SE", "value": 9.0}]
    assert E.flops_limits(rows) == {"none": (4.0, 1.0), "SE": (5.0, 0.8)}


def test_default_modules_are_the_default_matrix_without_the_plain_backbone():
    names = [m[0] for m in E.default_modules()]
    assert "none" not in names and {"se", "cbam", "eca", "fca", "td", "aw", "tdaf"} <= set(names)


def test_efficiency_command_prints_ratios_intervals_and_the_control(capsys):
    rc = main(["efficiency", "--backbone", "resnet18", "--resolution", "32", "--batches", "1",
               "--modes", "eval", "--only", "se", "--module", "aw:formulation=taps",
               "--min-rounds", "6", "--budget-s", "0.001", "--threads", "1",
               "--block-rounds", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("|")}
    assert {"none", "SE", "AW(formulation=taps)", "control (A/A)"} <= set(lines)
    se = [c.strip() for c in lines["SE"].split("|")[1:-1]]
    limit = float(se[2])
    assert 0.9 < limit < 1.0 and not math.isnan(limit)
    assert "[" in se[3] and "]" in se[3]                   # median [lo, hi]
    assert "time budget (6 rounds, 2 blocks)" in out


def test_aw_layer_shapes_are_the_networks_distinct_aw_convs():
    """ResNet-18 at 64²: 16 AW-convs (both 3x3 convs of 8 BasicBlocks) in 7 shapes."""
    shapes = E.aw_layer_shapes("resnet18", 64)
    assert sum(count for _, count in shapes) == 16
    keys = [(shape, aw.stride[0]) for (shape, aw), _ in shapes]
    assert keys[0] == ((64, 16, 16), 1) and ((64, 16, 16), 2) in keys
    assert ((256, 4, 4), 1) in keys and len(keys) == len(set(keys)) == 7


def test_layers_command_times_every_formulation_against_the_dense_conv(capsys):
    rc = main(["efficiency", "--layers", "--backbone", "resnet18", "--resolution", "32",
               "--batches", "2", "--modes", "eval", "--min-rounds", "4", "--budget-s", "0.001",
               "--threads", "1", "--block-rounds", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("| 64x8x8 s1 b2 eval")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].split("|")[1:-1]]
    assert cells[1] == "4" and float(cells[2]) > 0  # layer1: 2 BasicBlocks x 2 convs; ms
    forms, rounds = cells[3:-1], cells[-1]
    assert sum(c.endswith(" *") for c in forms) == 1        # the automatic choice:
    assert forms[0].endswith(" *")                          # grouped (Ho*Wo 64 >= C1 64)
    assert all("[" in c for c in forms)
    assert rounds == "4 (time budget)"
    methods = [line for line in out.splitlines() if line.startswith("methods: ")]
    assert len(methods) == 1 and "interleaved: rounds x 5 models" in methods[0]
    assert "stopped as the rounds column says" in methods[0]
    assert methods[0].count("interleaved:") == 1  # one method, not one per row


def test_layers_refuses_module_selection(capsys):
    assert main(["efficiency", "--layers", "--only", "se"]) == 2
    err = capsys.readouterr().err
    assert "--layers and --versus time single layers" in err and "Traceback" not in err


def _ratio_row(label, value, control=None, status="ok", stop="target reached"):
    return {"metric": "speed_ratio", "status": status, "label": label, "batch": 8,
            "mode": "eval", "value": value, "ratio_lo": value - 0.01, "ratio_hi": value + 0.01,
            "rounds": 10, "blocks": 2, "stop": stop, "control_ratio": control,
            "control_lo": None, "control_hi": None}


def test_combined_runs_give_the_mean_with_a_t_interval_over_runs():
    """``--runs K``: each ratio is the mean of the run estimates, the interval Student t
    with K - 1 degrees of freedom over them (not the runs' own intervals)."""
    latency = {"metric": "latency", "status": "ok", "label": "AW"}
    runs = [[latency, _ratio_row("AW", 0.906), _ratio_row("none", 1.0, control=1.01)],
            [latency, _ratio_row("AW", 0.891, stop="max rounds"),
             _ratio_row("none", 1.0, control=0.99)]]
    rows = E.combine_runs(runs)
    assert rows[0] is latency
    aw = rows[1]
    half = 12.706 * math.sqrt(((0.906 - 0.8985) ** 2 + (0.891 - 0.8985) ** 2) / 1 / 2)
    assert aw["value"] == pytest.approx(0.8985)
    assert aw["ratio_lo"] == pytest.approx(0.8985 - half, abs=1e-3)
    assert aw["ratio_hi"] == pytest.approx(0.8985 + half, abs=1e-3)
    assert aw["runs"] == [0.906, 0.891] and aw["rounds"] == 20 and aw["blocks"] == 4
    assert aw["stop"] == "target reached / max rounds"
    assert rows[2]["control_ratio"] == pytest.approx(1.0) and rows[2]["control_lo"] < 0.99


def test_a_ratio_failed_in_one_run_is_failed_in_the_combination():
    runs = [[_ratio_row("AW", 0.9)], [_ratio_row("AW", 0.9, status="failed")]]
    (aw,) = E.combine_runs(runs)
    assert aw["status"] == "failed" and "1 of 2 runs" in aw["error"]
    assert aw["runs"] == [0.9, None]


def test_efficiency_runs_repeats_the_measurement_in_fresh_processes(capsys):
    rc = main(["efficiency", "--backbone", "resnet18", "--resolution", "32", "--batches", "1",
               "--modes", "eval", "--only", "se", "--min-rounds", "6", "--budget-s", "0.001",
               "--threads", "1", "--block-rounds", "3", "--runs", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "over 2 runs in fresh processes" in out
    assert "time budget / time budget" not in out and "(12 rounds, 4 blocks)" in out
    se = next(line for line in out.splitlines() if line.startswith("| SE "))
    cell = [c.strip() for c in se.split("|")[1:-1]][3]
    mean, runs = float(cell.split()[0]), cell[cell.index("(") + 1:cell.index(")")].split(", ")
    assert len(runs) == 2
    assert mean == pytest.approx(sum(map(float, runs)) / 2, abs=1.5e-3)


def test_runs_is_refused_with_layers_rather_than_ignored(capsys):
    assert main(["efficiency", "--layers", "--runs", "2"]) == 2
    err = capsys.readouterr().err
    assert "--runs repeats the whole-model table" in err and "Traceback" not in err
