"""`attnbench efficiency` (bench/matrix/efficiency.py): ratios beside FLOPs limits."""
import math

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
