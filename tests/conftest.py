import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# The sweep of the TDAM paper's Table 2 / Fig. 3: 168^2 to 448^2 in steps of 28.
RESOLUTIONS = list(range(168, 449, 28))


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
