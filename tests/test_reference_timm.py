"""examples/timm-reference: timm's SE, CBAM and ECA layers as plugin gates. Our gates
equal them (float64, weights copied), and the networks have the same parameters
(REFERENCE.md "Measured on the authors' code": timm's CBAM/ECA layers)."""
from pathlib import Path

import pytest
import torch

from attnbench.modules import build_model
from attnbench.modules.cbam import CBAMGate
from attnbench.modules.eca import ECAGate
from attnbench.modules.se import SEGate
from attnbench.plugins import loader as plugins

pytest.importorskip("timm")  # tox installs it (extra "reference"): this file runs in CI
PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "timm-reference" / "timm_reference.py"
pytestmark = pytest.mark.usefixtures("clean_plugins")


@pytest.fixture
def timm_gates():
    plugins.load_all([str(PLUGIN)])
    from attnbench.modules.registry import REGISTRY
    return {n: REGISTRY.get(n).factory for n in ("timm_se", "timm_cbam", "timm_eca")}


def _same(ours, theirs, channels=64):
    ours, theirs = ours.double().eval(), theirs.double().eval()
    for batch in (1, 2, 3):  # batch 1: the MLP's convs; from 2 rows on: F.linear
        x = torch.randn(batch, channels, 9, 7, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=0)
            assert not torch.allclose(ours(x), x)


def test_se_equals_timm(timm_gates):
    ours, theirs = SEGate(64), timm_gates["timm_se"](64)
    theirs.load_state_dict({"fc1.weight": ours.fc[0].weight, "fc2.weight": ours.fc[2].weight})
    _same(ours, theirs)


def test_cbam_equals_timm(timm_gates):
    torch.manual_seed(0)
    ours, theirs = CBAMGate(64), timm_gates["timm_cbam"](64)
    with torch.no_grad():
        ours.spatial[1].running_mean.fill_(0.3)
        ours.spatial[1].weight.fill_(1.7)
    state = {"channel.fc1.weight": ours.mlp[0].weight, "channel.fc2.weight": ours.mlp[2].weight,
             # ours pools [max; mean] over channels, timm [mean; max]: the conv's inputs swap
             "spatial.conv.conv.weight": ours.spatial[0].weight.flip(1)}
    state.update({f"spatial.conv.bn.{k}": v for k, v in ours.spatial[1].state_dict().items()})
    theirs.load_state_dict(state)
    _same(ours, theirs)


def test_eca_equals_timm(timm_gates):
    ours, theirs = ECAGate(256), timm_gates["timm_eca"](256)
    assert theirs.conv.kernel_size == ours.conv.kernel_size == (5,)
    theirs.load_state_dict(ours.state_dict())
    _same(ours, theirs, 256)


@pytest.mark.parametrize("name,ours,params", [("timm_se", "se", 28_071_976),
                                              ("timm_cbam", "cbam", 28_073_576),
                                              ("timm_eca", "eca", 25_557_118)])
def test_resnet50_parameters_equal_ours(timm_gates, name, ours, params):
    def count(m):
        return sum(p.numel() for p in m.parameters())
    theirs = build_model("resnet50", name)
    assert count(theirs) == count(build_model("resnet50", ours)) == params
    assert theirs.attnbench_label.endswith("-timm")


def test_versus_times_ours_against_timm_on_each_map(timm_gates, capsys):
    from attnbench.cli import main
    rc = main(["efficiency", "--versus", "eca=timm_eca", "--backbone", "resnet18",
               "--resolution", "32", "--batches", "2", "--modes", "eval", "--min-rounds", "4",
               "--budget-s", "0.001", "--threads", "1", "--block-rounds", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("| eca vs timm_eca")]
    assert [line.split("|")[2].strip() for line in lines] == [
        "64x8x8 b2 eval", "128x4x4 b2 eval", "256x2x2 b2 eval", "512x1x1 b2 eval"]
    assert all("[" in line.split("|")[6] and "[" in line.split("|")[7] for line in lines)


def test_versus_refuses_modules_on_different_maps(timm_gates, capsys):
    from attnbench.cli import main
    assert main(["efficiency", "--versus", "aw=timm_se", "--backbone", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "do not sit on the same maps" in err and "unexpected" not in err
    assert main(["efficiency", "--versus", "se"]) == 2
    assert "expected OURS=THEIRS" in capsys.readouterr().err
