"""AW-convolution (modules/aw.py): exactness against a per-sample reference, the
zero-attention limit, gradients, shapes, parameter budgets against the AW paper."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnbench import modules
from attnbench.modules import OptionError, build_model
from attnbench.modules.aw import AWConv2d

R50_PLAIN = 25_557_032          # REFERENCE.md
R50_SE = 28_071_976             # REFERENCE.md (bias-free SE)
R50_AW = 25_722_240             # ours; paper Table 1: 25.72 M
R50_AW_SE = 28_237_184          # ours; paper Table 1: 28.25 M
R101_AW = 44_862_880            # ours; paper Table 1: 44.95 M (see test below)


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def make_aw(c1=16, c2=24, stride=1, groups=1, bias=False, dilation=1, padding_mode="zeros",
            reduction=4, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c1, c2, 3, stride=stride, padding=dilation, dilation=dilation,
                     groups=groups, bias=bias, padding_mode=padding_mode)
    m = AWConv2d(conv, reduction=reduction).double()
    # non-trivial BN statistics and affine parameters
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


def reference_attention(m, x1):
    """Eq. 7-8 for ONE sample, literally (eval-mode BN): A of shape (1, C2, C1/g, h, w)."""
    pool, conv1, bn1, _, conv2, bn2, _ = m.branch
    c2, c1g, h, w = m.weight.shape
    a0 = F.adaptive_avg_pool2d(x1, (h, w))
    a1 = F.relu(F.batch_norm(F.conv2d(a0, conv1.weight), bn1.running_mean, bn1.running_var,
                             bn1.weight, bn1.bias, False, 0.0, bn1.eps))
    a2 = torch.sigmoid(F.batch_norm(F.conv2d(a1, conv2.weight), bn2.running_mean,
                                    bn2.running_var, bn2.weight, bn2.bias, False, 0.0, bn2.eps))
    r = c1g  # r_C1 = C1 (per group: the C1/g inputs each output channel sees)
    return (a2.reshape(1, c2, c1g // r, h, w).unsqueeze(3)
            .expand(1, c2, c1g // r, r, h, w).reshape(1, c2, c1g, h, w))


def loop_forward(m, x, attention):
    """Eq. 5-6 one sample at a time: O[l] = conv(I[l], K + A[l] (.) K)."""
    outs = []
    k = m.weight
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        if m.padding_mode != "zeros":
            xi = F.pad(xi, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            pad = 0
        else:
            pad = m.padding
        ak = k + attention[i] * k
        outs.append(F.conv2d(xi, ak, m.bias, m.stride, pad, m.dilation, m.groups))
    return torch.cat(outs)


def test_registered():
    spec = modules.get("aw")
    assert spec.kind == "conv"
    assert spec.defaults == {"reduction": 16, "attn_bias": False, "formulation": "auto"}
    assert spec.display({"formulation": "taps"}) == "AW(formulation=taps)"
    assert spec.stages == (1, 2, 3, 4)
    assert spec.display() == "AW"
    assert spec.display({"reduction": 8}) == "AW(reduction=8)"
    assert spec.factory is AWConv2d


FORMS = ["grouped", "loop", "taps", "fused"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_matches_per_sample_reference_eval(batch, stride, form):
    m = make_aw(stride=stride).eval()
    m.formulation = form
    x = torch.randn(batch, 16, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        att = torch.cat([reference_attention(m, x[i:i + 1]) for i in range(batch)])
        ref = loop_forward(m, x, att)
        out = m(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # the attention really varies per sample and is not trivially zero
    assert att.abs().min() > 1e-3
    if batch > 1:
        assert (att[0] - att[1]).abs().max() > 1e-6


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cfg", [
    dict(stride=1), dict(stride=2), dict(stride=2, bias=True), dict(groups=2, stride=2),
    dict(groups=4, bias=True), dict(dilation=2), dict(padding_mode="reflect", stride=2),
])
def test_matches_per_sample_loop_train(cfg, form):
    """Train mode (BN batch statistics couple the samples' A, so A comes from the module)."""
    m = make_aw(**cfg).train()
    m.formulation = form
    x = torch.randn(3, 16, 10, 7, dtype=torch.float64)
    with torch.no_grad():
        att = m.attention_maps(x)
        assert att.shape == (3, 24, 1, 3, 3)
        ref = loop_forward(m, x, att.expand(-1, -1, m.weight.shape[1], -1, -1))
        out = m(x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cfg", [dict(stride=1), dict(stride=2, bias=True), dict(groups=2)])
def test_zero_attention_gives_plain_conv(cfg, monkeypatch):
    m = make_aw(**cfg).eval()
    x = torch.randn(3, 16, 8, 9, dtype=torch.float64)
    plain = F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    # (a) the attention branch replaced by zeros
    monkeypatch.setattr(m, "attention_maps",
                        lambda inp: torch.zeros(inp.shape[0], 24, 1, 3, 3, dtype=inp.dtype))
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain, atol=1e-10, rtol=0)
    monkeypatch.undo()
    # (b) the real branch driven to sigmoid(-1e4) == 0 through its last BN
    with torch.no_grad():
        m.branch[5].weight.zero_()
        m.branch[5].bias.fill_(-1e4)
        torch.testing.assert_close(m(x), plain, atol=1e-10, rtol=0)
        # and A = 1 doubles the weights: conv(I, 2K)
        m.branch[5].bias.fill_(1e4)
        torch.testing.assert_close(
            m(x), F.conv2d(x, 2 * m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups),
            atol=1e-10, rtol=0)


def test_one_grouped_conv_per_batch(monkeypatch):
    """The whole batch goes through ONE grouped F.conv2d (groups = N*g), no per-sample loop."""
    calls = []
    real = torch.nn.functional.conv2d

    def spy(inp, weight, *args, **kwargs):
        groups = kwargs.get("groups", args[4] if len(args) > 4 else 1)
        calls.append((tuple(inp.shape), tuple(weight.shape), groups))
        return real(inp, weight, *args, **kwargs)

    m = make_aw(groups=2, stride=2)
    m.formulation = "grouped"
    x = torch.randn(5, 16, 9, 9, dtype=torch.float64)
    monkeypatch.setattr(torch.nn.functional, "conv2d", spy)
    m(x)
    big = [c for c in calls if c[1][2:] == (3, 3)]
    assert big == [((1, 5 * 16, 9, 9), (5 * 24, 8, 3, 3), 5 * 2)]
    assert len(calls) == 1  # the branch's pointwise convs run as F.linear


@pytest.mark.parametrize("cfg", [dict(stride=2, bias=True), dict(groups=2), dict(dilation=2)])
def test_formulations_have_equal_gradients(cfg):
    """Train mode, float64: every formulation gives the same output and gradients
    (input, conv weight and bias, and the attention branch's parameters)."""
    results = {}
    for form in FORMS:
        m = make_aw(**cfg).train()
        m.formulation = form
        x = torch.randn(3, 16, 10, 7, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
        x.requires_grad_(True)
        out = m(x)
        out.pow(2).sum().backward()
        results[form] = [out.detach(), x.grad] + [p.grad for p in m.parameters()]
    for form in FORMS[1:]:
        for a, b in zip(results["grouped"], results[form]):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_automatic_choice_follows_the_shape():
    from attnbench.modules.aw import choose_formulation, use_formulation
    # ResNet-50 at 224: layer1 (56x56 out, 64 in) and layer4 (7x7 out, 512 in)
    # (batch 8 on the CPU: layers 1-2 grouped, layers 3-4 fused, or taps with groups > 1)
    assert choose_formulation(8, 64, 9, 56 * 56, "cpu") == "grouped"
    assert choose_formulation(8, 128, 9, 28 * 28, "cpu") == "grouped"
    assert choose_formulation(8, 512, 9, 7 * 7, "cpu") == "fused"
    assert choose_formulation(8, 512, 9, 14 * 14 // 4, "cpu") == "fused"  # stride 2 too
    assert choose_formulation(8, 512, 9, 7 * 7, "cpu", dense=False) == "taps"
    assert choose_formulation(8, 512, 9, 7 * 7, "cpu", grad=True) == "taps"  # training
    assert choose_formulation(8, 128, 9, 28 * 28, "cpu", grad=True) == "grouped"
    assert choose_formulation(16, 256, 9, 14 * 14, "meta") == "fused"
    # batch 1: layer 3 (196 x 4 >= 256) grouped, layer 4 (49 x 4 < 512) fused (measured)
    assert choose_formulation(1, 256, 9, 14 * 14, "cpu") == "grouped"
    assert choose_formulation(1, 512, 9, 7 * 7, "cpu") == "fused"
    assert choose_formulation(1, 512, 9, 7 * 7, "cpu", grad=True) == "taps"
    assert choose_formulation(2, 256, 9, 14 * 14, "cpu") == "fused"  # from batch 2: C1/g
    assert choose_formulation(4, 128, 9, 28 * 28, "meta") == "grouped"  # FLOPs: CPU's choice
    assert "loop" not in {choose_formulation(n, c, 9, hw, dev, dense, grad)
                          for n in (1, 2, 8) for c in (16, 64, 512) for hw in (4, 49, 3136)
                          for dev in ("cpu", "cuda") for dense in (True, False)
                          for grad in (True, False)}  # never faster than grouped (measured)
    assert choose_formulation(1, 512, 9, 7 * 7, "cuda") == "taps"
    assert choose_formulation(8, 64, 9, 56 * 56, "cuda") == "grouped"
    m = make_aw()
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with use_formulation("taps"):
        assert m.formulation_for(x, m.padding) == "taps"
    assert m.formulation_for(x, m.padding) == "grouped"  # 81 output positions > 16 inputs
    with pytest.raises(OptionError, match="formulation must be one of"):
        with use_formulation("fast"):
            pass


def test_gradients_reach_every_parameter():
    m = make_aw(stride=2, bias=True).train()
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64, requires_grad=True)
    m(x).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_in_aw_resnet18():
    torch.manual_seed(0)
    model = build_model("resnet18", "aw", num_classes=10).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    n_aw = sum(isinstance(mod, AWConv2d) for mod in model.modules())
    assert n_aw == 16  # BasicBlock: conv1 and conv2 of all 8 blocks


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 13), (7, 9), (15, 4)])
@pytest.mark.parametrize("stride", [1, 2])
def test_shapes_at_odd_sizes(size, stride):
    m = make_aw(stride=stride, bias=True).train()
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1).double()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    out = m(x)
    assert out.shape == conv(x).shape
    assert torch.isfinite(out).all()
    m.eval()
    assert m(x[:1]).shape == conv(x[:1]).shape


def test_empty_batch():
    m = make_aw(stride=2)
    assert m(torch.randn(0, 16, 9, 9, dtype=torch.float64)).shape == (0, 24, 5, 5)


def test_keeps_the_conv_parameters():
    conv = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=True)
    m = AWConv2d(conv)
    assert m.weight is conv.weight and m.bias is conv.bias
    assert (m.stride, m.padding, m.dilation, m.groups) == ((2, 2), (1, 1), (1, 1), 1)
    # the branch: pool to 3x3, 1x1 32->2 (no bias), BN, ReLU, 1x1 2->32 (no bias), BN, sigmoid
    assert m.branch[0].output_size == (3, 3)
    assert m.branch[1].weight.shape == (2, 32, 1, 1) and m.branch[1].bias is None
    assert m.branch[4].weight.shape == (32, 2, 1, 1) and m.branch[4].bias is None
    biased = AWConv2d(nn.Conv2d(32, 32, 3, padding=1), attn_bias=True)
    assert biased.branch[1].bias is not None and biased.branch[4].bias is not None


def test_state_dict_keeps_torchvision_keys():
    """Plain ResNet weights load into AW-ResNet; only the attention branches are new."""
    plain = build_model("resnet18", None, num_classes=10)
    aw = build_model("resnet18", "aw", num_classes=10)
    res = aw.load_state_dict(plain.state_dict(), strict=False)
    assert res.unexpected_keys == []
    assert res.missing_keys and all(".branch." in k for k in res.missing_keys)


def test_bad_options_and_inputs():
    with pytest.raises(OptionError, match="reduction"):
        AWConv2d(nn.Conv2d(8, 8, 3, padding=1), reduction=16)
    with pytest.raises(OptionError):
        AWConv2d(nn.Linear(8, 8))
    with pytest.raises(OptionError, match="reduction"):
        build_model("resnet18", "aw", reduction="16")
    m = AWConv2d(nn.Conv2d(16, 16, 3, padding=1), reduction=4)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(16, 5, 5))


def test_param_count_aw_resnet50():
    model = build_model("resnet50", "aw")
    n = nparams(model)
    assert n == R50_AW
    assert abs(n - 25.72e6) / 25.72e6 < 0.005
    # the branch per bottleneck: C^2/8 (two bias-free pointwise convs, C -> C/16 -> C)
    # + BN(C/16) + BN(C); widths 64/128/256/512, blocks 3/4/6/3
    per_block = {c: c * c // 8 + 2 * (c // 16 + c) for c in (64, 128, 256, 512)}
    expected = sum(k * per_block[c] for k, c in zip((3, 4, 6, 3), (64, 128, 256, 512)))
    assert expected == 165_208 == n - R50_PLAIN
    assert round(n / 1e6, 2) == 25.72  # paper Table 1; "+0.16 M" (Table 1 25.72 - 25.56)
    # with biases in the pointwise convs it would round to 25.73 M
    assert round(nparams(build_model("resnet50", "aw", attn_bias=True)) / 1e6, 2) == 25.73


def test_param_count_aw_se_resnet50():
    model = build_model("resnet50", "aw", gate="se")
    assert model.attnbench_label == "AW-SE"
    n = nparams(model)
    assert n == R50_AW_SE == R50_SE + (R50_AW - R50_PLAIN)
    assert abs(n - 28.25e6) / 28.25e6 < 0.005


def test_param_count_aw_resnet101():
    # paper Table 1 says 44.95 M (+0.40 M); the same branch on ResNet-101 adds 0.31 M.
    # The paper's ResNet-101 rows are also off elsewhere (SE-ResNet101 49.33 M vs 49.29 M).
    n = nparams(build_model("resnet101", "aw"))
    assert n == R101_AW
    assert n - 44_549_160 == 313_720


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_aw_resnet50_forward(mode):
    torch.manual_seed(0)
    model = build_model("resnet50", "aw")
    model.train(mode == "train")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_fused_taps_cache_follows_the_weight():
    """The stacked taps are kept between inference calls, and rebuilt when K changes."""
    m = make_aw(stride=1).eval()
    m.formulation = "fused"
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        first = m(x)
        stacked = m._tap_cache[1]
        assert torch.equal(m(x), first) and m._tap_cache[1] is stacked   # reused
        m.weight.mul_(2)                                                  # K changes in place
        m.formulation = "loop"
        ref = m(x)
        m.formulation = "fused"
        torch.testing.assert_close(m(x), ref, atol=1e-10, rtol=0)
        assert m._tap_cache[1] is not stacked


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=3, stride=3, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    dict(kernel_size=3, stride=2, padding=0),
    dict(kernel_size=5, stride=2, padding=2, bias=True),
    dict(kernel_size=1, stride=2, padding=0),
])
def test_fused_phases_match_the_reference_at_any_stride(conv):
    """``fused`` splits a strided input into phases (one GEMM each): equal to the
    per-sample float64 reference, output and gradients, for strides, dilations,
    paddings and kernels beyond ResNet's 3x3."""
    torch.manual_seed(0)
    m = AWConv2d(nn.Conv2d(16, 24, bias=conv.pop("bias", False), **conv), reduction=4).double()
    x = torch.randn(3, 16, 11, 10, dtype=torch.float64, requires_grad=True)
    grads = {}
    for form in ("fused", "loop"):
        m.formulation = form
        m.zero_grad()
        x.grad = None
        out = m(x)
        out.pow(2).sum().backward()
        grads[form] = [out.detach(), x.grad] + [p.grad for p in m.parameters()]
    with torch.no_grad():
        ref = loop_forward(m, x, m.attention_maps(x).expand(-1, -1, 16, -1, -1))
    torch.testing.assert_close(grads["fused"][0], ref, atol=1e-10, rtol=0)
    for a, b in zip(grads["fused"], grads["loop"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cfg", [dict(stride=1), dict(stride=2, bias=True),
                                 dict(stride=2, dilation=2)])
def test_compiled_accumulation_equals_eager_and_the_reference(cfg, monkeypatch):
    """``fused`` on the CPU without autograd sums its shifted partial outputs with one
    torch.compile'd kernel: equal to the eager ops and to the per-sample float64 reference
    (here above the size threshold, lowered to 0; float64)."""
    from attnbench.modules import aw as awmod
    m = make_aw(**cfg).eval()
    m.formulation = "fused"
    x = torch.randn(4, 16, 12, 13, dtype=torch.float64)
    seen = []
    real = awmod._sum_shifted
    monkeypatch.setattr(awmod, "_sum_shifted", lambda *a: seen.append(1) or real(*a))
    with torch.no_grad():
        monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", None)
        eager = m(x)
        assert seen == [1]                       # eager: the Python function ran
        ref = loop_forward(m, x, m.attention_maps(x).expand(-1, -1, 16, -1, -1))
        monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(awmod, "_compiled", {})
        compiled = m(x)
    assert {k[0] for k in awmod._compiled} == {awmod._sum_padded, awmod._attention_eval}
    assert not awmod._compile_failed
    assert compiled.is_contiguous() and compiled.shape == ref.shape
    torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=0)
    torch.testing.assert_close(compiled, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("size", [(12, 13), (7, 7), (56, 56), (2, 5), (1, 1)])
@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (2, 3)])
def test_compiled_pool_equals_adaptive_average_pooling(size, kernel, monkeypatch):
    """F1's pool (eq. 7) as compiled window means equals PyTorch's adaptive pool (float64):
    the same windows, overlapping where the size is not a multiple of the kernel and
    repeated on maps smaller than it."""
    from attnbench.modules import aw as awmod
    monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(awmod, "_compiled", {})
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    pool = torch.nn.AdaptiveAvgPool2d(kernel)
    with torch.no_grad():
        out = awmod._pool(x, pool)
    assert [k[0] for k in awmod._compiled] == [awmod._pool_windows]
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(x, kernel), atol=1e-14, rtol=0)


@pytest.mark.parametrize("cfg", [dict(), dict(stride=2, bias=True), dict(groups=2),
                                 dict(padding_mode="reflect", dilation=2)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_aw_forward_with_compiled_kernels_equals_eager(cfg, mode, monkeypatch):
    """A whole AW-conv with its compiled kernels gives the output of the eager ops and of
    the per-sample reference (float64, no autograd), each formulation: in eval mode F1 is
    one compiled kernel (with 1 + A for ``fused``, K * (1 + A) for ``grouped``/``loop``;
    here with Pointconv biases and an affine-free BN), in train mode (BN batch statistics)
    only the pool is."""
    from attnbench.modules import aw as awmod
    m = make_aw(**cfg).train(mode == "train")
    m.branch[1].bias = nn.Parameter(torch.randn(4, dtype=torch.float64))
    bn = nn.BatchNorm2d(4, affine=False).double().train(mode == "train")
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    m.branch[2] = bn
    x = torch.randn(3, 16, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        for form in FORMS:
            m.formulation = form
            monkeypatch.setattr(awmod, "_compiled", {})
            monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", None)
            state = copy.deepcopy(m.state_dict())
            att = m.attention_maps(x)
            m.load_state_dict(state)  # train mode: undo that call's running-stat update
            ref = loop_forward(m, x, att.expand(-1, -1, m.weight.shape[1], -1, -1))
            m.load_state_dict(state)
            eager = m(x)
            m.load_state_dict(state)
            monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 0)
            out = m(x)
            torch.testing.assert_close(out, eager, atol=1e-12, rtol=0)
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
            kernels = {k[0] for k in awmod._compiled}
            branch = awmod._attention_eval if mode == "eval" else awmod._pool_windows
            if form == "taps" or (form == "fused" and m.groups > 1):
                branch = awmod._pool_windows  # taps takes A itself
            assert branch in kernels
            assert (awmod._sum_padded in kernels) == (form == "fused" and m.groups == 1)
            assert not awmod._compile_failed


def test_compiled_branch_yields_to_hooks_and_overrides(monkeypatch):
    """F1 stays eager where a compiled kernel would skip something: a forward hook on a
    branch module (it fires), a global forward hook, an ``attention_maps`` overridden on
    the instance or by a subclass (it is called), a BN switched to train mode alone."""
    from attnbench.modules import aw as awmod
    monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 0)
    with torch.no_grad():
        m = make_aw().eval()
        x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
        assert m._branch_compiles(x)
        fired = []
        handle = m.branch[0].register_forward_hook(lambda *a: fired.append("pool"))
        m(x)
        assert not m._branch_compiles(x) and fired == ["pool"]
        handle.remove()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            assert not m._branch_compiles(x)
        finally:
            handle.remove()
        assert m._branch_compiles(x)

        class Mine(AWConv2d):
            def attention_maps(self, inp):
                fired.append("subclass")
                return super().attention_maps(inp)
        sub = Mine(nn.Conv2d(16, 24, 3, padding=1, bias=False), reduction=4).double().eval()
        sub(x)
        assert fired[-1] == "subclass" and not sub._branch_compiles(x)
        m.attention_maps = lambda inp: fired.append("instance") or AWConv2d.attention_maps(m, inp)
        m(x)
        assert fired[-1] == "instance" and not m._branch_compiles(x)
        del m.attention_maps
        m.branch[5].train()
        assert not m._branch_compiles(x)
        m.branch[5].eval()
        assert m._branch_compiles(x)
    assert not m._branch_compiles(x)  # autograd records


def _backends():
    from attnbench.modules import aw as awmod
    names = list(awmod.TAP_GEMMS)
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        names.remove("onednn")
    return names


@pytest.mark.parametrize("backend", _backends())
def test_each_tap_gemm_backend_gives_the_product(backend):
    """fused's GEMM: the phase's (N*Hp*Wp, C1) rows times the taps transposed, in float32,
    against the float64 product, on a contiguous view and on a stride-2 phase."""
    from attnbench.modules import aw as awmod
    x, taps = torch.randn(2, 16, 9, 11), torch.randn(3 * 24, 16)
    for xp in (x.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)[:, 1::2, 0::2]):
        with torch.no_grad():
            out = awmod.TAP_GEMMS[backend](xp, taps)
        ref = xp.double().reshape(-1, 16) @ taps.double().t()
        assert out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", _backends() + ["auto"])
@pytest.mark.parametrize("cfg", [dict(stride=1), dict(stride=2, bias=True),
                                 dict(stride=2, dilation=2)])
def test_fused_with_each_tap_gemm_equals_the_reference(backend, cfg, monkeypatch):
    """The whole fused AW-conv in float32 with each GEMM backend (and the timed choice)
    against the per-sample float64 reference."""
    from attnbench.modules import aw as awmod
    monkeypatch.setattr(awmod, "TAP_GEMM", backend)
    monkeypatch.setattr(awmod, "_gemm_choice", {})
    m64 = make_aw(**cfg).eval()
    m = copy.deepcopy(m64).float()
    m.formulation = "fused"
    x = torch.randn(3, 16, 12, 13)
    with torch.no_grad():
        out = m(x)
        x64 = x.double()
        ref = loop_forward(m64, x64, m64.attention_maps(x64).expand(-1, -1, 16, -1, -1))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_auto_tap_gemm_times_the_candidates_once_per_shape(monkeypatch):
    """``auto`` times each candidate at a shape's first call and keeps the fastest; where
    autograd, float64 or a counter's mode is involved it uses ``mm`` without timing."""
    from attnbench.modules import aw as awmod
    monkeypatch.setattr(awmod, "_gemm_choice", {})
    timed = []
    real = awmod._fastest
    monkeypatch.setattr(awmod, "_fastest", lambda names, *a: timed.append(names) or real(names, *a))
    xp, taps = torch.randn(2, 16, 5, 6).permute(0, 2, 3, 1), torch.randn(48, 16)
    with torch.no_grad():
        awmod._tap_gemm(xp, taps)
        awmod._tap_gemm(xp, taps)
        assert timed == [awmod._gemm_candidates(xp)] and len(timed[0]) >= 2
        (choice,) = awmod._gemm_choice.values()
        assert choice in awmod._gemm_candidates(xp)
        assert awmod._gemm_candidates(xp.double()) == ["mm"]
        with _Passthrough():
            assert awmod._gemm_candidates(xp) == ["mm"]
    assert awmod._gemm_candidates(xp) == ["mm"]                      # grad enabled


def test_gemm_timing_keeps_the_fastest_backend_that_runs(monkeypatch):
    """The tuner's choice: a backend that is slower in every round loses, one that raises
    is never chosen, and with none that runs ``mm`` is kept."""
    import time
    from attnbench.modules import aw as awmod

    def slow(xp, taps):
        time.sleep(0.002)
        return awmod._gemm_mm(xp, taps)

    def broken(xp, taps):
        raise RuntimeError("not in this build")
    monkeypatch.setitem(awmod.TAP_GEMMS, "slow", slow)
    monkeypatch.setitem(awmod.TAP_GEMMS, "broken", broken)
    xp, taps = torch.randn(2, 16, 5, 6).permute(0, 2, 3, 1), torch.randn(48, 16)
    with torch.no_grad():
        assert awmod._fastest(["slow", "broken", "mm"], xp, taps) == "mm"
        assert awmod._fastest(["broken", "slow"], xp, taps) == "slow"
        assert awmod._fastest(["broken"], xp, taps) == "mm"


class _Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_compiled_accumulation_is_skipped_where_it_must_not_run(monkeypatch):
    """Autograd, tensors not on the CPU, a torch function mode (the FLOP counters) or an
    output under the threshold keep the eager ops."""
    from attnbench.modules import aw as awmod
    monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 100)
    z = torch.zeros(1, 2, 3, 4, 5)
    with torch.no_grad():
        assert awmod._compiled_applies(z, 120)
        assert not awmod._compiled_applies(z, 96)  # 96 < 100
        assert not awmod._compiled_applies(z.to("meta"), 120)
        with _Passthrough():
            assert not awmod._compiled_applies(z, 120)
    assert not awmod._compiled_applies(z, 120)            # grad enabled


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    from attnbench.modules import aw as awmod
    m = make_aw().eval()
    m.formulation = "fused"
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", None)
        eager = m(x)

        def broken(fn, **kwargs):
            def call(*args):
                raise RuntimeError("no C++ compiler\nsecond line")
            return call
        monkeypatch.setattr(awmod, "COMPILED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(awmod, "_compiled", {})
        monkeypatch.setattr(awmod, "_compile_failed", False)
        monkeypatch.setattr(torch, "compile", broken)
        expected = r"aw: torch.compile .* failed \(RuntimeError: no C\+\+ compiler\); using eager"
        with pytest.warns(RuntimeWarning, match=expected):
            out = m(x)
        assert awmod._compile_failed
        torch.testing.assert_close(m(x), eager, atol=0, rtol=0)  # no second attempt, no warning
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_branch_as_linear_equals_the_module_sequence(mode, batch):
    """attention_maps runs Pointconv1/2 as F.linear on the (N*h*w, C) matrix: the same A as
    the branch's nn.Sequential on the (N, C, h, w) map, float64, in train mode with the
    same BN batch statistics and running-statistic updates, and the same gradients."""
    import copy
    m = make_aw(bias=True).train(mode == "train")
    seq = copy.deepcopy(m)
    x = torch.randn(batch, 16, 10, 7, dtype=torch.float64)
    fired = []
    m.branch[1].register_forward_hook(lambda *args: fired.append(1))
    a = m.attention_maps(x)
    assert fired == ([1] if batch == 1 else [])  # batch >= 2: F.linear, not the conv module
    b = seq.branch(x).unsqueeze(2)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    for (name, p), q in zip(m.branch.named_parameters(), seq.branch.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=name)
    for (name, buf), ref in zip(m.branch.named_buffers(), seq.branch.buffers()):
        torch.testing.assert_close(buf, ref, atol=1e-12, rtol=0, msg=name)


def test_flops_of_aw_resnet50_do_not_depend_on_the_formulation():
    """All three counters at 224², batch 1, with the automatic choice (grouped, and fused
    in layer 4, whose stride-2 block reorders its taps under fvcore's JIT trace) and with
    grouped forced everywhere: the same multiply-adds (fused's GEMMs are the dense conv's).
    Plain ResNet-50 is 4.112 G (fvcore); the branch adds 2.8 M."""
    from attnbench.modules.aw import use_formulation
    from attnbench.profilers import flops
    model = build_model("resnet50", "aw")
    auto = [(c.counter, c.macs) for c in flops.flops_both(model, 224).counts]
    with use_formulation("grouped"):
        grouped = [(c.counter, c.macs) for c in flops.flops_both(model, 224).counts]
    assert auto == grouped == [("fvcore", 4_114_906_136), ("ptflops-pytorch", 4_137_741_464),
                               ("torch.utils.flop_counter", 4_114_906_136)]
