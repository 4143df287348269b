"""``attnbench check-module``: the example plugin and built-ins conform; each kind of
broken module is caught by the check that should catch it, with a readable reason.

Small inputs (64-96 px) keep this quick; the command's default sweep is 168..448."""
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from attnbench.plugins import loader as plugins
from attnbench.cli.args import parse_options
from attnbench.plugins.conformance import (FAIL, PASS, SKIP, WARN, Check, ModuleChecker, exit_code,
                                          report_text)
from attnbench.cli import main
from attnbench.modules.registry import OptionError, register

ROOT = Path(__file__).resolve().parents[1]
COORDATT = ROOT / "examples" / "attnbench-coordatt" / "attnbench_coordatt" / "coordatt.py"


pytestmark = pytest.mark.usefixtures("clean_plugins")


def prepared(name, resolutions=(64,), **kw):
    """A checker that has run registry/options/build (what the other checks need)."""
    c = ModuleChecker(name, resolutions=resolutions, **kw)
    for check, fn in (("registry", c.check_registry), ("options", c.check_options),
                      ("build", c.check_build)):
        assert c._run(check, fn).status == PASS, c.results[-1]
    return c


def status(c, name, fn):
    r = c._run(name, fn)
    return r.status, r.detail


def gate(name, **kw):
    """Register a test gate class under ``name`` (cleaned up by the fixture)."""
    def deco(cls):
        register(name, "gate", **kw)(cls)
        return cls
    return deco


# ----------------------------------------------------------------------------- conforming
def test_example_plugin_conforms_including_flops():
    plugins.load_all([str(COORDATT)])
    results = ModuleChecker("coordatt", resolutions=[64, 96], flops_resolution=64).run()
    by = {r.name: r for r in results}
    assert [r.name for r in results] == [
        "registry", "options", "build", "standalone", "forward eval", "forward train",
        "gradients", "state_dict", "determinism", "dtype/device", "channels_last",
        "flops fvcore", "flops ptflops"]
    assert all(r.status == PASS for r in results), [(r.name, r.detail) for r in results
                                                     if r.status != PASS]
    assert "input (2, 512, 7, 9)" in by["standalone"].detail  # non-square: H and W apart
    assert "uncounted by convention (element-wise, comparisons): " in by["flops fvcore"].detail


def test_builtin_se_conforms():
    c = ModuleChecker("se", resolutions=[64], flops=False)
    results = c.run()
    assert [r.status for r in results if r.status not in (PASS, SKIP)] == []


def test_unknown_name_and_bad_option():
    results = ModuleChecker("coordat", resolutions=[64]).run()
    assert results[0].status == FAIL and "unknown attention module 'coordat'" in results[0].detail
    assert {r.status for r in results[1:]} == {SKIP}
    results = ModuleChecker("se", options={"reductio": 8}, resolutions=[64]).run()
    assert results[1].status == FAIL
    assert "se: unknown option 'reductio' (known options: reduction)" in results[1].detail


# ----------------------------------------------------------------------------- broken ones
def test_gate_that_changes_the_shape():
    @gate("shrinkgate")
    class Shrink(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    c = prepared("shrinkgate")
    st, detail = status(c, "standalone", c.check_standalone)
    assert st == FAIL
    assert detail.startswith("shrinkgate (gate, layer1[0], 64 channels, train mode): expected "
                             "output shape (2, 64, 7, 9), got (2, 64, 4, 5) for input "
                             "(2, 64, 7, 9); a gate must return its input's shape")
    st, detail = status(c, "forward eval", c.check_forward_eval)
    assert st == FAIL and "64²" in detail


def test_gate_that_mixes_up_height_and_width():
    @gate("swapgate")
    class Swap(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):  # square maps hide this: the check uses 7x9
            return (x * self.scale).transpose(2, 3)

    c = prepared("swapgate")
    st, detail = status(c, "standalone", c.check_standalone)
    assert st == FAIL and "expected output shape (2, 64, 7, 9), got (2, 64, 9, 7)" in detail
    assert status(c, "forward eval", c.check_forward_eval)[0] == PASS  # square inputs


def test_failure_at_some_resolutions_and_at_batch_1_in_train_mode():
    @gate("picky")
    class Picky(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.bn = nn.BatchNorm1d(channels)  # on the pooled (N, C): needs N > 1 to train

        def forward(self, x):
            if x.shape[-1] % 2:
                raise ValueError(f"odd width {x.shape[-1]}")
            return x * torch.sigmoid(self.bn(x.mean((2, 3))))[:, :, None, None]

    c = prepared("picky", resolutions=(64, 96))  # 96 -> 3x3 maps in layer4
    st, detail = status(c, "forward eval", c.check_forward_eval)
    assert st == FAIL
    assert detail == "picky (eval, batch 1): 1 of 2 resolutions fail; 96²: ValueError: odd " \
                     "width 3"
    st, detail = status(c, "forward train", c.check_forward_train)
    assert st == FAIL and "2 of 2 resolutions fail" in detail
    assert "Expected more than 1 value per channel when training" in detail


def test_a_failure_the_plain_backbone_shares_is_a_warning_naming_it():
    # batch norm at batch 1 on a 1x1 map (32² on ResNet-18) fails the plain backbone too
    c = prepared("se", resolutions=(32,))
    st, detail = status(c, "forward train", c.check_forward_train)
    assert st == WARN and "the plain resnet18 fails there too" in detail
    assert "not se's doing" in detail and "Expected more than 1 value per channel" in detail
    st, detail = status(c, "determinism", c.check_determinism)
    assert st == WARN and detail.startswith("the plain resnet18 fails this check too")
    assert exit_code(c.results) == 0


def test_a_failure_of_the_module_alone_stays_a_failure_next_to_a_shared_one():
    @gate("oddshy")
    class OddShy(nn.Module):
        def __init__(self, channels):
            super().__init__()

        def forward(self, x):
            if x.shape[-1] == 2:
                raise ValueError("2x2 map")
            return x
    c = prepared("oddshy", resolutions=(32, 64))   # 32: 1x1 in layer4 (shared); 64: 2x2
    st, detail = status(c, "forward train", c.check_forward_train)
    assert st == FAIL and "1 of 2 resolutions fail; 64²: ValueError: 2x2 map" in detail
    assert "the plain resnet18 fails at 32² too" in detail


def test_parameter_without_gradient():
    @gate("unused")
    class Unused(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Conv2d(channels, channels, 1)
            self.forgotten = nn.Parameter(torch.zeros(channels))

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))

    c = prepared("unused")
    st, detail = status(c, "gradients", c.check_gradients)
    assert st == FAIL
    assert detail.startswith("unused: no gradient reaches 8 of 24 attention parameters (unused "
                             "in forward, or detached): layer1.0.attention.forgotten")


def test_zero_gradient_is_a_warning():
    @gate("zeroinit")
    class ZeroInit(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Conv2d(channels, channels, 1)
            self.gamma = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x + self.gamma * self.fc(x)

    c = prepared("zeroinit")
    st, detail = status(c, "gradients", c.check_gradients)
    assert st == WARN and "gradient exactly zero at initialisation for layer1.0.attention.fc" \
        in detail


def test_state_kept_outside_the_state_dict_and_the_device():
    @gate("plainattr")
    class PlainAttr(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Conv2d(channels, channels, 1)
            self.mask = torch.rand(1, channels, 1, 1)  # not a buffer

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x) * self.mask)

    c = prepared("plainattr")
    st, detail = status(c, "state_dict", c.check_state_dict)
    assert st == FAIL and "plainattr: a rebuilt model with the loaded state_dict gives other " \
                          "outputs" in detail
    st, detail = status(c, "dtype/device", c.check_dtype)
    assert st == FAIL and "neither parameters nor buffers: layer1.0.attention.mask" in detail
    assert "register them with register_buffer" in detail
    assert status(c, "determinism", c.check_determinism)[0] == PASS  # seeded torch.rand


def test_randomness_outside_torch_seed():
    import random

    @gate("unseeded")
    class Unseeded(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x)) * random.uniform(0.5, 1.5)

    c = prepared("unseeded")
    st, detail = status(c, "determinism", c.check_determinism)
    assert st == FAIL and "two builds with seed 0 disagree: eval outputs differ" in detail


def test_view_fails_in_channels_last_as_a_warning():
    @gate("viewgate")
    class ViewGate(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Linear(channels, channels)

        def forward(self, x):
            n, c, h, w = x.shape
            y = x.view(n * c, h * w).mean(1).view(n, c)  # fine contiguous, not channels_last
            return x * torch.sigmoid(self.fc(y))[:, :, None, None]

    c = prepared("viewgate")
    st, detail = status(c, "channels_last", c.check_channels_last)
    assert st == WARN and "use .reshape instead of .view" in detail


def test_flops_invisible_to_a_counter():
    @gate("freegate")
    class FreeGate(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.logit = nn.Parameter(torch.zeros(1, channels, 1, 1))

        def forward(self, x):
            return x * torch.sigmoid(self.logit)

    c = prepared("freegate", flops_resolution=64)
    st, detail = status(c, "flops fvcore", lambda: c.check_flops("fvcore"))
    assert st == FAIL and "counts +0.0000 GMac extra for a module with parameters" in detail


def test_uncounted_op_with_multiply_adds():
    @gate("cumgate")
    class CumGate(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.fc = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc(x.cumsum(3)))

    c = prepared("cumgate", flops_resolution=64)
    st, detail = status(c, "flops fvcore", lambda: c.check_flops("fvcore"))
    assert st == FAIL and "ops of the module that do multiply-adds went uncounted: " \
                          "aten::cumsum x8" in detail


# ----------------------------------------------------------------------------- command line
def test_parse_options():
    assert parse_options(["reduction=8", "variant=top", "attn_bias=true", "x=0.5",
                          "flag=True", "name=\"a b\""]) == {
        "reduction": 8, "variant": "top", "attn_bias": True, "x": 0.5, "flag": True,
        "name": "a b"}
    with pytest.raises(OptionError, match="expected KEY=VALUE"):
        parse_options(["reduction"])


def test_report_text_and_exit_code():
    """The library gives the table and the exit status; the command only prints them."""
    fine = [Check("registry", PASS, "kind gate"), Check("channels_last", WARN, "differs"),
            Check("flops fvcore", SKIP, "--no-flops")]
    text = report_text("mine", fine)
    assert text.splitlines()[-2:] == ["", "mine: 1 pass, 1 warn, 1 skip -- conforms"]
    assert "channels_last  WARN" in text
    assert exit_code(fine) == 0
    broken = fine + [Check("build", FAIL, "boom")]
    assert report_text("mine", broken).splitlines()[-1] == \
        "mine: 1 pass, 1 warn, 1 skip, 1 fail -- FAILED: build"
    assert exit_code(broken) == 1


def test_cli_exit_status_and_table(tmp_path, capsys):
    bad = tmp_path / "badgate.py"
    bad.write_text(textwrap.dedent("""
        from torch import nn
        from attnbench.modules.registry import register

        @register("badgate", "gate")
        class BadGate(nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.conv = nn.Conv2d(channels, channels // 2, 1)

            def forward(self, x):
                return self.conv(x)
    """))
    code = main(["check-module", "badgate", "--plugin", str(bad), "--resolutions", "64",
                 "--no-flops"])
    out = capsys.readouterr().out
    assert code == 1
    flat = " ".join(out.split())
    assert "standalone FAIL" in flat
    assert "expected output shape (2, 64, 7, 9), got (2, 32, 7, 9)" in flat
    assert "dtype/device SKIP" in flat  # one root cause, not a wall of failures
    assert out.splitlines()[-1].startswith("badgate: ")
    assert out.splitlines()[-1].endswith("FAILED: standalone, forward eval, forward train")
