"""TD top-down attention module: parameter/FLOP figures of the paper, semantics, API."""
import copy

import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from attnbench.modules import OptionError, build_model, get
from attnbench.modules.builder import plain_backbone
from attnbench.modules.td import TDBlock, recording, td_blocks


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- paper figures

@pytest.mark.parametrize("backbone, options, expected", [
    ("resnet50", {}, 27_645_992),                                       # TDjoint(T=2,m=1)
    ("resnet50", {"variant": "top"}, 27_056_168),                       # TDtop(T=2,m=1)
    ("resnet50", {"variant": "top", "m": 3}, 27_789_352),               # all of layer3+4
    ("resnet50", {"variant": "top", "m": 3, "stages": "paper-r50-m3"}, 27_655_208),
    ("resnet50", {"variant": "top", "m": 3, "stages": {3: 5, 4: "all"}}, 27_655_208),
    ("resnet101", {"stages": "paper-r101-l4"}, 45_937_704),             # "L4" row
    ("resnet101", {"stages": {4: "all"}}, 45_937_704),
    ("resnet101", {"stages": "paper-r101"}, 46_754_856),                # layer4 + 7 of layer3
    ("resnet101", {"stages": "paper"}, 46_754_856),
    ("resnet101", {"stages": {3: [0, 1, 2, 3, 4, 5, 6], 4: "all"}}, 46_754_856),
    ("resnet50", {"steps": 1}, 25_557_032),                             # T=1: plain ResNet-50
])
def test_param_counts_match_paper(backbone, options, expected):
    assert n_params(build_model(backbone, "td", **options)) == expected


def _fvcore_flops(model, size=224):
    from fvcore.nn import FlopCountAnalysis
    fca = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total()


@pytest.mark.parametrize("options, paper, measured", [
    ({}, 4.59e9, 4.581e9),
    ({"variant": "top"}, 4.59e9, 4.580e9),
    ({"variant": "top", "m": 3, "stages": "paper-r50-m3"}, 5.98e9, 5.969e9),
])
def test_fvcore_flops_resnet50(options, paper, measured):
    with torch.no_grad():
        flops = _fvcore_flops(build_model("resnet50", "td", **options))
    assert abs(flops - paper) / paper < 0.03
    assert abs(flops - measured) / measured < 0.005  # REFERENCE.md, authors' code


def test_fvcore_flops_grow_with_steps():
    with torch.no_grad():
        plain = _fvcore_flops(build_model("resnet18"), 112)
        t1, t2, t3 = (_fvcore_flops(build_model("resnet18", "td", steps=t, m=2), 112)
                      for t in (1, 2, 3))
    assert t1 == plain
    # each extra step re-runs both 3x3 convs of every layer3+4 block of resnet18
    # (m=2, whole body): 4 x 57.8 M + 4 x 115.6 M at 224^2; at 112^2 (layer4 at 4x4)
    # the searchlight and BN add ~0.1 M to the 233.5 M of the convs
    assert 0.233e9 < t2 - t1 < 0.235e9
    assert abs((t3 - t2) - (t2 - t1)) < 1e6


# ---------------------------------------------------------------- semantics

def _plain_block(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "bottleneck":
        return plain_backbone("resnet50", 10).layer3[0]  # with downsample, stride 2
    return plain_backbone("resnet18", 10).layer3[0]


def _randomise_bn(module):
    """Non-trivial BN affine parameters and running stats so BN choice matters."""
    g = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            with torch.no_grad():
                bn.weight.copy_(0.5 + torch.rand(c, generator=g))
                bn.bias.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g))


@pytest.mark.parametrize("kind, m", [("bottleneck", 1), ("bottleneck", 2), ("bottleneck", 3),
                                     ("basic", 1), ("basic", 2)])
@pytest.mark.parametrize("variant", ["joint", "top"])
@pytest.mark.parametrize("train", [False, True])
def test_steps1_equals_plain_block(kind, m, variant, train):
    plain = _plain_block(kind)
    _randomise_bn(plain)
    td = TDBlock(copy.deepcopy(plain), variant=variant, steps=1, m=m)
    assert not any(n.startswith(("w_", "bn_steps")) for n, _ in td.named_parameters())
    plain.train(train)
    td.train(train)
    x = torch.randn(2, plain.conv1.in_channels, 8, 8)
    assert torch.equal(td(x), plain(x))
    if train:  # running statistics were updated the same way
        for a, b in zip(plain.buffers(), td.buffers()):
            assert torch.equal(a, b)


def test_steps1_model_loads_plain_weights_strictly_and_matches():
    torch.manual_seed(0)
    plain = build_model("resnet50", num_classes=10).eval()
    _randomise_bn(plain)
    td = build_model("resnet50", "td", num_classes=10, steps=1, m=3).eval()
    td.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(td(x), plain(x))


def test_plain_weights_load_non_strict_into_td():
    plain = build_model("resnet50", num_classes=10)
    td = build_model("resnet50", "td", num_classes=10, m=2)
    result = td.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys
    assert all(k.split(".")[2] in ("w_t", "w_b", "w_s", "bn_steps") for k in result.missing_keys)
    assert {k.split(".")[0] for k in result.missing_keys} == {"layer3", "layer4"}
    assert any(k.endswith("bn_steps.0.bn2.weight") for k in result.missing_keys)


@pytest.mark.parametrize("variant", ["joint", "top"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_follows_eq_4_to_8(variant, train, grad):
    """T=2, m=1 Bottleneck against a direct transcription of eq. 1-8 (without autograd eq.
    8's product is written in place)."""
    plain = _plain_block("bottleneck")
    _randomise_bn(plain)
    td = TDBlock(plain, variant=variant, steps=2, m=1).train(train)
    _randomise_bn(td.bn_steps)
    ref = copy.deepcopy(td)  # BN running stats update in train mode: separate copies
    x = torch.randn(2, 512, 8, 8)
    with torch.set_grad_enabled(grad):
        out = td(x)

    relu = torch.relu
    bottom = relu(ref.bn2(ref.conv2(relu(ref.bn1(ref.conv1(x))))))
    top = ref.bn3(ref.conv3(bottom))                                    # eq. 1, t=1
    hidden = relu(ref.w_t(top.mean((2, 3), keepdim=True)))
    if variant == "joint":                                              # eq. 4
        hidden = torch.cat([hidden, relu(ref.w_b(bottom.mean((2, 3), keepdim=True)))], 1)
    s = ref.w_s(hidden)                                                 # eq. 4 / 5
    scaled = bottom * torch.sigmoid(s)                                  # eq. 6
    a = (scaled * s).sum(1, keepdim=True)                               # eq. 7
    bottom2 = scaled * torch.sigmoid(a)                                 # eq. 8
    top2 = ref.bn_steps[0]["bn3"](ref.conv3(bottom2))                   # eq. 1, t=2, own BN
    expected = relu(top2 + ref.downsample(x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_searchlight_mlp_shapes():
    td = TDBlock(_plain_block("bottleneck"), variant="joint", steps=2, m=3)
    # top = 1024 channels, bottom = block input (512); rd = 1024 // 16 = 64
    assert td.w_t.weight.shape == (64, 1024, 1, 1)
    assert td.w_b.weight.shape == (64, 512, 1, 1)
    assert td.w_s.weight.shape == (512, 128, 1, 1)
    assert all(c.bias is None for c in (td.w_t, td.w_b, td.w_s))
    assert sorted(td.bn_steps[0].keys()) == ["bn1", "bn2", "bn3"]
    top = TDBlock(_plain_block("bottleneck"), variant="top", steps=3, m=1)
    assert top.w_s.weight.shape == (256, 64, 1, 1) and not hasattr(top, "w_b")
    assert len(top.bn_steps) == 2 and list(top.bn_steps[1].keys()) == ["bn3"]


@pytest.fixture(scope="module")
def plain_blocks():
    """Plain torchvision blocks: with downsample (layer3.0) and with identity shortcut."""
    torch.manual_seed(0)
    r50, r18 = plain_backbone("resnet50", 10), plain_backbone("resnet18", 10)
    return {"bottleneck": [r50.layer3[0], r50.layer3[1]],
            "basic": [r18.layer3[0], r18.layer3[1]]}


def _check_gradients_and_records(blocks, steps, n=2):
    for name, blk in blocks.items():
        for pname, p in blk.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, pname)
            assert p.grad.abs().sum() > 0, (name, pname)
        # recorded: T-1 searchlights (N, C_bottom) and spatial maps (N, 1, H, W)
        c_bottom = getattr(blk, f"conv{blk._covered[0]}").in_channels
        assert len(blk.last_searchlights) == steps - 1
        assert len(blk.last_spatial_maps) == steps - 1
        for s, a in zip(blk.last_searchlights, blk.last_spatial_maps):
            assert s.shape == (n, c_bottom) and not s.requires_grad
            assert a.shape[:2] == (n, 1) and not a.requires_grad
            assert torch.isfinite(s).all() and torch.isfinite(a).all()
        assert not blk.record


@pytest.mark.parametrize("kind, m", [("bottleneck", 1), ("bottleneck", 2), ("bottleneck", 3),
                                     ("basic", 1), ("basic", 2)])
@pytest.mark.parametrize("variant", ["joint", "top"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_block_shapes_finite_gradients_and_recording(plain_blocks, kind, m, variant, steps,
                                                     train):
    for i, plain in enumerate(plain_blocks[kind]):
        td = TDBlock(copy.deepcopy(plain), variant=variant, steps=steps, m=m).train(train)
        x = torch.randn(2, plain.conv1.in_channels, 8, 8)
        with recording(td) as rec:
            out = td(x)
        assert list(rec) == [""]
        stride = 2 if i == 0 else 1
        c_out = (plain.bn3 if kind == "bottleneck" else plain.bn2).num_features
        assert out.shape == (2, c_out, 8 // stride, 8 // stride)
        assert torch.isfinite(out).all()
        out.square().sum().backward()
        _check_gradients_and_records({"block": td}, steps)
        if steps > 1:  # the bottom: block input for whole-body m, else after the stride
            full = m == (3 if kind == "bottleneck" else 2)
            size = 8 if full or kind == "bottleneck" and m == 2 else 8 // stride
            assert td.last_spatial_maps[0].shape[2:] == (size, size)


@pytest.mark.parametrize("backbone, options", [
    ("resnet18", {"variant": "joint", "steps": 3, "m": 2}),
    ("resnet50", {"variant": "joint", "steps": 2, "m": 1}),
    ("resnet50", {"variant": "top", "steps": 3, "m": 3}),
])
def test_model_shapes_finite_gradients_and_recording(backbone, options):
    torch.manual_seed(0)
    model = build_model(backbone, "td", num_classes=10, stages={3: [0, 1], 4: [0]}, **options)
    blocks = td_blocks(model)
    assert sorted(blocks) == ["layer3.0", "layer3.1", "layer4.0"]
    x = torch.randn(2, 3, 32, 32)  # layer3 at 2x2, layer4 at 1x1
    for train in (True, False):
        model.train(train)
        model.zero_grad(set_to_none=True)
        with recording(model) as rec:
            out = model(x)
        assert set(rec) == set(blocks)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        out.square().sum().backward()
        _check_gradients_and_records(blocks, options["steps"])


def test_recording_off_by_default_and_matches_attend():
    torch.manual_seed(0)
    td = TDBlock(_plain_block("bottleneck"), steps=2, m=1).eval()
    x = torch.randn(1, 512, 8, 8)
    with torch.no_grad():
        out = td(x)
        assert td.last_searchlights == [] and td.last_spatial_maps == []
        with recording(td) as rec:
            assert list(rec) == [""] and td.record
            assert torch.equal(td(x), out)  # recording does not change the output
        assert not td.record
        s, a = td.last_searchlights[0], td.last_spatial_maps[0]
        bottom = td.relu(td.bn2(td.conv2(td.relu(td.bn1(td.conv1(x))))))
        s_ref = td.searchlight(td.bn3(td.conv3(bottom)), bottom)
        torch.testing.assert_close(s, s_ref.flatten(1))
        torch.testing.assert_close(a, ((bottom * torch.sigmoid(s_ref)) * s_ref).sum(1, True))
        td(x)  # outside the context nothing new is recorded
        assert td.last_searchlights[0] is s


# ---------------------------------------------------------------- registry, labels, errors

def test_registry_entry_and_labels():
    spec = get("td")
    assert spec.kind == "block" and spec.stages == (3, 4)
    assert spec.display({}) == "TDjoint(T=2,m=1)"
    assert spec.display({"variant": "top", "m": 3}) == "TDtop(T=2,m=3)"
    assert spec.display({"steps": 3, "reduction": 8}) == "TDjoint(T=3,m=1,r=8)"
    assert build_model("resnet50", "td", variant="top", m=3).attnbench_label == "TDtop(T=2,m=3)"
    assert {"paper", "paper-r50-m3", "paper-r101", "paper-r101-l4"} <= set(spec.stage_presets)
    model = build_model("resnet50", "td", stages="paper")  # ResNet-50: all of layer3+4
    assert sorted(td_blocks(model)) == [f"layer3.{i}" for i in range(6)] + \
        [f"layer4.{i}" for i in range(3)]


@pytest.mark.parametrize("backbone, options, word", [
    ("resnet50", {"variant": "bottom"}, "variant"),
    ("resnet50", {"steps": 0}, "steps"),
    ("resnet50", {"steps": -1}, "steps"),
    ("resnet50", {"m": 0}, "m="),
    ("resnet50", {"m": 4}, "m="),
    ("resnet18", {"m": 3}, "m="),
    ("resnet50", {"reduction": 4096}, "reduction"),
    ("resnet50", {"reduction": 0}, "reduction"),
    ("resnet50", {"steps": 1, "reduction": 4096}, "reduction"),
    ("resnet50", {"steps": 2.5}, "steps"),
    ("resnet50", {"stages": "paper-r101"}, "paper-r101"),
    ("resnet50", {"stages": "papr"}, "stages"),
])
def test_option_errors_name_the_option(backbone, options, word):
    with pytest.raises(OptionError, match=word):
        build_model(backbone, "td", **options)


def test_wrapping_a_non_block_fails_clearly():
    with pytest.raises(OptionError, match="Bottleneck or BasicBlock"):
        TDBlock(torch.nn.Conv2d(3, 3, 1))


def test_basic_block_m2_covers_whole_body():
    td = TDBlock(_plain_block("basic"), variant="joint", steps=2, m=2)
    assert isinstance(_plain_block("basic"), BasicBlock)
    assert isinstance(_plain_block("bottleneck"), Bottleneck)
    assert td.w_b.in_channels == 128  # bottom = block input of resnet18 layer3.0
    assert sorted(td.bn_steps[0].keys()) == ["bn1", "bn2"]
