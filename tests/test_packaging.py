"""What `pip install .` installs: one top-level package, attnbench, with its public API."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(ROOT)], check=True,
                   capture_output=True, text=True)
    (found,) = out.glob("attnbench-*.whl")
    return found


def test_the_wheel_holds_only_the_attnbench_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"attnbench"}, top
    for part in ("attnbench/modules/td.py", "attnbench/profilers/flops.py",
                 "attnbench/matrix/runner.py", "attnbench/cli/__init__.py",
                 "attnbench/configs/default.toml", "attnbench/configs/paper.toml"):
        assert part in names, part
    assert not any(n.startswith("tests/") for n in names)


def test_the_unpacked_wheel_gives_the_public_api_and_not_the_old_names(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import attnbench, sys\n"
        "assert attnbench.__file__.startswith(sys.argv[1]), attnbench.__file__\n"
        "from attnbench import build_model, register, list_modules\n"
        "assert 'td' in [s.name for s in list_modules()]\n"
        "assert sum(p.numel() for p in build_model('resnet50', 'eca').parameters()) == 25557118\n"
        "from attnbench.matrix.config import resolve_path\n"
        "print(resolve_path('default'))\n"
        "for old in ('modules', 'bench'):\n"
        "    try:\n"
        "        __import__(old)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('import ' + old + ' worked')\n")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout
