"""TDAF (modules/tdaf.py): MFBN statistics per flow with shared affine parameters,
R2DNS weight sharing and eq. 1/5 structure, ANAR widths (Table 1) and output
alignment, pinned ResNet-50 parameters/FLOPs, option errors, and (slow) ResNet-50
over every resolution of the sweep."""
import math

import pytest
import torch
from torch import nn

from attnbench import modules
from attnbench.modules import OptionError, build_model
from attnbench.modules.builder import plain_backbone
from attnbench.modules.tdaf import ANAR, MultiFlowBatchNorm2d, TDAFResNet, stage_counts, tdaf

from conftest import RESOLUTIONS, count

NUM_CLASSES = 5

# Ours, ResNet-50, 3 flows, 1000 classes (paper Table 3a: 29.9 M / 30.3 M / 30.5 M).
R50_PARAMS = {3: 25_815_699, 5: 26_526_675, 7: 26_817_875}
R50_PLAIN = 25_557_032
# fvcore, eval, 224^2, batch 1 (paper: 5.4 G / 5.8 G / 5.8 G).
R50_FLOPS = {3: 5_084_603_968, 5: 5_124_778_048, 7: 5_125_726_176}


def table1_params(c, depth):
    """ANAR parameters from Table 1's widths (bias-free convs + BN gamma/beta, 1x1
    skips at matching resolutions, final 1x1 conv with bias)."""
    trans = c // 8 if depth == 3 else c // 4
    n_down = (depth - 3) // 2
    ups = {3: [c // 32], 5: [c // 16, c // 32], 7: [c // 16, c // 16, c // 32]}[depth]
    total = c * trans + 2 * trans
    widths, prev = [trans], trans
    for _ in range(n_down):
        total += 9 * prev * (c // 8) + 2 * (c // 8)
        prev = c // 8
        widths.append(prev)
    for k, w in enumerate(ups):
        total += 16 * prev * w + 2 * w
        if k < n_down:
            total += widths[n_down - 1 - k] * w + 2 * w
        prev = w
    return total + prev + 1


def stage_widths(backbone):
    return [256, 512, 1024] if backbone in ("resnet50", "resnet101") else [64, 128, 256]


# ---------------------------------------------------------------- registry / options

def test_registered_as_network_with_label():
    spec = modules.get("tdaf")
    assert spec.kind == "network"
    assert dict(spec.defaults) == {"flows": 3, "anar": 3, "eta": 0.5}
    assert spec.display() == "TDAF(N=3,ANAR-3)"
    assert spec.display({"flows": 4, "anar": 7}) == "TDAF(N=4,ANAR-7)"
    assert spec.display({"eta": 1.0}) == "TDAF(N=3,ANAR-3,eta=1)"
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, anar=5)
    assert isinstance(model, TDAFResNet) and model.attnbench_label == "TDAF(N=3,ANAR-5)"


@pytest.mark.parametrize("opts,word", [
    ({"flows": 0}, "flows"), ({"flows": -1}, "flows"), ({"flows": 5}, "flows"),
    ({"anar": 4}, "anar"), ({"anar": 1}, "anar"), ({"anar": 9}, "anar"),
    ({"eta": 1.5}, "eta"), ({"eta": -0.1}, "eta"),
])
def test_option_errors_name_the_option(opts, word):
    with pytest.raises(OptionError, match=word):
        build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, **opts)
    with pytest.raises(OptionError, match=word):
        tdaf("resnet18", num_classes=NUM_CLASSES, **opts)


def test_option_type_errors_and_unknown_option():
    with pytest.raises(OptionError, match="flows"):
        build_model("resnet18", "tdaf", flows="3")
    with pytest.raises(OptionError, match="anar"):
        build_model("resnet18", "tdaf", anar=3.0)
    with pytest.raises(OptionError, match="flows"):
        tdaf("resnet18", flows=True)
    with pytest.raises(OptionError, match="stages"):
        build_model("resnet18", "tdaf", stages=[3])
    with pytest.raises(OptionError, match="reduction"):
        build_model("resnet18", "tdaf", reduction=4)


# ---------------------------------------------------------------- MFBN

def test_mfbn_separate_running_stats_shared_affine():
    bn = MultiFlowBatchNorm2d(4, flows=3)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert bn.weight.shape == (4,) and bn.running_mean.shape == (3, 4)
    bn.train()
    for _ in range(30):
        bn.flow = 0
        bn(torch.randn(8, 4, 6, 6))
        bn.flow = 1
        bn(torch.randn(8, 4, 6, 6) * 3 + 5)
    assert torch.allclose(bn.running_mean[0], torch.zeros(4), atol=0.1)
    assert torch.allclose(bn.running_mean[1], torch.full((4,), 5.0), atol=0.3)
    assert torch.allclose(bn.running_var[1], torch.full((4,), 9.0), rtol=0.15)
    assert torch.equal(bn.running_mean[2], torch.zeros(4))  # flow 2 never ran
    assert bn.num_batches_tracked.tolist() == [30, 30, 0]
    # eval: each flow normalises with its own statistics, one gamma/beta for all
    with torch.no_grad():
        bn.weight.fill_(2.0)
        bn.bias.fill_(1.0)
    bn.eval()
    x = torch.randn(2, 4, 3, 3) * 3 + 5
    for flow in (0, 1):
        bn.flow = flow
        mean = bn.running_mean[flow].view(1, -1, 1, 1)
        var = bn.running_var[flow].view(1, -1, 1, 1)
        want = (x - mean) / torch.sqrt(var + bn.eps) * 2.0 + 1.0
        assert torch.allclose(bn(x), want, atol=1e-5)
    bn.flow = 3
    with pytest.raises(ValueError, match="flow"):
        bn(x)


def test_mfbn_batch1_1x1_map_in_train_mode_uses_running_stats():
    bn = MultiFlowBatchNorm2d(3, flows=2).train()
    with torch.no_grad():
        bn.running_mean[1] = torch.tensor([1.0, 2.0, 3.0])
    bn.flow = 1
    x = torch.randn(1, 3, 1, 1)
    before = bn.running_mean.clone()
    y = bn(x)  # nn.BatchNorm2d raises here
    assert torch.allclose(y, (x - before[1].view(1, 3, 1, 1)) / math.sqrt(1 + bn.eps), atol=1e-6)
    assert torch.equal(bn.running_mean, before)
    assert bn.num_batches_tracked.tolist() == [0, 0]
    with pytest.raises(ValueError):
        nn.BatchNorm2d(3).train()(x)


def test_every_bn_is_mfbn_and_flows_keep_own_stats_in_model():
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES)
    mfbns = [m for m in model.modules() if isinstance(m, MultiFlowBatchNorm2d)]
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert mfbns and all(m.running_mean.shape[0] == 3 for m in mfbns)
    model.train()
    x = torch.randn(2, 3, 112, 112)
    x[:, :, :56] += 4.0  # flows see the image at different scales: different statistics
    with torch.no_grad():
        model(x)
    rm = model.bn1.running_mean
    assert not torch.allclose(rm[0], rm[1]) and not torch.allclose(rm[1], rm[2])
    # layer4 runs in flow 3 only (eq. 1 with N = 3): flows 1, 2 keep their initial stats
    rm4 = model.layer4[0].bn1.running_mean
    assert torch.equal(rm4[:2], torch.zeros_like(rm4[:2])) and rm4[2].abs().sum() > 0
    assert model.layer4[0].bn1.num_batches_tracked.tolist() == [0, 0, 1]
    assert model.layer3[0].bn1.num_batches_tracked.tolist() == [0, 1, 1]
    assert model.layer1[0].bn1.num_batches_tracked.tolist() == [1, 1, 1]
    # ANAR g_l feeds flows 2..3: slot 0 unused
    assert model.anar[0].trans[1].num_batches_tracked.tolist() == [0, 1, 1]


# ---------------------------------------------------------------- parameters / sharing

@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("depth", [3, 5, 7])
def test_params_are_backbone_plus_anars_only(backbone, depth):
    plain = count(plain_backbone(backbone, NUM_CLASSES))
    anars = sum(table1_params(c, depth) for c in stage_widths(backbone))
    for flows in (2, 3, 4):
        model = build_model(backbone, "tdaf", num_classes=NUM_CLASSES, flows=flows, anar=depth)
        assert count(model) == plain + anars, flows  # nothing per flow
        assert len(model.anar) == 3
        for anar, c in zip(model.anar, stage_widths(backbone)):
            assert count(anar) == table1_params(c, depth)
    # torchvision's parameter names are kept; the extra ones are the ANARs'
    names = set(dict(model.named_parameters()))
    plain_names = set(dict(plain_backbone(backbone, NUM_CLASSES).named_parameters()))
    assert plain_names <= names and all(n.startswith("anar.") for n in names - plain_names)


def test_resnet50_param_pins_vs_paper():
    assert count(plain_backbone("resnet50")) == R50_PLAIN
    for depth, want in R50_PARAMS.items():
        assert count(build_model("resnet50", "tdaf", anar=depth)) == want
    # Table 1's widths: ANAR-3 costs about 0.26 M (paper classification table: +4.3 M)
    assert abs(R50_PARAMS[3] - R50_PLAIN - 0.26e6) < 0.01e6


@pytest.mark.parametrize("depth", [3, pytest.param(5, marks=pytest.mark.slow),
                                   pytest.param(7, marks=pytest.mark.slow)])
def test_resnet50_fvcore_flops_pin(depth):
    fvcore = pytest.importorskip("fvcore.nn")
    model = build_model("resnet50", "tdaf", anar=depth).eval()
    flops = fvcore.FlopCountAnalysis(model, torch.randn(1, 3, 224, 224))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    assert flops.total() == pytest.approx(R50_FLOPS[depth], rel=1e-3)


def test_single_flow_is_the_plain_resnet():
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, flows=1)
    plain = plain_backbone("resnet18", NUM_CLASSES)
    assert len(model.anar) == 0 and count(model) == count(plain)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.1)
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model.load_state_dict(plain.state_dict())  # BN statistics (C,) go to every flow
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain.eval(), model.eval()
        assert torch.allclose(model(x), plain(x), atol=1e-5)
        plain.train(), model.train()
        assert torch.allclose(model(x), plain(x), atol=1e-5)
    # plain weights load into the 3-flow model too, statistics copied to every flow
    three = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES)
    missing, unexpected = three.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("anar.") for k in missing)
    assert torch.equal(three.bn1.running_mean, plain.bn1.running_mean.expand(3, -1))


# ---------------------------------------------------------------- R2DNS structure

def test_flow_depths_and_sizes_follow_eq1_eq2():
    assert stage_counts(3) == [2, 3, 4] and stage_counts(4) == [1, 2, 3, 4]
    assert stage_counts(1) == [4]
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, flows=4).eval()
    res = 196  # odd sizes appear: 196 -> 98 -> 49 -> 25
    with torch.no_grad():
        outs = model.forward_flows(torch.randn(1, 3, res, res))
    for n, out in enumerate(outs, start=1):
        assert sorted(out) == list(range(1, stage_counts(4)[n - 1] + 1))
        side = res
        for _ in range(4 - n):
            side = math.ceil(side / 2)
        for l, y in out.items():
            assert y.shape[-1] == y.shape[-2] == math.ceil(side / 2 ** (l + 1)), (n, l)


def test_eq5_attention_indexing():
    """With every ANAR saturated to g = 0, eq. 5 leaves eta * h_l on the stages an
    earlier flow feeds (1..3 of the last flow) and plain h_4."""
    eta = 0.25
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, eta=eta).eval()
    with torch.no_grad():
        for anar in model.anar:
            anar.out.weight.zero_()
            anar.out.bias.fill_(-100.0)
        x = torch.randn(1, 3, 96, 96)
        model.set_flow(2)
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for l in (1, 2, 3):
            y = getattr(model, f"layer{l}")(y) * eta
        y = model.layer4(y)
        want = model.fc(torch.flatten(model.avgpool(y), 1))
        assert torch.allclose(model(x), want, atol=1e-5)
        # with real attention the output differs (the ANARs do act)
        ref = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, eta=eta).eval()
        assert not torch.allclose(ref(x), want, atol=1e-3)


def test_anar_output_aligned_to_target_size():
    for depth in (3, 5, 7):
        g = ANAR(64, depth, flows=2).eval()
        for side, target in [(7, 14), (7, 13), (4, 7), (1, 2), (1, 1), (13, 25)]:
            a = g(torch.randn(1, 64, side, side), (target, target))
            assert a.shape == (1, 1, target, target), (depth, side, target)
            assert ((a > 0) & (a < 1)).all()
        with pytest.raises(RuntimeError, match="smaller"):
            g(torch.randn(1, 64, 4, 4), (9, 9))


# ---------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("depth", [3, 5, 7])
def test_shapes_finite_and_gradients_reach_every_parameter(depth):
    model = build_model("resnet18", "tdaf", num_classes=NUM_CLASSES, anar=depth)
    # 64^2: 1x1 maps with batch 1 in train mode (flow 1 at 16^2, ANAR-7 bottom);
    # 84^2: odd sizes (flow 1 at 21^2). 168..448 on ResNet-18: test_all_modules.py
    for res in (64, 84):
        for batch in (1, 2):
            x = torch.randn(batch, 3, res, res)
            model.eval()
            with torch.no_grad():
                y = model(x)
            assert y.shape == (batch, NUM_CLASSES) and torch.isfinite(y).all()
            model.train()
            model.zero_grad(set_to_none=True)
            y = model(x)
            assert y.shape == (batch, NUM_CLASSES) and torch.isfinite(y).all()
            y.square().mean().backward()
            for n, p in model.named_parameters():
                assert p.grad is not None, (res, batch, n)
                assert torch.isfinite(p.grad).all(), (res, batch, n)
                if n.startswith("anar."):
                    assert p.grad.abs().sum() > 0, (res, batch, n)


def test_four_flows_train_backward():
    model = build_model("resnet34", "tdaf", num_classes=NUM_CLASSES, flows=4).train()
    y = model(torch.randn(2, 3, 84, 84))
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_resnet50_every_resolution_batch_mode():
    """Train-mode forward at batch 1 (Multi-Flow BN's batch statistics over one sample's
    pixels) at every resolution; eval and batch 2 are in test_all_modules."""
    model = build_model("resnet50", "tdaf", num_classes=10).train()
    for res in RESOLUTIONS:
        with torch.no_grad():
            y = model(torch.randn(1, 3, res, res))
        assert y.shape == (1, 10) and torch.isfinite(y).all(), res
