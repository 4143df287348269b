"""The gated blocks' end, gate(x) + identity, with a ProductGate's product folded into the
addition (modules/common.py ``gate_residual``): the same values and gradients as the
plain product and sum, in float64 and float32, with and without autograd; hooks, overridden
forwards and other gates keep their plain call."""
import pytest
import torch
from torch import nn

from attnbench.modules import build_model
from attnbench.modules.builder import _GatedBottleneck
from attnbench.modules.cbam import CBAMGate
from attnbench.modules.common import ProductGate, gate_residual
from attnbench.modules.eca import ECAGate
from attnbench.modules.fca import FCAGate
from attnbench.modules.se import SEGate

GATES = {"se": lambda c: SEGate(c, 4), "cbam": lambda c: CBAMGate(c, 4),
         "eca": lambda c: ECAGate(c),
         "fca": lambda c: FCAGate(c, reduction=4, n_freq=4, dct_size=7)}


def _gate(name, dtype=torch.float32):
    torch.manual_seed(0)
    g = GATES[name](32).to(dtype).eval()
    return g


def _reference(gate, x, identity):
    a, b = gate.multiplicands(x.double())
    return a * b + identity.double()


@pytest.mark.parametrize("name", list(GATES))
def test_product_gate_forward_is_its_multiplicands_product(name):
    g = _gate(name, torch.float64)
    x = torch.randn(3, 32, 7, 9, dtype=torch.float64)
    a, b = g.multiplicands(x)
    assert b.shape in ((3, 32, 1, 1), (3, 1, 7, 9))
    torch.testing.assert_close(g(x), a * b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(GATES))
@pytest.mark.parametrize("grad", [False, True])
def test_fused_residual_equals_float64_reference(name, grad):
    g = _gate(name)
    x = torch.randn(4, 32, 7, 7)
    identity = torch.randn(4, 32, 7, 7)
    expected = _reference(_gate(name, torch.float64), x, identity)
    with torch.set_grad_enabled(grad):
        kept = x.clone()
        out = gate_residual(g, x, identity)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if grad:  # under autograd the block's BN output is left as it was
        assert torch.equal(x, kept)
    else:     # without it the sum is written into the block's own BN output
        assert out.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("name", list(GATES))
def test_fused_block_gradients_equal_the_plain_products(name):
    torch.manual_seed(1)
    model = build_model("resnet18", name, num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)

    def grads(hook: bool):
        m = build_model("resnet18", name, num_classes=5).train()
        m.load_state_dict(model.state_dict())
        if hook:  # a hook on every gate turns the fused path off: gate(x), then + identity
            for mod in m.modules():
                if isinstance(mod, ProductGate):
                    mod.register_forward_hook(lambda *a: None)
        out = m(x)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    fused_out, fused = grads(False)
    plain_out, plain = grads(True)
    torch.testing.assert_close(fused_out, plain_out, rtol=1e-5, atol=1e-5)
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", list(GATES))
def test_whole_model_eval_output_unchanged_by_fusion(name):
    torch.manual_seed(2)
    m = build_model("resnet50", name, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = m(x)
        seen = []
        for mod in m.modules():
            if isinstance(mod, ProductGate):
                mod.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        plain = m(x)
    assert len(seen) == 16  # every gate's hook ran: the fusion yields to hooks
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_overridden_forward_is_called():
    calls = []

    class Halved(SEGate):
        def forward(self, x):
            calls.append(1)
            return super().forward(x) * 0.5

    g, x, identity = Halved(32, 4).eval(), torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        expected = g(x) + identity
        calls.clear()
        out = gate_residual(g, x.clone(), identity)
    assert calls == [1]
    torch.testing.assert_close(out, expected)

    inst = SEGate(32, 4).eval()
    inst.forward = lambda x: torch.zeros_like(x)  # on the instance
    with torch.no_grad():
        assert torch.equal(gate_residual(inst, x.clone(), identity), identity)


class ExpGate(nn.Module):
    """Not a ProductGate; ``exp`` keeps its own output for its backward, so an in-place
    residual addition under autograd would break the backward pass."""

    def forward(self, x):
        return torch.exp(x * 0.1)


def test_other_gates_train_and_add_in_place_only_without_autograd():
    g = ExpGate()
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    identity = torch.randn(2, 8, 4, 4)
    out = gate_residual(g, x, identity)
    out.sum().backward()  # raises if the addition had modified exp's saved output
    torch.testing.assert_close(x.grad, 0.1 * torch.exp(x.detach() * 0.1))
    with torch.no_grad():
        y = x.detach().clone()
        out = gate_residual(g, y, identity)
    torch.testing.assert_close(out, torch.exp(y * 0.1) + identity)
    assert torch.equal(y, x.detach())  # the gate's input is not written


def test_gated_block_in_a_model_uses_the_fused_path():
    m = build_model("resnet50", "se", num_classes=10).eval()
    blocks = [b for b in m.modules() if isinstance(b, _GatedBottleneck)]
    assert len(blocks) == 16
    calls = []
    orig = SEGate.multiplicands

    def spy(self, x):
        calls.append(1)
        return orig(self, x)

    SEGate.multiplicands = spy
    try:
        with torch.no_grad():
            m(torch.randn(1, 3, 64, 64))
    finally:
        SEGate.multiplicands = orig
    assert len(calls) == 16


@pytest.mark.parametrize("shape", [(1, 32, 7, 7), (4, 64, 9, 5), (9, 16, 3, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_fca_dct_pool_equals_authors_product_sum_in_float64(shape, channels_last, grad):
    from attnbench.modules.fca import dct_pool
    torch.manual_seed(3)
    x = torch.randn(shape, requires_grad=grad)
    f = torch.randn(shape[1:])
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.set_grad_enabled(grad):
        y = dct_pool(xin, f)
    assert y.shape == (shape[0], shape[1], 1, 1)
    ref = (x.detach().double() * f.double()).sum((2, 3), keepdim=True)
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-5, atol=1e-5)
    if grad:
        y.square().sum().backward()
        torch.testing.assert_close(x.grad.double(), 2 * ref * f.double(), rtol=1e-5,
                                   atol=1e-5)


def test_fca_dct_pool_takes_the_bmm_from_its_batch_on(monkeypatch):
    from attnbench.modules import fca
    calls = []
    real = torch.bmm
    monkeypatch.setattr(fca.torch, "bmm", lambda *a: calls.append(a[0].shape) or real(*a))
    f = torch.randn(8, 5, 5)
    with torch.no_grad():
        for n in (1, fca.BMM_MIN_BATCH - 1, fca.BMM_MIN_BATCH):
            fca.dct_pool(torch.randn(n, 8, 5, 5), f)
    fca.dct_pool(torch.randn(fca.BMM_MIN_BATCH, 8, 5, 5), f)  # under autograd: no bmm
    assert calls == [(8, fca.BMM_MIN_BATCH, 25)]


def test_fca_dct_pool_is_the_authors_expression_under_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from attnbench.modules.fca import dct_pool
    x, f = torch.randn(8, 16, 7, 7), torch.randn(16, 7, 7)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dct_pool(x, f)
    assert counter.get_total_flops() == 0  # mul + sum: no matmul for the stock counter
    with FlopCounterMode(display=False) as counter:
        torch.bmm(x.flatten(2).transpose(0, 1), f.reshape(16, -1, 1))
    assert counter.get_total_flops() == 2 * 8 * 16 * 49  # what the fast path would count


def test_a_plugin_product_gate_from_the_public_api_is_fused():
    import attnbench

    class Halving(attnbench.ProductGate):  # a user's gate, outside the package
        calls = 0

        def multiplicands(self, x):
            Halving.calls += 1
            return x, torch.full((x.shape[0], x.shape[1], 1, 1), 0.5)

    g = Halving()
    x, identity = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = x * 0.5 + identity
    with torch.no_grad():
        out = gate_residual(g, x, identity)
    assert Halving.calls == 1
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(g(torch.ones(1, 4, 2, 2)), torch.full((1, 4, 2, 2), 0.5))


def _cbam_amax_reference(g, x):
    """CBAM with ``amax`` for both max poolings (timm's ops), in the module's own dtype."""
    n = x.shape[0]
    both = g.mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]))
    x = x * torch.sigmoid(both[:n] + both[n:])
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    return x * torch.sigmoid(g.spatial(pooled))


@pytest.mark.parametrize("train", [False, True])
def test_cbam_argmax_pooling_under_autograd_equals_amax_in_float64(train):
    torch.manual_seed(4)
    g = CBAMGate(32, 4).double().train(train)
    ref_g = CBAMGate(32, 4).double().train(train)
    ref_g.load_state_dict(g.state_dict())
    x = torch.randn(3, 32, 6, 5, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out, ref = g(x), _cbam_amax_reference(ref_g, xr)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    for (k, p), q in zip(g.named_parameters(), ref_g.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=k)
    with torch.no_grad():  # without autograd: amax, the same values
        torch.testing.assert_close(g.eval()(x), ref_g.eval()(xr), rtol=0, atol=0)


def test_cbam_gradient_goes_to_one_of_tied_maxima_under_autograd():
    g = CBAMGate(16, 4).double()
    torch.manual_seed(5)
    x = torch.ones(1, 16, 2, 2, dtype=torch.float64, requires_grad=True)  # all tied
    g(x).sum().backward()
    xr = x.detach().clone().requires_grad_()
    _cbam_amax_reference(g, xr).sum().backward()
    # the same total gradient reaches the map; amax spreads it over the ties
    torch.testing.assert_close(x.grad.sum(), xr.grad.sum(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(x.grad, xr.grad)
