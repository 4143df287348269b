"""The path of a new user from a fresh clone: the README's two commands exist and do what
it says (the full main job runs in CI's `tox -e bench` check, not here)."""
import configparser
import re
from pathlib import Path

from attnbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def first_code_block(text):
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1)


def test_readme_opens_with_main_job_and_tests():
    commands = [line.split("#")[0].strip() for line in
                first_code_block((ROOT / "README.md").read_text()).splitlines()]
    assert commands == ["tox -e bench", "tox"]


def test_tox_envs_behind_the_two_commands():
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert tox["tox"]["env_list"].strip() == "py"
    assert "pytest" in tox["testenv"]["commands"]
    bench = [c.strip() for c in tox["testenv:bench"]["commands"].strip().splitlines()]
    assert bench[0].startswith("attnbench run configs/default.toml")
    assert bench[1] == "attnbench report"


def test_ci_runs_the_readme_test_command():
    lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[-1] == "tox"


def test_default_matrix_expands(capsys):
    assert main(["run", str(ROOT / "configs" / "default.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for label in ("SE", "CBAM", "ECA", "FCA-TS", "TDjoint(T=2,m=1)", "TDtop(T=2,m=3)", "AW-SE",
                  "TDAF(N=3,ANAR-3)"):
        assert f" {label} " in out, label
