"""The path of a new user from a fresh clone: the README's two commands exist and do what
it says (the full main job runs in CI's `tox -e bench` check, not here)."""
import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnbench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def first_code_block(text):
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1)


def test_readme_opens_with_main_job_and_tests():
    commands = [line.split("#")[0].strip() for line in
                first_code_block((ROOT / "README.md").read_text()).splitlines()]
    assert commands == ["./tox.sh -e bench", "./tox.sh"]


def test_tox_envs_behind_the_two_commands():
    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    assert [e.strip() for e in tox["tox"]["env_list"].split(",")] == ["lint", "py"]
    assert "ruff check" in tox["testenv:lint"]["commands"]
    assert "pytest" in tox["testenv"]["commands"]
    bench = [c.strip() for c in tox["testenv:bench"]["commands"].strip().splitlines()]
    assert bench[0].startswith("attnbench run configs/default.toml")
    assert bench[1] == "attnbench report"


def test_ci_runs_the_readme_test_command():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines[-1] == "./tox.sh"


def test_default_matrix_expands(capsys):
    assert main(["run", str(ROOT / "configs" / "default.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for label in ("SE", "CBAM", "ECA", "FCA-TS", "TDjoint(T=2,m=1)", "TDtop(T=2,m=3)", "AW-SE",
                  "TDAF(N=3,ANAR-3)"):
        assert f" {label} " in out, label


@pytest.mark.slow
def test_tox_sh_installs_tox_where_there_is_none(tmp_path):
    """A machine with only Python 3 and pip: tox.sh bootstraps tox into .tox-bootstrap/."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    path = os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"])
    if shutil.which("tox", path=path):
        pytest.skip("tox is installed system-wide here")
    shutil.copy(ROOT / "tox.sh", tmp_path / "tox.sh")
    (tmp_path / "tox.ini").write_text("[tox]\nenv_list = py\n")
    out = subprocess.run(["sh", str(tmp_path / "tox.sh"), "--version"], cwd=tmp_path,
                         env={"PATH": path, "HOME": str(tmp_path)}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "installing it into" in out.stderr
    assert (tmp_path / ".tox-bootstrap" / "bin" / "tox").exists()
    assert re.match(r"\d+\.\d+", out.stdout.strip()), out.stdout
