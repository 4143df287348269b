import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

# The sweep of the TDAM paper's Table 2 / Fig. 3: 168^2 to 448^2 in steps of 28.
RESOLUTIONS = list(range(168, 449, 28))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def count(model):
    return sum(p.numel() for p in model.parameters())
