"""Every registered module at every resolution of the sweep (168^2..448^2, step 28):
output shape and finite values in eval (batch 1 and 2) and train (batch 2), gradients
reaching every parameter. ResNet-18 here (fast); ResNet-50 behind the ``slow`` marker,
where the spatial sizes are ResNet-18's (same stem and strides), so it checks eval at
every resolution (batch 2) and a training step at the ends of the sweep only."""
import pytest
import torch

from attnbench import modules
from attnbench.modules import build_model

from conftest import RESOLUTIONS

NUM_CLASSES = 10
# extra variants beside each module's defaults
EXTRA_VARIANTS = [("td", {"variant": "top"}), ("aw", {"gate": "se"})]


def variants():
    out = [(None, {})] + [(name, {}) for name in modules.REGISTRY.names()]
    out += [v for v in EXTRA_VARIANTS if v[0] in modules.REGISTRY]
    return out


def _ids(v):
    name, opts = v
    return (name or "none") + "".join(f"-{k}={val}" for k, val in opts.items())


def attention_parameters(model, backbone):
    plain = set(dict(build_model(backbone, num_classes=NUM_CLASSES).named_parameters()))
    return {n: p for n, p in model.named_parameters() if n not in plain}


def sweep(backbone, name, opts, resolutions, eval_batches=(1, 2), train_at=None):
    """``train_at``: the resolutions with a training step (batch 2); None: all."""
    model = build_model(backbone, name, num_classes=NUM_CLASSES, **opts)
    extra = attention_parameters(model, backbone)
    if name is not None:
        assert extra, f"{name} adds no parameters of its own"
    moved = set()  # attention parameters that got a non-zero gradient at least once
    for res in resolutions:
        for batch in eval_batches:
            model.eval()
            with torch.no_grad():
                y = model(torch.randn(batch, 3, res, res))
            assert y.shape == (batch, NUM_CLASSES), (res, batch)
            assert torch.isfinite(y).all(), (res, batch, "eval")
        if train_at is not None and res not in train_at:
            continue
        model.train()
        model.zero_grad(set_to_none=True)
        y = model(torch.randn(2, 3, res, res))
        assert y.shape == (2, NUM_CLASSES) and torch.isfinite(y).all()
        y.square().mean().backward()
        for n, p in model.named_parameters():
            assert p.grad is not None, f"{name} {res}^2: no gradient for {n}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
        moved |= {n for n, p in extra.items() if p.grad.abs().sum() > 0}
    # A ReLU bottleneck with few hidden units can be all-zero for one sample (then that
    # sample gives no gradient to the first FC), so non-zero is required over the sweep.
    assert moved == set(extra), f"{name}: zero gradient throughout for {set(extra) - moved}"


@pytest.mark.parametrize("variant", variants(), ids=_ids)
def test_every_resolution_resnet18(variant):
    sweep("resnet18", *variant, RESOLUTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("variant", variants(), ids=_ids)
def test_every_resolution_resnet50(variant):
    sweep("resnet50", *variant, RESOLUTIONS, eval_batches=(2,),
          train_at=(RESOLUTIONS[0], RESOLUTIONS[-1]))


@pytest.mark.parametrize("shape", [(5, 32, 1, 1), (1, 32, 1, 1), (3, 32, 4, 5)])
def test_channel_mlp_equals_its_conv_sequence(shape):
    """The gates' excitation MLP (common.ChannelMLP) runs its 1x1 convs as F.linear on a
    pooled (N, C, 1, 1) input with N >= 2: the same output and gradients as nn.Sequential
    of the same convs, float64 (N = 1 and larger maps go through the convs themselves)."""
    from torch import nn
    from attnbench.modules.common import bottleneck_mlp
    torch.manual_seed(0)
    mlp = bottleneck_mlp(32, 4).double()
    seq = nn.Sequential(*[m for m in mlp])  # the same modules, the plain Sequential forward
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = mlp(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *mlp.parameters()])
    ref = seq(x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *seq.parameters()])
    assert out.shape == ref.shape == (shape[0], 32, *shape[2:])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert list(mlp.state_dict()) == ["0.weight", "2.weight"]
