"""The third FLOP counter, torch.utils.flop_counter: halved to multiply-adds, the same
counting rules as fvcore's, forward + backward for a training step, the ops nobody
counts listed; the three counters side by side with one disagreement flag."""
import pytest
import torch
from torch import nn

from attnbench.modules.builder import build_model
from attnbench.profilers import flops

from test_profilers import _Bicubic, _ChannelSum, _Contraction, _FunctionalBN

F1 = 4 * 3 * 9 * 64   # conv 3->4, 3x3, on 8x8: multiply-adds
F2 = 4 * 4 * 9 * 64   # conv 4->4


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c2(self.c1(x)).flatten(1)


def test_stock_counter_is_halved_to_multiply_adds():
    assert flops.count_torch(_TwoConvs(), 8, rules=False).macs == F1 + F2
    lin = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    assert flops.count_torch(lin, 8, rules=False).macs == 192 * 5


def test_train_step_counts_forward_and_backward_per_image():
    # backward: the first conv needs only its weight gradient, the second both
    t = flops.count_torch_train(_TwoConvs(), 8, batch=2, rules=False)
    assert t.macs == 2 * F1 + 3 * F2
    assert "forward+backward" in t.method and "batch 2" in t.method
    assert any("nll_loss_backward" in u for u in t.uncounted)


@pytest.mark.parametrize("module, added", [
    (_FunctionalBN, 2 * 192),        # affine batch norm: two per element
    (_Contraction, 192),             # product and sum: one per product element
    (_ChannelSum, 192 + 192),        # mean pooling + channel sum of S*X
    (_Bicubic, 16 * 3 * 16 * 16),    # bicubic: 16 per output element
])
def test_rules_match_fvcore(module, added):
    m = module()
    ruled = flops.count_torch(m, 8)
    assert ruled.macs - flops.count_torch(m, 8, rules=False).macs == added
    assert sum(ruled.by_rule.values()) == added
    assert ruled.macs == flops.count_fvcore(m, 8).macs
    assert not any(u.startswith("aten.mul") for u in ruled.uncounted)  # contracted


def test_resnet50_equals_fvcore_and_max_pooling_is_listed_uncounted():
    m = build_model("resnet50")
    tc, fv = flops.count_torch(m, 224), flops.count_fvcore(m, 224)
    assert tc.macs == fv.macs and tc.gmac == pytest.approx(4.112, abs=0.0006)
    assert "aten.max_pool2d_with_indices x1" in tc.uncounted
    assert "aten::max_pool2d x1" in fv.uncounted
    assert tc.method == "torch.utils.flop_counter+rules(bn,reduce,avg_pool,upsample)"


def test_three_counters_and_one_disagreement_flag():
    m = build_model("resnet18", "se", num_classes=10)
    both = flops.flops_both(m, 32)
    assert [c.counter for c in both.counts] == ["fvcore", "ptflops-pytorch",
                                                 flops.TORCH_COUNTER]
    worst = max(100 * abs(c.macs - both.fvcore.macs) / both.fvcore.macs
                for c in both.counts[1:])
    assert both.disagreement_pct == pytest.approx(worst)
    assert "torch.utils.flop_counter" in both.method and "(largest)" in both.method
    off = flops.FlopCount(flops.TORCH_COUNTER, both.fvcore.macs * 2, flops.TORCH_COUNTER)
    flagged = flops.FlopsBoth(both.fvcore, both.ptflops, 100.0, off)
    assert flagged.disagree and flagged.method.startswith("DISAGREE")


def test_counting_leaves_the_model_as_it_was():
    m = build_model("resnet18", "se", num_classes=10).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flops.count_torch(m, 32)
    flops.count_torch_train(m, 32)
    assert all(mod.training for mod in m.modules())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


_MODULES = [("none", {}), ("se", {}), ("cbam", {}), ("eca", {}), ("fca", {}),
            ("td", {"variant": "joint", "steps": 2, "m": 1}),
            ("td", {"variant": "top", "steps": 2, "m": 2}), ("aw", {}), ("aw", {"gate": "se"}),
            ("tdaf", {})]


@pytest.mark.parametrize("name,options", _MODULES, ids=lambda v: str(v))
def test_counting_on_a_meta_copy_equals_counting_the_real_model(name, options, monkeypatch):
    """torch's counter runs on a meta-device copy (shapes only); forward and training-step
    counts, uncounted ops and rule tallies are those of the real tensors."""
    model = build_model("resnet18", name, num_classes=10, **options)
    meta_f = flops.count_torch(model, 64)
    meta_t = flops.count_torch_train(model, 64, batch=2)
    monkeypatch.setattr(flops, "_meta_copy", lambda m: None)
    real_f = flops.count_torch(model, 64)
    real_t = flops.count_torch_train(model, 64, batch=2)
    for meta, real in ((meta_f, real_f), (meta_t, real_t)):
        assert (meta.macs, meta.uncounted, meta.by_rule) == (real.macs, real.uncounted,
                                                             real.by_rule)
    assert all(p.device.type == "cpu" for p in model.parameters())   # the model is untouched


class _NeedsData(nn.Module):
    """A forward that reads a value, which a meta tensor does not have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)

    def forward(self, x):
        y = self.conv(x)
        return (y * float(y.abs().max().item() > -1)).flatten(1)


def test_a_forward_that_needs_data_is_counted_on_the_real_model():
    assert flops.count_torch(_NeedsData(), 8, rules=False).macs == 4 * 3 * 9 * 36
