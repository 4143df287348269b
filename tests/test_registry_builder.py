"""Registry, builder and the gate modules (SE, CBAM, ECA, FCA) against REFERENCE.md."""
import pytest
import torch
from torchvision.models.resnet import Bottleneck

from attnbench import modules
from attnbench.modules import OptionError, RegistrationError, UnknownNameError, build_model
from attnbench.modules.registry import Registry, register
from attnbench.modules.eca import eca_kernel_size
from attnbench.modules.fca import dct_filters

from conftest import count

# ResNet-50, TDAM paper Table 1 placement (REFERENCE.md "Measured on the authors' code").
R50_PARAMS = {None: 25_557_032, "se": 28_071_976, "cbam": 28_073_576, "eca": 25_557_118,
              "fca": 28_071_976}
R50_PAPER_M = {None: 25.56, "se": 28.07, "cbam": 28.07, "eca": 25.56, "fca": 28.07}


@pytest.mark.parametrize("attention", list(R50_PARAMS))
def test_resnet50_params_match_reference_and_paper(attention):
    n = count(build_model("resnet50", attention))
    assert n == R50_PARAMS[attention]
    assert abs(n / 1e6 - R50_PAPER_M[attention]) / R50_PAPER_M[attention] < 0.005


@pytest.mark.parametrize("attention,expected", [(None, 44_549_160), ("se", 49_292_328),
                                                ("fca", 49_292_328), ("cbam", 49_295_628)])
def test_resnet101_params_match_reference(attention, expected):
    assert count(build_model("resnet101", attention)) == expected


def test_builtin_names_registered():
    assert {"se", "cbam", "eca", "fca", "td", "aw", "tdaf"} <= set(modules.REGISTRY.names())
    for spec in modules.list_modules():
        assert spec.kind in ("gate", "conv", "block", "network", "head")
        assert spec.paper, f"{spec.name} must name its paper"


def test_gate_is_after_last_bn_before_residual():
    model = build_model("resnet50", "se", num_classes=10).eval()
    block = model.layer1[0]
    assert isinstance(block, Bottleneck) and hasattr(block, "attention")
    seen = []
    block.bn3.register_forward_hook(lambda m, i, o: seen.append(("bn3", o.clone())))
    block.attention.register_forward_hook(lambda m, i, o: seen.append(("gate", i[0].clone())))
    model(torch.randn(1, 3, 64, 64))
    assert [s[0] for s in seen] == ["bn3", "gate"]
    assert torch.equal(seen[0][1], seen[1][1])  # the gate receives bn3's output


def test_stage_selection_and_torchvision_names_kept():
    model = build_model("resnet50", "se", stages={3: [0, 2], "layer4": "all"})
    gated = [name for name, m in model.named_modules() if name.endswith(".attention")]
    assert gated == ["layer3.0.attention", "layer3.2.attention", "layer4.0.attention",
                     "layer4.1.attention", "layer4.2.attention"]
    plain_keys = set(build_model("resnet50").state_dict())
    assert plain_keys <= set(model.state_dict())  # torchvision weights load strict=False


def test_eca_kernel_sizes():
    assert [eca_kernel_size(c) for c in (64, 128, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 5, 7]


def test_fca_dct_filters_are_orthonormal_basis_rows():
    filt = dct_filters(16, 7)  # one channel per frequency on the 7x7 grid
    flat = filt.reshape(16, -1)
    gram = flat @ flat.T
    assert torch.allclose(gram, torch.eye(16), atol=1e-5)
    assert torch.allclose(filt[0], torch.full((7, 7), 1 / 7))  # DC basis = mean * 7


def test_fca_equals_se_excitation_of_dc_when_one_frequency():
    # With n_freq=1 (DC only) FCA pools with 1/7 per pixel: 7 x the mean, i.e. SE up to scale.
    from attnbench.modules.fca import FCAGate
    gate = FCAGate(32, reduction=4, n_freq=1, dct_size=7)
    x = torch.randn(2, 32, 7, 7)
    y = (x * gate.dct).sum((2, 3))
    assert torch.allclose(y, x.mean((2, 3)) * 7, atol=1e-5)


@pytest.mark.parametrize("size", [(42, 42), (21, 21), (11, 11), (6, 6), (112, 112), (9, 13),
                                  (56, 56), (1, 1)])
def test_fca_pulled_back_filters_equal_pooling_first(size):
    """FcaNet's own order on a map of another size (adaptive_avg_pool2d to the DCT size,
    then the DCT-weighted sum) equals weighting the map by the pulled-back filters:
    float64, gate output and input gradient, training mode."""
    import torch.nn.functional as F

    from attnbench.modules.fca import FCAGate
    torch.manual_seed(0)
    gate = FCAGate(32, reduction=4, stage=1).double().train()   # DCT size 56
    x = torch.randn(2, 32, *size, dtype=torch.float64, requires_grad=True)

    def authors(inp):
        pooled = F.adaptive_avg_pool2d(inp, 56) if inp.shape[-2:] != (56, 56) else inp
        return inp * torch.sigmoid(gate.fc((pooled * gate.dct).sum((2, 3), keepdim=True)))
    ref = authors(x)
    (gx_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    out = gate(x)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=0)
    assert not torch.allclose(ref, x * torch.sigmoid(gate.fc(x.mean((2, 3), keepdim=True))))


def test_fca_pulled_back_filters_follow_the_buffer_and_size():
    from attnbench.modules.fca import FCAGate
    gate = FCAGate(32, reduction=4, stage=4).eval()                 # DCT size 7
    x = torch.randn(1, 32, 5, 5)
    first = gate.filters_for(x)
    assert gate.filters_for(x) is first and first.shape == (32, 5, 5)   # kept
    assert gate.filters_for(torch.randn(1, 32, 7, 7)) is gate.dct        # the DCT size itself
    assert gate.filters_for(torch.randn(1, 32, 6, 6)).shape == (32, 6, 6)
    gate.load_state_dict({k: 2 * v for k, v in gate.state_dict().items()})  # buffer changes
    torch.testing.assert_close(gate.filters_for(x), 2 * first)
    with torch.inference_mode():
        gate(torch.randn(1, 32, 4, 4))
    assert gate._pulled[0][:2] != (4, 4)     # an inference tensor is never kept


def test_fca_adaptive_pool_other_resolutions():
    model = build_model("resnet18", "fca", num_classes=10).eval()
    for res in (168, 252, 448):
        assert model(torch.randn(1, 3, res, res)).shape == (1, 10)


# --- errors: the message is part of the contract ----------------------------------------

def test_unknown_module_names_closest():
    with pytest.raises(UnknownNameError, match=r"unknown attention module 'sse'.*'se'"):
        build_model("resnet50", "sse")


def test_unknown_backbone_names_closest():
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'resnet51'.*'resnet50'"):
        build_model("resnet51", "se")


def test_unknown_option_named():
    with pytest.raises(OptionError, match=r"se: unknown option 'reductoin'.*reduction"):
        build_model("resnet50", "se", reductoin=8)


def test_reduction_larger_than_channels():
    with pytest.raises(OptionError, match=r"reduction=512 is larger than the channel count 64"):
        build_model("resnet18", "se", reduction=512)


def test_option_wrong_type():
    with pytest.raises(OptionError, match=r"cbam: option 'reduction' must be int"):
        build_model("resnet50", "cbam", reduction="16")


def test_even_kernel_rejected():
    with pytest.raises(OptionError, match=r"kernel_size=4 must be a positive odd"):
        build_model("resnet18", "cbam", kernel_size=4)


def test_plain_backbone_takes_no_options():
    with pytest.raises(OptionError, match="plain backbone takes no options"):
        build_model("resnet50", None, reduction=8)


def test_bad_stage_selection():
    with pytest.raises(OptionError, match=r"stage 5 is not one of 1, 2, 3, 4"):
        build_model("resnet50", "se", stages=[5])
    with pytest.raises(OptionError, match=r"layer4 has blocks 0..2; block index\(es\) \[3\]"):
        build_model("resnet50", "se", stages={4: [3]})
    with pytest.raises(OptionError, match=r"stages='paper' is not 'all' or a preset"):
        build_model("resnet50", "se", stages="paper")


def test_gate_combination_only_for_conv_kind():
    with pytest.raises(OptionError, match=r"option 'gate' combines a gate with a conv-kind"):
        build_model("resnet50", "se", gate="cbam")


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 1, 3, 64, 64), (64, 64)])
def test_wrong_input_rank(shape):
    model = build_model("resnet18", "se", num_classes=10)
    with pytest.raises(ValueError, match=r"expected a 4-D input \(N, C, H, W\), got shape"):
        model(torch.randn(*shape))


def test_wrong_input_channels():
    model = build_model("resnet18", "eca", num_classes=10)
    with pytest.raises(ValueError, match=r"expected 3 input channels"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("name", ["se", "cbam", "eca", "fca"])
def test_gate_rejects_3d_input(name):
    gate = modules.get(name).factory(64)
    with pytest.raises(ValueError, match=rf"{name}: expected a 4-D input"):
        gate(torch.randn(64, 8, 8))


def test_registry_clash_and_bad_factories():
    reg = Registry()
    register("mine", "gate", registry=reg)(lambda channels: torch.nn.Identity())
    with pytest.raises(RegistrationError, match=r"'mine' is already registered"):
        register("mine", "gate", registry=reg)(lambda channels: torch.nn.Identity())
    with pytest.raises(RegistrationError, match=r"must take the 'channels' argument first"):
        register("noarg", "gate", registry=reg)(lambda: torch.nn.Identity())
    with pytest.raises(RegistrationError, match=r"does not accept the default option\(s\) k"):
        register("nok", "gate", defaults={"k": 3}, registry=reg)(lambda channels: None)
    with pytest.raises(RegistrationError, match=r"kind 'gates' is not one of"):
        register("kindly", "gates", registry=reg)(lambda channels: None)
    with pytest.raises(RegistrationError, match=r"must be short, lowercase"):
        register("My Gate", "gate", registry=reg)(lambda channels: None)


def test_labels():
    assert modules.get("se").display() == "SE"
    assert modules.get("se").display({"reduction": 8}) == "SE(reduction=8)"
    assert build_model("resnet18", "fca", num_classes=10).attnbench_label == "FCA-TS"
    assert build_model("resnet18", num_classes=10).attnbench_label == "none"


def test_head_kind_replaces_global_pooling():
    class GeM(torch.nn.Module):  # generalised-mean pooling: a minimal head-kind module
        def __init__(self, channels, p=3.0):
            super().__init__()
            self.p = torch.nn.Parameter(torch.tensor(p))

        def forward(self, x):
            return x.clamp(min=1e-6).pow(self.p).mean((2, 3), keepdim=True).pow(1 / self.p)

    register("testgem", "head", defaults={"p": 3.0}, paper="test")(GeM)
    try:
        model = build_model("resnet18", "testgem", num_classes=10, p=2.0)
        assert isinstance(model.avgpool, GeM) and model.avgpool.p.item() == 2.0
        y = model(torch.randn(2, 3, 96, 96))
        assert y.shape == (2, 10)
        y.sum().backward()
        assert model.avgpool.p.grad is not None
    finally:
        modules.REGISTRY.remove("testgem")


@pytest.mark.parametrize("stages", [[], {}, {3: 0}, {"3": 0, "4": []}])
def test_stages_that_select_no_block_are_refused(stages):
    with pytest.raises(OptionError, match="selects no block"):
        build_model("resnet18", "se", stages=stages)
