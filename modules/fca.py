"""FCA: frequency channel attention, FcaNet "top-16" (Qin et al., ICCV 2021).

The squeeze step pools each of 16 channel groups with one fixed 2-D DCT basis
(eq. 6-8, the paper's multi-spectral attention); the excitation is SE's bias-free
MLP. The frequencies are the paper's top-16 on a 7x7 grid (REFERENCE.md), scaled
by d // 7 on a d x d DCT grid. DCT grid size per stage as in the authors' code for
ResNet at 224^2: 56, 28, 14, 7 for stages 1..4. Like the authors, a feature map of
another size (any test resolution other than 224^2) is adaptively average-pooled to
the DCT size first. The filters are a buffer (not learned), so FCA-ResNet-50 has
SE's 28,071,976 parameters.

Pooling then weighting is one linear map of the input, so on another map size the
filters are pulled back through the pooling once per size (:func:`pulled_back`, the
pool's transpose applied to them) and the gate weights the map directly: the authors'
result up to rounding, without the ``adaptive_avg_pool2d`` that took most of the
gate's time (batch 1, a 256 x 42² map pooled to 56²: 6.0 of 7.1 ms, against 0.8 ms
for the whole gate at 56²).
"""
import math

import numpy as np
import torch

from .common import ProductGate, bottleneck_mlp, check_4d, reduced, watched
from .registry import OptionError, register

TOP16_U = (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2)
TOP16_V = (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2)
DCT_SIZE_BY_STAGE = {1: 56, 2: 28, 3: 14, 4: 7}


def dct_basis(pos: int, freq: int, n: int) -> float:
    """B(pos, freq, N) = cos(pi*freq*(pos+0.5)/N)/sqrt(N), times sqrt(2) for freq != 0."""
    value = math.cos(math.pi * freq * (pos + 0.5) / n) / math.sqrt(n)
    return value * math.sqrt(2) if freq != 0 else value


def dct_filters(channels: int, size: int, n_freq: int = 16) -> torch.Tensor:
    """(C, size, size) filters: channel group g is pooled with frequency g."""
    if channels % n_freq:
        raise OptionError(f"fca: channel count {channels} must be divisible by the number "
                          f"of frequencies {n_freq}")
    scale = max(size // 7, 1)
    filt = torch.zeros(channels, size, size)
    group = channels // n_freq
    for g, (u, v) in enumerate(zip(TOP16_U[:n_freq], TOP16_V[:n_freq])):
        bx = torch.tensor([dct_basis(i, u * scale, size) for i in range(size)])
        by = torch.tensor([dct_basis(j, v * scale, size) for j in range(size)])
        filt[g * group:(g + 1) * group] = bx[:, None] * by[None, :]
    return filt


def pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): ``adaptive_avg_pool1d`` as a matrix (window i spans
    floor(i*n_in/n_out) to ceil((i+1)*n_in/n_out), PyTorch's definition)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def pulled_back(filters: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(C, h, w) filters F' with sum(x * F') = sum(adaptive_avg_pool2d(x, (s, s)) * F)
    for (C, s, s) filters F and any h x w map x: F' = P_h^T F P_w, the pool being
    separable (P: :func:`pool_matrix`). Computed in float64 with NumPy, so FLOP counters
    see only the forward's own ops (this is a constant of the map size, not work per
    input)."""
    ph, pw = pool_matrix(h, filters.shape[-2]), pool_matrix(w, filters.shape[-1])
    f = filters.detach().cpu().double().numpy()
    return torch.from_numpy(np.ascontiguousarray(ph.T @ f @ pw))  # two GEMMs per channel


#: fewest samples from which :func:`dct_pool` runs as a ``bmm`` (CPU, 2 threads, caches
#: flushed, 25 shuffled rounds, medians, 2026-12-04: at batch 1 the ``bmm`` took 0.99 ms
#: against the product-sum's 0.43 at 256x56²; at batch 2 the two were within 20 % either
#: way; from batch 4 on the ``bmm`` was faster on every stage's map, 0.63 against 1.06 ms at
#: 4x256x56², 0.99 against 2.46 at 8x256x56², 0.17 against 0.26 at 8x2048x7²)
BMM_MIN_BATCH = 4


def dct_pool(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """(N, C, 1, 1): each channel's map weighted by its filter and summed (eq. 6-8).

    Without autograd, from :data:`BMM_MIN_BATCH` samples on, one matrix-vector product per
    channel (``bmm``): a single read of ``x``, without the authors' ``(x * filters)``
    temporary of the map's size. Otherwise the authors' ``(x * filters).sum((2, 3))``:
    under autograd (in a batch-8 training step of FCA-ResNet-50 the ``bmm`` gave 0.897 of
    the plain network's speed against 0.894, one run each), below that batch (the ``bmm``
    costs about the same per channel whatever the batch), and where a FLOP counter
    watches (:func:`watched`), so each counter counts what it counts on their code (stock
    fvcore: nothing for the sum; the suite's rule: the same C*H*W multiply-adds as the
    ``bmm``)."""
    n, c = x.shape[:2]
    if n < BMM_MIN_BATCH or torch.is_grad_enabled() or watched():
        return (x * filters).sum((2, 3), keepdim=True)
    y = torch.bmm(x.flatten(2).transpose(0, 1), filters.reshape(c, -1, 1))  # (C, N, 1)
    return y.view(c, n).t()[:, :, None, None]


@register("fca", "gate", defaults={"reduction": 16, "n_freq": 16, "dct_size": 0},
          paper="Qin et al., FcaNet: Frequency Channel Attention Networks, ICCV 2021 "
                "(eq. 6-8, top-16)",
          label=lambda o: "FCA-TS" if o["n_freq"] == 16 else f"FCA(n_freq={o['n_freq']})")
class FCAGate(ProductGate):
    """Multi-spectral (DCT) pooling of channel groups, then SE's excitation."""

    def __init__(self, channels: int, reduction: int = 16, n_freq: int = 16,
                 dct_size: int = 0, stage: int = 1):
        super().__init__()
        if not 1 <= n_freq <= 16:
            raise OptionError(f"fca: option n_freq={n_freq} must be between 1 and 16 "
                              f"(the top-16 table)")
        size = dct_size or DCT_SIZE_BY_STAGE.get(stage, 7)
        if size < 1:
            raise OptionError(f"fca: option dct_size={dct_size} must be positive")
        self.dct_size = size
        self.register_buffer("dct", dct_filters(channels, size, n_freq))
        self.fc = bottleneck_mlp(channels, reduced(channels, reduction, "fca"))

    def multiplicands(self, x: torch.Tensor):
        """``(x, s)``: the output is ``x * s``, s the (N, C, 1, 1) excitation of the DCT
        pooling."""
        check_4d(x, "fca")
        return x, torch.sigmoid(self.fc(dct_pool(x, self.filters_for(x))))

    def filters_for(self, x: torch.Tensor) -> torch.Tensor:
        """The DCT filters for ``x``'s map size: the buffer itself at the DCT size, else
        :func:`pulled_back` (pooling to the DCT size, then the filters), kept while the
        size, dtype, device and buffer stay the same (not under ``inference_mode``, whose
        tensors could not serve a later training step)."""
        h, w = x.shape[-2:]
        if (h, w) == tuple(self.dct.shape[-2:]):
            return self.dct
        key = (h, w, x.dtype, x.device, self.dct.data_ptr(), self.dct._version)
        cached = self.__dict__.get("_pulled")
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.dct.is_meta:  # shapes only (FLOP counting on a meta copy)
            return self.dct.new_empty(self.dct.shape[0], h, w)
        filters = pulled_back(self.dct, h, w).to(x.device, x.dtype)
        if not torch.is_inference_mode_enabled():
            self._pulled = (key, filters)
        return filters
