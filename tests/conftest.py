import os
import sys

# Under pytest-xdist each worker gets its share of the cores (2 workers on 2 cores: 1 torch
# thread each, inherited by the CLI subprocesses through OMP_NUM_THREADS). With torch's
# default of one thread per core in every worker, two heavy tests at once spin OpenMP
# threads against each other (load average 4 on 2 cores).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
WORKER_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS) if _WORKERS > 1 else None
if WORKER_THREADS:
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

from attnbench.plugins import loader as plugins  # noqa: E402
from attnbench.modules.registry import REGISTRY  # noqa: E402
from attnbench.results import RESOLUTION_SWEEP  # noqa: E402

if WORKER_THREADS:
    torch.set_num_threads(WORKER_THREADS)

os.environ.setdefault("MPLBACKEND", "Agg")

# AW's compiled kernels (shifted sum, pool) compile once per layer shape (seconds each), and
# the resolution sweeps meet dozens of shapes; the suite checks outputs, so it runs the eager
# ops. The tests of the compiled kernels themselves (tests/test_aw.py) turn them on.
from attnbench.modules import aw as _aw  # noqa: E402
_aw.COMPILED_MIN_ELEMENTS = None

# The sweep of the TDAM paper's Table 2 / Fig. 3: 168^2 to 448^2 in steps of 28.
RESOLUTIONS = list(RESOLUTION_SWEEP)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: on a shared, loaded CPU two OpenMP threads spin
    against each other (a 64^2 ResNet-50 pass took 13 s instead of 0.2 s here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture
def clean_plugins(monkeypatch):
    """Each test starts from the built-ins and leaves the registry as it found it."""
    specs = REGISTRY.snapshot()
    mods = set(sys.modules)
    monkeypatch.setattr(plugins, "_loaded", [])
    monkeypatch.setattr(plugins, "_file_modules", {})
    monkeypatch.setattr(plugins, "_names_by_plugin", {})
    monkeypatch.setattr(plugins, "_entry_point_errors", [])
    monkeypatch.setattr(plugins, "_entry_points_done", False)
    monkeypatch.setattr(plugins, "_entry_points", lambda: [])  # the venv's own: not here
    yield
    REGISTRY.restore(specs)
    for name in set(sys.modules) - mods:
        if name.startswith(("attnbench_plugin_", "attnbench_coordatt", "brokenplug")):
            del sys.modules[name]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count must not change it for the tests after it
    (the runner's resume check compares the thread count with env.json's). Restored to
    what the test started with: inside a module under ``one_thread`` that is 1, elsewhere
    the process's own count (taking the first test's count instead made a worker whose
    first file ran under ``one_thread`` keep 1 thread for every later file)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
