"""FLOPs as multiply-adds (GMac) with three counters: fvcore, ptflops (pytorch backend)
and torch's own ``torch.utils.flop_counter.FlopCounterMode``.

Both count one fused multiply-add as one operation, at batch 1 and a square input of
the given resolution, on a model in eval mode. They differ in convention (ptflops also
counts ReLU, max-pooling and biases; its pytorch backend counts ``nn.ReLU`` and
``nn.MaxPool2d`` twice -- the module hook and the patched ``F.relu``/``F.max_pool2d``,
10.5 M MACs on ResNet-50 --; fvcore ignores element-wise ops), so every figure names its
counter, and :func:`flops_both` reports their disagreement instead of hiding it.

Counting rules added (``rules=True``, the default and what ``attnbench`` results
use; ``rules=False`` gives each library's stock counts -- the convention of
REFERENCE.md's fvcore table):

fvcore (traces the model with ``torch.jit.trace`` and counts aten ops):

* ``reduce``: ``aten::sum`` / ``aten::mean`` count one multiply-add per reduced
  input element. For a sum of an element-wise product -- FCA's DCT pooling
  ``(x * dct).sum((2, 3))``, an ``S * X'`` channel sum like TD's eq. 7 -- this is
  exactly the contraction's multiply-adds (each product term is multiplied once and
  added once; the ``aten::mul`` feeding it is part of that count, not counted again).
  For a plain mean it is fvcore's own rule for ``adaptive_avg_pool2d`` (one add per
  input element), so global average pooling costs the same whether written as
  ``nn.AdaptiveAvgPool2d`` or ``x.mean((2, 3))``. Stock fvcore counts the former and
  not the latter: our SE (``mean``) then gets 4.114 G, the authors' SE
  (``AdaptiveAvgPool2d``, REFERENCE.md) 4.120 G; with the rule ours is 4.120 G too.
  FCA moves from 4.114 G to 4.120 G (+5.52 M MACs: its DCT pooling costs exactly
  what SE's average pooling costs, C*H*W per block).
* ``avg_pool``: ``aten::avg_pool1d/2d/3d``, ``adaptive_avg_pool1d/3d``: one add per
  input element (as fvcore's ``adaptive_avg_pool2d``).
* ``upsample``: interpolation modes fvcore lacks: bicubic 16, linear 2, trilinear 8,
  nearest(-exact) 1 multiply-add per output element (fvcore: bilinear 4, nearest 1).
* ``conv``: ``aten::conv1d/2d/3d`` / ``conv_transpose*`` in case a trace records them
  un-lowered. Stock fvcore already counts every ``aten::_convolution``: functional
  ``F.conv2d`` with ``groups=N`` (AW-convolution's batched per-sample weights: the
  weight shape carries ``C_in/groups``) and transposed convolutions (input-sized).

ptflops, pytorch backend (module forward hooks + patched ``torch.nn.functional``
calls; ``backend_specific_config={"count_functional": True}``, its default). The
rules run as a :class:`torch.overrides.TorchFunctionMode` during ptflops' forward
and count a call only when no module ptflops counts itself is running (so the
``F.conv2d`` inside an ``nn.Conv2d`` is not counted twice) and ptflops' own patch
did not count it:

* ``conv``: functional ``conv1d/2d/3d`` and ``conv_transpose1d/2d/3d`` -- AW's grouped
  per-sample convolution, a subclass of ``nn.Conv2d`` (ptflops matches exact types)
  -- with ptflops' own conv formula (kernel * C_in/groups * C_out per output
  position, input positions for transposed; plus the bias).
* ``bn``: functional ``batch_norm`` (TDAF's multi-flow BN): input elements, doubled
  when affine (ptflops' BN rule).
* ``linear``: functional ``linear`` (ptflops leaves it commented out).
* ``reduce``: as for fvcore (``sum``/``mean``; a sum of an uncounted ``*`` product
  counts the contraction). A product ptflops already counted (``torch.mul``) is not
  counted again by its sum.
* ``einsum``: product of all index sizes; ``matmul`` via ``@``: ptflops' matmul rule.

ptflops already counts functional ``interpolate`` (one per output element),
``avg_pool``/``adaptive_avg_pool``, ``nn.ConvTranspose2d`` and ``torch.matmul``.

torch.utils.flop_counter (``FlopCounterMode``: dispatch-level, no JIT trace, so it sees
what runs, forward and backward alike). Stock, it counts convolutions and matrix
products (and attention kernels), in FLOPs = 2 x multiply-adds; its figures are halved.
Rules added (the same conventions as fvcore's, so the three can be compared):

* ``bn``: batch norm, one multiply-add per input element, two when affine (fvcore's and
  ptflops' eval rule), in train mode too;
* ``reduce``: ``sum`` / ``mean``, one per reduced input element;
* ``avg_pool``: average and adaptive average pooling, one per input element;
* ``upsample``: as fvcore's rule above (bilinear 4, nearest 1 per output element).

:func:`count_torch_train` counts one training step (forward, cross-entropy, backward) per
image: the stock backward rules (convolution and matmul gradients, about twice the
forward's), the rules above wherever their ops run; the backward of batch norm, pooling
and element-wise ops is left uncounted (listed).

Max pooling holds no multiply-add: fvcore and the torch counter leave it uncounted (and
list it); ptflops counts one operation per input element (its convention).
Element-wise arithmetic (gating products, sigmoid, additions) is left uncounted by
every convention and listed in ``uncounted``.
"""
from __future__ import annotations

import copy
import io
import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

DISAGREE_PCT = 2.0
FVCORE_RULES = ("reduce", "avg_pool", "upsample", "conv")
PTFLOPS_RULES = ("conv", "bn", "linear", "reduce", "einsum", "matmul")
TORCH_RULES = ("bn", "reduce", "avg_pool", "upsample")
TORCH_COUNTER = "torch.utils.flop_counter"


@dataclass
class FlopCount:
    """One counter's figure for one model at one resolution (batch 1)."""

    counter: str                       # "fvcore" or "ptflops-pytorch"
    macs: int                          # multiply-adds per image
    method: str                        # counter + backend + rules, for the results
    uncounted: List[str] = field(default_factory=list)   # "op xN" left at zero
    by_rule: Dict[str, int] = field(default_factory=dict)  # MACs each added rule found
    resolution: int = 224

    @property
    def gmac(self) -> float:
        return self.macs / 1e9


@dataclass
class FlopsBoth:
    """The counters' figures for one model: fvcore, ptflops and (where counted) torch's."""

    fvcore: FlopCount
    ptflops: FlopCount
    disagreement_pct: float            # largest 100*|other - fvcore|/fvcore
    torch: Optional[FlopCount] = None

    @property
    def counts(self) -> List[FlopCount]:
        """Every counter's figure, fvcore first."""
        return [self.fvcore, self.ptflops] + ([self.torch] if self.torch is not None else [])

    @property
    def disagree(self) -> bool:
        return self.disagreement_pct > DISAGREE_PCT

    @property
    def method(self) -> str:
        """``method`` of the flops_disagreement row (``DISAGREE`` over 2 %)."""
        others = " or ".join(c.method for c in self.counts[1:])
        text = f"100*|{others} - {self.fvcore.method}|/fvcore (largest)" \
            if self.torch is not None else \
            f"100*|{self.ptflops.method} - {self.fvcore.method}|/fvcore"
        return f"DISAGREE (> {DISAGREE_PCT:g} %): {text}" if self.disagree else text


def _input(model: nn.Module, resolution: int) -> torch.Tensor:
    try:
        p = next(model.parameters())
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, int(resolution), int(resolution), generator=gen, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


class _eval_mode:
    """Eval mode for the count, the previous train/eval flags restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _fmt_uncounted(counts: Counter) -> List[str]:
    return [f"{name} x{n}" for name, n in sorted(counts.items()) if n > 0]


# --------------------------------------------------------------------------- fvcore

def _fv_shape(value) -> Optional[List[int]]:
    from fvcore.nn.jit_handles import get_shape
    try:
        return get_shape(value)
    except Exception:  # noqa: BLE001 - not a tensor
        return None


def _reduce_handle(tally: Counter):
    """``aten::sum`` / ``aten::mean``: one multiply-add per reduced input element."""
    def handle(inputs, outputs):
        shape = _fv_shape(inputs[0])
        if not shape:
            return 0
        n = _prod(shape)
        tally["reduce"] += n
        node = inputs[0].node()
        if node.kind() in ("aten::mul", "aten::mul_"):
            tally["_contracted_mul"] += 1
        return n
    return handle


def _input_elements(tally: Counter, rule: str):
    """One operation per input element, tallied under ``rule``."""
    def handle(inputs, outputs):
        shape = _fv_shape(inputs[0])
        n = _prod(shape) if shape else 0
        tally[rule] += n
        return n
    return handle


def _output_elements(tally: Counter, rule: str, per: int):
    """``per`` operations per output element, tallied under ``rule``."""
    def handle(inputs, outputs):
        shape = _fv_shape(outputs[0])
        n = _prod(shape) * per if shape else 0
        tally[rule] += n
        return n
    return handle


def _conv_handle(tally: Counter, transposed: bool):
    """A convolution: batch x weight elements x output (transposed: input) positions."""
    def handle(inputs, outputs):
        x, w, y = _fv_shape(inputs[0]), _fv_shape(inputs[1]), _fv_shape(outputs[0])
        if not (x and w and y):
            return 0
        spatial = x[2:] if transposed else y[2:]
        n = x[0] * _prod(w) * _prod(spatial)
        tally["conv"] += n
        return n
    return handle


#: multiply-adds per output element of the interpolations fvcore lacks
_UPSAMPLE_PER_OUTPUT = {
    "aten::upsample_bicubic2d": 16, "aten::_upsample_bicubic2d_aa": 16,
    "aten::_upsample_bilinear2d_aa": 4, "aten::upsample_linear1d": 2,
    "aten::upsample_trilinear3d": 8, "aten::upsample_nearest1d": 1,
    "aten::upsample_nearest3d": 1, "aten::_upsample_nearest_exact1d": 1,
    "aten::_upsample_nearest_exact2d": 1, "aten::_upsample_nearest_exact3d": 1,
}
_AVG_POOLS = ("aten::avg_pool1d", "aten::avg_pool2d", "aten::avg_pool3d",
              "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool3d")


def _fvcore_handles(tally: Counter) -> Dict[str, Any]:
    """Handles for the ops fvcore lacks; each adds what it counted to ``tally``."""
    handles: Dict[str, Any] = {"aten::sum": _reduce_handle(tally),
                               "aten::mean": _reduce_handle(tally)}
    for name in _AVG_POOLS:
        handles[name] = _input_elements(tally, "avg_pool")
    for name, per in _UPSAMPLE_PER_OUTPUT.items():
        handles[name] = _output_elements(tally, "upsample", per)
    for d in (1, 2, 3):
        handles[f"aten::conv{d}d"] = _conv_handle(tally, False)
        handles[f"aten::conv_transpose{d}d"] = _conv_handle(tally, True)
    return handles


def count_fvcore(model: nn.Module, resolution: int = 224, rules: bool = True) -> FlopCount:
    """fvcore ``FlopCountAnalysis`` (JIT trace) at batch 1, ``resolution`` squared."""
    with warnings.catch_warnings():  # torch.jit deprecation notices at import
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    tally: Counter = Counter()
    x = _input(model, resolution)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, (x,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        if rules:
            for name, handle in _fvcore_handles(tally).items():
                analysis.set_op_handle(name, handle)
        macs = int(analysis.total())
        unsupported = Counter(analysis.unsupported_ops())
    # the products consumed by a counted contraction are not left uncounted
    if tally.get("_contracted_mul"):
        unsupported["aten::mul"] -= tally.pop("_contracted_mul")
    method = "fvcore" + (f"+rules({','.join(FVCORE_RULES)})" if rules else "")
    return FlopCount("fvcore", macs, method, _fmt_uncounted(unsupported),
                     {k: int(v) for k, v in tally.items() if v}, int(resolution))


# --------------------------------------------------------------------------- ptflops

_ARITH = {"mul", "add", "sub", "div", "sigmoid", "tanh", "softmax", "exp", "pow", "amax",
          "max", "min", "amin", "sqrt", "rsqrt", "log", "hardsigmoid", "hardswish", "silu",
          "relu", "gelu", "layer_norm", "group_norm", "instance_norm", "addmm", "bmm", "mm",
          "baddbmm", "matmul", "einsum", "avg_pool2d", "max_pool2d", "adaptive_avg_pool2d",
          "adaptive_max_pool2d", "interpolate", "grid_sample", "cumsum", "prod", "norm",
          "var", "std", "logsumexp", "clamp", "where", "__mul__", "__add__", "__rmul__",
          "__radd__", "__truediv__", "__sub__", "mul_", "add_", "sigmoid_", "div_"}


class _PtflopsRules(torch.overrides.TorchFunctionMode):
    """Counts the functional ops ptflops misses (see the module docstring)."""

    def __init__(self, counted_types):
        super().__init__()
        self.counted_types = counted_types
        self.stack: List[bool] = []         # per running module: does ptflops count it
        self.inside_counted = 0
        self.tally: Counter = Counter()
        self.uncounted: Counter = Counter()
        self.products: Dict[int, Any] = {}  # id(tensor) -> (weakref, counted_by_ptflops)
        self._handles: List[Any] = []

    # -- module stack through global hooks
    def _pre(self, module, args):
        counted = type(module) in self.counted_types
        self.stack.append(counted)
        self.inside_counted += counted

    def _post(self, module, args, output):
        if self.stack:
            self.inside_counted -= self.stack.pop()

    def __enter__(self):
        from torch.nn.modules import module as M
        self._handles = [M.register_module_forward_pre_hook(self._pre),
                         M.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return super().__exit__(*exc)

    @staticmethod
    def _from_ptflops_patch(func, frame) -> bool:
        """Whether the op was called by one of ptflops' patched wrappers (so counted).

        ``frame`` is the caller of ``__torch_function__``; frames of torch's dispatch
        (``overrides.py``) and of the Python function itself are skipped."""
        from ptflops.pytorch_engine import torch_function_wrapper
        wrapper_code = torch_function_wrapper.__call__.__code__
        own = getattr(func, "__code__", None)
        for _ in range(6):
            if frame is None:
                return False
            code = frame.f_code
            if code is wrapper_code:
                return True
            if code is own or code.co_filename.endswith(("overrides.py", "functional.py")):
                frame = frame.f_back
                continue
            return False
        return False

    def _mark_product(self, out, counted):
        if isinstance(out, torch.Tensor):
            import weakref
            self.products[id(out)] = (weakref.ref(out), counted)

    def _product_info(self, t):
        entry = self.products.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        # Under a TorchFunctionMode, torch resolves ``x * y`` and the F.* functions by
        # their public names -- which ptflops has patched -- so ``func`` may be one of
        # ptflops' wrappers. Call the original op so ptflops counts exactly what it
        # counts without this mode (its wrapper already ran if it is on the stack).
        func = _unwrap(func)
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__") or self.inside_counted:
            return out
        try:
            self._count(func, name, args, kwargs, out, caller)
        except Exception:  # noqa: BLE001 - a rule must never break the model
            self.uncounted[name] += 1
        return out

    def _count(self, func, name, args, kwargs, out, caller):
        by_patch = self._from_ptflops_patch(func, caller)
        if name in ("mul", "__mul__", "__rmul__"):
            self._mark_product(out, by_patch)
            if not by_patch:
                self.uncounted[name] += 1
            return
        if by_patch:
            return
        macs = None
        rule = None
        if name in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                    "conv_transpose3d"):
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            transposed = name.startswith("conv_transpose")
            spatial = x.shape[2:] if transposed else out.shape[2:]
            # w: (C_out, C_in/groups, k...) or transposed (C_in, C_out/groups, k...)
            macs = x.shape[0] * _prod(w.shape) * _prod(spatial)
            if bias is not None:
                macs += out.numel()
            rule = "conv"
        elif name == "batch_norm":
            weight = args[3] if len(args) > 3 else kwargs.get("weight")
            macs = args[0].numel() * (2 if weight is not None else 1)
            rule = "bn"
        elif name == "linear":
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            macs = x.numel() * w.shape[0] + (w.shape[0] if bias is not None else 0)
            rule = "linear"
        elif name in ("sum", "mean"):
            t = args[0] if args else kwargs.get("input")
            info = self._product_info(t)
            if info is not None and info[1]:
                return  # ptflops counted the product's multiplications already
            if info is not None:  # the product is consumed by the contraction
                self._consume_product()
            macs = t.numel()
            rule = "reduce"
        elif name == "einsum":
            macs = _einsum_macs(args, kwargs)
            rule = "einsum"
        elif name in ("matmul", "__matmul__"):
            a, b = args[0], args[1]
            macs = a.numel() * b.shape[-1]
            rule = "matmul"
        if rule is not None:
            self.tally[rule] += int(macs)
        elif name in _ARITH:
            self.uncounted[name] += 1

    def _consume_product(self):
        for key in ("__mul__", "mul", "__rmul__"):
            if self.uncounted.get(key, 0) > 0:
                self.uncounted[key] -= 1
                return


def _unwrap(func):
    from ptflops.pytorch_engine import torch_function_wrapper
    for _ in range(3):
        if isinstance(func, torch_function_wrapper) or (
                callable(func) and hasattr(func, "op")
                and "wrap_tensor_op" in getattr(func, "__qualname__", "")):
            func = func.op
        else:
            break
    return func


def _einsum_macs(args, kwargs) -> int:
    equation = args[0]
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: Dict[str, int] = {}
    for spec, t in zip(lhs, operands):
        letters = [c for c in spec if c.isalpha()]
        if "..." in spec:  # ellipsis dims: count them once, by position
            extra = t.dim() - len(letters)
            head = spec.split("...")[0]
            for i in range(extra):
                sizes[f"...{i}"] = max(sizes.get(f"...{i}", 1), int(t.shape[len(head) + i]))
            tail = [c for c in spec.split("...")[1] if c.isalpha()]
            dims = list(t.shape[:len(head)]) + list(t.shape[len(head) + extra:])
            letters = [c for c in head if c.isalpha()] + tail
        else:
            dims = list(t.shape)
        for c, d in zip(letters, dims):
            sizes[c] = max(sizes.get(c, 1), int(d))
    return _prod(sizes.values())


def count_ptflops(model: nn.Module, resolution: int = 224, rules: bool = True) -> FlopCount:
    """ptflops ``get_model_complexity_info`` (pytorch backend, functional counting on)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ptflops import get_model_complexity_info
        from ptflops.pytorch_ops import MODULES_MAPPING
    x = _input(model, resolution)
    mode = _PtflopsRules(set(MODULES_MAPPING)) if rules else None
    sink = io.StringIO()
    with _eval_mode(model), torch.no_grad():
        if mode is not None:
            mode.__enter__()
        try:
            old_stdout = sys.stdout
            sys.stdout = sink  # ptflops prints its own exceptions
            try:
                macs, _ = get_model_complexity_info(
                    model, tuple(x.shape[1:]), print_per_layer_stat=False, as_strings=False,
                    input_constructor=lambda _res: x, ost=sink, verbose=False,
                    backend="pytorch", backend_specific_config={"count_functional": True})
            finally:
                sys.stdout = old_stdout
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
    if macs is None:
        text = sink.getvalue().strip().splitlines()
        raise RuntimeError("ptflops could not count the model: "
                           + (text[1] if len(text) > 1 else (text[0] if text else "unknown")))
    total = int(macs)
    tally: Dict[str, int] = {}
    uncounted: List[str] = []
    if mode is not None:
        tally = {k: int(v) for k, v in mode.tally.items() if v}
        total += sum(tally.values())
        uncounted = _fmt_uncounted(mode.uncounted)
    method = "ptflops-pytorch" + (f"+rules({','.join(PTFLOPS_RULES)})" if rules else "")
    return FlopCount("ptflops-pytorch", total, method, uncounted, tally, int(resolution))


# --------------------------------------------------------------------------- both

def disagreement_pct(fvcore_macs: float, ptflops_macs: float) -> float:
    if not fvcore_macs:
        return math.inf if ptflops_macs else 0.0
    return 100.0 * abs(ptflops_macs - fvcore_macs) / fvcore_macs


def flops_both(model: nn.Module, resolution: int = 224, rules: bool = True,
               torch_counter: bool = True) -> FlopsBoth:
    """fvcore, ptflops and (``torch_counter``) torch's counter on ``model``, and their
    largest disagreement with fvcore in percent of fvcore."""
    fv = count_fvcore(model, resolution, rules)
    pt = count_ptflops(model, resolution, rules)
    tc = count_torch(model, resolution, rules) if torch_counter else None
    worst = max(disagreement_pct(fv.macs, c.macs) for c in [pt] + ([tc] if tc else []))
    return FlopsBoth(fv, pt, worst, tc)


# --------------------------------------------------------------------------- torch

#: aten ops that move or make tensors but compute nothing: not listed as uncounted
_NO_ARITH = frozenset("""
    view _unsafe_view reshape _reshape_alias t transpose permute expand expand_as clone
    copy_ detach alias empty empty_like empty_strided new_empty new_empty_strided zeros
    zeros_like ones ones_like full full_like fill_ zero_ cat stack split split_with_sizes
    chunk unbind select slice narrow squeeze unsqueeze flatten contiguous as_strided
    _to_copy to lift_fresh arange index index_select gather repeat unfold scalar_tensor
    _local_scalar_dense item constant_pad_nd set_ resize_ randn normal_ uniform_ detach_
    eq ne ge gt le lt
""".split())
_UPSAMPLE_TORCH = {"upsample_bilinear2d": 4, "upsample_nearest2d": 1,
                   **{k.split("::")[1]: v for k, v in _UPSAMPLE_PER_OUTPUT.items()}}


def _numel(shape) -> int:
    return _prod(shape) if shape else 0


def _torch_rules(tally: Counter) -> Dict[Any, Any]:
    """FlopCounterMode formulas (FLOPs = 2 x multiply-adds) for :data:`TORCH_RULES`;
    they receive shapes in place of tensors (``shape_wrapper``)."""
    aten = torch.ops.aten

    def count(rule: str, macs: int) -> int:
        tally[rule] += macs
        return 2 * macs

    def bn(x, weight=None, *args, out_shape=None, **kwargs):
        return count("bn", _numel(x) * (2 if weight is not None else 1))

    def reduce(x, *args, out_shape=None, **kwargs):
        return count("reduce", _numel(x))

    def pool(x, *args, out_shape=None, **kwargs):
        return count("avg_pool", _numel(x))

    def upsample(per):
        def f(*args, out_shape=None, **kwargs):
            return count("upsample", _numel(out_shape) * per)
        return f
    table: Dict[Any, Any] = {}
    for name in ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                 "native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"):
        if hasattr(aten, name):
            table[getattr(aten, name)] = bn
    table.update({aten.sum: reduce, aten.mean: reduce})
    for name in ("avg_pool1d", "avg_pool2d", "avg_pool3d", "_adaptive_avg_pool2d",
                 "_adaptive_avg_pool3d", "adaptive_avg_pool1d"):
        if hasattr(aten, name):
            table[getattr(aten, name)] = pool
    for name, per in _UPSAMPLE_TORCH.items():
        if hasattr(aten, name):
            table[getattr(aten, name)] = upsample(per)
    return table


class _TorchCounter:
    """``FlopCounterMode`` that also lists the ops it ran without a formula."""

    def __init__(self, rules: bool):
        from torch.utils.flop_counter import FlopCounterMode
        self.tally: Counter = Counter()
        self.uncounted: Counter = Counter()
        self.mode = FlopCounterMode(display=False,
                                    custom_mapping=_torch_rules(self.tally) if rules else {})
        self.products: Dict[int, Any] = {}   # id -> weakref of each uncounted mul's output
        original = self.mode._count_flops

        def _count_flops(func_packet, out, args, kwargs):
            self._note(func_packet, out, args)
            return original(func_packet, out, args, kwargs)
        self.mode._count_flops = _count_flops

    def _note(self, func_packet, out, args) -> None:
        """List an op without a formula; a product consumed by a counted sum (a
        contraction, as fvcore's rule) is not left uncounted."""
        import weakref
        name = getattr(func_packet, "__name__", str(func_packet)).split(".")[-1]
        if func_packet in self.mode.flop_registry:
            first = args[0] if args else None
            ref = self.products.pop(id(first), None) if name in ("sum", "mean") else None
            if ref is not None and ref() is first and self.uncounted["aten.mul"] > 0:
                self.uncounted["aten.mul"] -= 1
            return
        if name.rstrip("_") in _NO_ARITH or name in _NO_ARITH:
            return
        self.uncounted[f"aten.{name}"] += 1
        if name == "mul" and isinstance(out, torch.Tensor):
            self.products[id(out)] = weakref.ref(out)

    def count(self, fn) -> int:
        """Multiply-adds of ``fn()`` (the counter's FLOPs halved)."""
        with self.mode:
            fn()
        return int(self.mode.get_total_flops()) // 2


def _meta_copy(model: nn.Module) -> Optional[nn.Module]:
    """A copy of ``model`` on the meta device (shapes, no data), or None if it has none."""
    try:
        return copy.deepcopy(model).to("meta")
    except Exception:  # noqa: BLE001 - a module that cannot go to meta is counted for real
        return None


def _count_on_meta(model: nn.Module, count: Callable[[nn.Module], Any]) -> Any:
    """``count(model)`` on a meta-device copy of ``model``: torch's counter needs only
    shapes, so this skips the arithmetic (about 10x faster here; the counts are equal,
    tested for every module). A module whose forward needs data (``.item()``, a
    data-dependent shape) fails on meta and is counted on the real model."""
    meta = _meta_copy(model)
    if meta is not None:
        try:
            return count(meta)
        except Exception:  # noqa: BLE001 - fall back to the real tensors
            pass
    return count(model)


def count_torch(model: nn.Module, resolution: int = 224, rules: bool = True) -> FlopCount:
    """torch.utils.flop_counter on one eval forward at batch 1, ``resolution`` squared
    (on a meta-device copy, see :func:`_count_on_meta`)."""
    def count(m: nn.Module):
        x, counter = _input(m, resolution), _TorchCounter(rules)
        with _eval_mode(m), torch.no_grad():
            return counter.count(lambda: m(x)), counter
    macs, counter = _count_on_meta(model, count)
    method = TORCH_COUNTER + (f"+rules({','.join(TORCH_RULES)})" if rules else "")
    return FlopCount(TORCH_COUNTER, macs, method, _fmt_uncounted(counter.uncounted),
                     {k: int(v) for k, v in counter.tally.items() if v}, int(resolution))


def count_torch_train(model: nn.Module, resolution: int = 224, batch: int = 2,
                      rules: bool = True) -> FlopCount:
    """torch.utils.flop_counter on one training step (forward in train mode,
    cross-entropy, backward) of a copy of ``model`` at ``batch``, per image (on a
    meta-device copy, see :func:`_count_on_meta`)."""
    import torch.nn.functional as F

    def count(m: nn.Module):
        work = (m if m is not model else copy.deepcopy(model)).train()
        x = _input(work, resolution).expand(int(batch), -1, -1, -1).contiguous()
        counter = _TorchCounter(rules)

        def step():
            out = work(x)
            logits = out if out.dim() == 2 else out.flatten(1)
            F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long,
                                                device=logits.device)).backward()
        return counter.count(step) // int(batch), counter
    macs, counter = _count_on_meta(model, count)
    method = (TORCH_COUNTER + (f"+rules({','.join(TORCH_RULES)})" if rules else "")
              + f", forward+backward, per image of batch {int(batch)}")
    return FlopCount(TORCH_COUNTER, macs, method, _fmt_uncounted(counter.uncounted),
                     {k: int(v) // int(batch) for k, v in counter.tally.items() if v},
                     int(resolution))
