"""timm's SE, CBAM and ECA layers as attnbench gates, to time our gates beside the
reference implementations REFERENCE.md measured (timm's CBAM and ECA layers) in the
same rounds:

    attnbench efficiency --plugin examples/timm-reference/timm_reference.py \\
        --only se --only cbam --only eca \\
        --module timm_se --module timm_cbam --module timm_eca

Each class is timm's own module (its forward unchanged), built with the options that
give the paper's (and our) layer: reduction 16, bias-free MLPs, hidden width C/16 with
no rounding (``rd_divisor=1``; timm's SE default rounds to multiples of 8 and adds
biases). So the networks have our parameter counts (tests/test_reference_timm.py):
SE 28,071,976, CBAM 28,073,576, ECA 25,557,118 on ResNet-50. Needs ``pip install
timm``.
"""
from timm.layers import EcaModule, SEModule
from timm.layers.cbam import CbamModule

from attnbench import register

SOURCE = "timm.layers (reference implementation; attnbench's examples/timm-reference)"


@register("timm_se", "gate", paper=f"SE, {SOURCE}", label=lambda o: "SE-timm")
class TimmSE(SEModule):
    """``timm.layers.SEModule(C, rd_ratio=1/16, rd_divisor=1, bias=False)``."""

    def __init__(self, channels: int):
        super().__init__(channels, rd_ratio=1 / 16, rd_divisor=1, bias=False)


@register("timm_cbam", "gate", paper=f"CBAM, {SOURCE}", label=lambda o: "CBAM-timm")
class TimmCBAM(CbamModule):
    """``timm.layers.CbamModule(C)``: reduction 16, bias-free MLP, 7x7 conv + BN."""

    def __init__(self, channels: int):
        super().__init__(channels, rd_ratio=1 / 16, rd_divisor=1)


@register("timm_eca", "gate", paper=f"ECA, {SOURCE}", label=lambda o: "ECA-timm")
class TimmECA(EcaModule):
    """``timm.layers.EcaModule(channels=C)``: kernel size from C (gamma 2, beta 1)."""

    def __init__(self, channels: int):
        super().__init__(channels=channels)
