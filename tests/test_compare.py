"""`attnbench compare`: two runs' speed ratios, their difference and interval overlap."""
from attnbench.cli import main
from attnbench.results import write_rows

BASE = {"cell": "c", "backbone": "resnet50", "stages": None, "resolution": 224, "batch": 1,
        "mode": "eval", "device": "cpu", "metric": "speed_ratio", "unit": "x",
        "method": "paired", "status": "ok", "error": ""}


def run(folder, run_id, se, se_lo, se_hi, ctrl):
    rows = [dict(BASE, run_id=run_id, module="none", label="none", options="{}", value=1.0,
                 control_ratio=ctrl, control_lo=ctrl - 0.01, control_hi=ctrl + 0.01),
            dict(BASE, run_id=run_id, module="se", label="SE", options='{"reduction":16}',
                 value=se, ratio_lo=se_lo, ratio_hi=se_hi)]
    write_rows(folder / run_id, rows)


def test_compare_two_runs(tmp_path, capsys):
    run(tmp_path, "a", 0.900, 0.890, 0.910, 1.001)
    run(tmp_path, "b", 0.930, 0.925, 0.935, 0.998)
    assert main(["compare", "a", "b", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    se = next(line for line in out.splitlines() if line.startswith("| SE"))
    assert "+3.33 %" in se and "NO" in se          # 0.93 is outside [0.89, 0.91]
    ctrl = next(line for line in out.splitlines() if line.startswith("| control (A/A)"))
    assert "1.001 [0.991, 1.011]" in ctrl and "yes" in ctrl
    assert "largest difference 3.33 %; 1 of 2 inside" in out
    # B - A = 0.030 with half-width hypot(0.010, 0.005) = 0.011: the runs disagree
    assert "+0.030 ± 0.011" in se and se.rstrip(" |").endswith("NO")
    assert "1 of 2 agree" in out


def test_runs_agree_when_the_difference_interval_contains_zero(tmp_path, capsys):
    """B's 0.921 lies outside A's [0.905, 0.919], yet the difference 0.009 is within its
    own interval, +-hypot(0.007, 0.007) = +-0.0099: the runs agree."""
    run(tmp_path, "a", 0.912, 0.905, 0.919, 1.0)
    run(tmp_path, "b", 0.921, 0.914, 0.928, 1.0)
    assert main(["compare", "a", "b", "--results", str(tmp_path)]) == 0
    se = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| SE"))
    assert "NO" in se.split("|")[6] and "+0.009 ± 0.010" in se
    assert se.rstrip(" |").endswith("yes")


def test_compare_refuses_a_folder_without_rows(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
