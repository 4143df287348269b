"""``attnbench check-module NAME``: a conformance kit for an attention module.

Builds the module into a backbone (ResNet-18, 10 classes by default) and checks
what the rest of the suite relies on, for its kind:

=============  ==============================================================
check          what must hold
=============  ==============================================================
registry       the name is registered (kind, factory, source)
options        the options are valid; the module has a label for results
build          ``build_model`` succeeds; parameters added over the plain backbone
standalone     gate: output shape == input shape (non-square input, train and
               eval); head: (N, C, 1, 1); conv / block: the shape of what it replaces
forward eval   every resolution 168..448 step 28, batch 1: output (1, classes), finite
forward train  the same in train mode, with a backward pass
gradients      every parameter of the attention (not in the plain backbone) gets a
               finite, non-zero gradient (zero: WARN, e.g. a zero-initialised scale)
state_dict     rebuild with another seed, load (strict), save/load through bytes:
               identical outputs
determinism    same seed -> same model and same outputs (eval and train)
dtype/device   no tensor kept as a plain attribute (it would stay behind on
               ``.to("cuda")`` and out of the state_dict); ``model.double()`` runs
channels_last  works and agrees with the contiguous format (WARN only)
flops fvcore   the module adds FLOPs, and none of its ops with multiply-adds goes
               uncounted (element-wise ops and comparisons are uncounted by convention)
flops ptflops  the same with ptflops
=============  ==============================================================

:func:`report_text` gives a pass/fail table with the reason of each failure;
:func:`exit_code` is 0 only if no check FAILs (WARN and SKIP do not fail). The command
line is :mod:`attnbench.cli.check_module`.
"""
from __future__ import annotations

import io
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from attnbench.results import RESOLUTION_SWEEP, error_text

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
#: checks of the whole model that the plain backbone can fail too (e.g. batch norm at batch
#: 1 on a 1x1 map): such a failure is a WARN naming the backbone, not a FAIL (the forward
#: sweeps compare resolution by resolution)
BACKBONE_CHECKS = ("state_dict", "determinism", "dtype/device")


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != FAIL


class _Fail(Exception):
    """A check failing with a readable reason."""


class _Warn(Exception):
    """A check passing with a caveat."""


class _Skip(Exception):
    """A check that does not apply."""


def _shape(t: Any) -> Any:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


# --------------------------------------------------------------------------- checks
class ModuleChecker:
    """Runs the checks for one module; :meth:`run` returns the :class:`Check` list."""

    def __init__(self, name: str, backbone: str = "resnet18",
                 options: Optional[Mapping[str, Any]] = None, stages: Any = None,
                 num_classes: int = 10, resolutions: Sequence[int] = RESOLUTION_SWEEP,
                 device: str = "cpu", seed: int = 0, flops: bool = True,
                 flops_resolution: int = 224,
                 progress: Optional[Callable[[Check], None]] = None) -> None:
        self.name, self.backbone = name, backbone
        self.options = dict(options or {})
        self.stages, self.num_classes = stages, num_classes
        self.resolutions = list(resolutions)
        self.device = torch.device(device)
        self.seed, self.flops, self.flops_resolution = seed, flops, flops_resolution
        self.progress = progress
        self.spec = None
        self.results: List[Check] = []
        self._attention_names: List[str] = []
        self._forward_ok = True  # eval forward at the smallest resolution (later checks)
        self._plain_instead = False  # build() gives the plain backbone (see _plain_fails)

    # helpers ---------------------------------------------------------------
    def build(self, seed: Optional[int] = None) -> nn.Module:
        from attnbench.modules.builder import build_model
        torch.manual_seed(self.seed if seed is None else seed)
        if self._plain_instead:
            return build_model(self.backbone, num_classes=self.num_classes).to(self.device)
        model = build_model(self.backbone, self.name, stages=self.stages,
                            num_classes=self.num_classes, **self.options)
        return model.to(self.device)

    def plain(self) -> nn.Module:
        from attnbench.modules.builder import build_model
        torch.manual_seed(self.seed)
        return build_model(self.backbone, num_classes=self.num_classes).to(self.device)

    def input(self, res: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, res, res, generator=g).to(self.device)

    def _run(self, name: str, fn: Callable[[], str]) -> Check:
        start = time.perf_counter()
        try:
            check = Check(name, PASS, fn() or "")
        except _Fail as err:
            check = self._blame(name, fn, str(err))
        except _Warn as err:
            check = Check(name, WARN, str(err))
        except _Skip as err:
            check = Check(name, SKIP, str(err))
        except Exception as err:  # noqa: BLE001  (any crash of the module is a failure)
            check = self._blame(name, fn, f"{self.name}: {error_text(err)}")
        check.seconds = time.perf_counter() - start
        self.results.append(check)
        if self.progress:
            self.progress(check)
        return check

    def _plain_fails(self, fn: Callable[[], Any]) -> Optional[str]:
        """Why the plain backbone fails check ``fn`` too (same settings), or None."""
        self._plain_instead = True
        try:
            fn()
        except (_Warn, _Skip):
            return None
        except _Fail as err:
            return str(err)
        except Exception as err:  # noqa: BLE001
            return error_text(err)
        finally:
            self._plain_instead = False
        return None

    def _blame(self, name: str, fn: Callable[[], Any], detail: str) -> Check:
        """A FAIL of check ``name``, or a WARN when the plain backbone fails it the same
        way (a limit of the backbone at these settings, not of the module)."""
        why = self._plain_fails(fn) if name in BACKBONE_CHECKS else None
        if why is None:
            return Check(name, FAIL, detail)
        return Check(name, WARN, f"the plain {self.backbone} fails this check too, so it is "
                                 f"not {self.name}'s doing: {why}")

    def _skip(self, names: Sequence[str], why: str) -> None:
        for name in names:
            check = Check(name, SKIP, why)
            self.results.append(check)
            if self.progress:
                self.progress(check)

    # the run -----------------------------------------------------------------
    def run(self) -> List[Check]:
        rest = ["standalone", "forward eval", "forward train", "gradients", "state_dict",
                "determinism", "dtype/device", "channels_last", "flops fvcore",
                "flops ptflops"]
        if self._run("registry", self.check_registry).status == FAIL:
            self._skip(["options", "build"] + rest, "module not registered")
            return self.results
        if self._run("options", self.check_options).status == FAIL:
            self._skip(["build"] + rest, "invalid options")
            return self.results
        if self._run("build", self.check_build).status == FAIL:
            self._skip(rest, "the model does not build")
            return self.results
        self._run("standalone", self.check_standalone)
        self._run("forward eval", self.check_forward_eval)
        self._run("forward train", self.check_forward_train)
        if not self._forward_ok:
            self._skip(rest[3:], f"the forward fails at {min(self.resolutions)}² "
                                 f"(see 'forward eval')")
            return self.results
        self._run("gradients", self.check_gradients)
        self._run("state_dict", self.check_state_dict)
        self._run("determinism", self.check_determinism)
        self._run("dtype/device", self.check_dtype)
        self._run("channels_last", self.check_channels_last)
        if self.flops:
            self._run("flops fvcore", lambda: self.check_flops("fvcore"))
            self._run("flops ptflops", lambda: self.check_flops("ptflops"))
        else:
            self._skip(["flops fvcore", "flops ptflops"], "--no-flops")
        return self.results

    def check_registry(self) -> str:
        from attnbench.modules.registry import REGISTRY
        self.spec = REGISTRY.get(self.name)  # UnknownNameError names the closest names
        return f"kind {self.spec.kind}; {self.spec.source}"

    def check_options(self) -> str:
        opts = self.spec.options(self.options)
        label = self.spec.display(opts)
        if not isinstance(label, str) or not label:
            raise _Fail(f"{self.name}: its label function returned {label!r}, not a string")
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items()) or "no options"
        return f"label {label!r}; {shown}"

    def check_build(self) -> str:
        model = self.build()
        plain = self.plain()
        plain_params = {n: p.shape for n, p in plain.named_parameters()}
        extra = {n: p for n, p in model.named_parameters()
                 if plain_params.get(n) != p.shape}
        self._attention_names = sorted(extra)
        n_model = sum(p.numel() for p in model.parameters())
        n_plain = sum(p.numel() for p in plain.parameters())
        added = n_model - n_plain
        return (f"{model.attnbench_label} on {self.backbone}: {n_model:,} parameters "
                f"({added:+,} over the plain backbone; {len(extra)} attention tensors)")

    # standalone ----------------------------------------------------------------
    def check_standalone(self) -> str:
        from attnbench.modules.builder import make_gate, block_out_channels, resolve_stages
        kind = self.spec.kind
        opts = self.spec.options(self.options)
        if kind == "network":
            raise _Skip("a network-kind module is the whole model: see 'forward eval'")
        plain = self.plain()
        selection = resolve_stages(plain, self.stages, self.spec, self.backbone)
        tried = []
        for layer, indices in selection.items():
            for i in sorted(set(indices[:1] + indices[-1:])):
                block = getattr(plain, f"layer{layer}")[i]
                where = f"{self.name} ({kind}, layer{layer}[{i}]"
                if kind in ("gate", "head"):
                    channels = block_out_channels(block)
                    if kind == "gate":
                        module = make_gate(self.spec, channels, layer, opts)
                    else:
                        module = self.spec.factory(channels, **opts)
                    x = torch.randn(2, channels, 7, 9, device=self.device)
                    expected = (2, channels, 7, 9) if kind == "gate" else (2, channels, 1, 1)
                    what = f"{channels} channels"
                elif kind == "conv":
                    target = block.conv2
                    module = self.spec.factory(target, **opts)
                    x = torch.randn(2, target.in_channels, 13, 15, device=self.device)
                    with torch.no_grad():
                        expected = tuple(target(x).shape)
                    what = f"replacing conv2 {tuple(target.weight.shape)} stride {target.stride}"
                else:  # block
                    cin = block.conv1.in_channels
                    x = torch.randn(2, cin, 14, 16, device=self.device)
                    block.eval()
                    with torch.no_grad():
                        expected = tuple(block(x).shape)
                    module = self.spec.factory(block, **opts)
                    what = f"replacing {type(block).__name__} ({cin} in)"
                module = module.to(self.device)
                if not isinstance(module, nn.Module):
                    raise _Fail(f"{where}): the factory returned {type(module).__name__}, "
                                f"not an nn.Module")
                for mode in ("train", "eval"):
                    module.train(mode == "train")
                    with torch.no_grad():
                        out = module(x)
                    if _shape(out) != expected:
                        rule = {"gate": "a gate must return its input's shape",
                                "head": "a head maps (N, C, H, W) to (N, C, 1, 1)",
                                "conv": "a conv module must give the replaced conv's shape",
                                "block": "a block module must give the replaced block's "
                                         "shape"}[kind]
                        raise _Fail(f"{where}, {what}, {mode} mode): expected output shape "
                                    f"{expected}, got {_shape(out)} for input "
                                    f"{tuple(x.shape)}; {rule}")
                tried.append(f"layer{layer}[{i}]")
        return f"shapes kept ({kind}) at {', '.join(tried)}; input {tuple(x.shape)}, " \
               f"train and eval"

    # forward ---------------------------------------------------------------------
    def _sweep(self, train: bool) -> str:
        bad = self._failures(self.build(), self.resolutions, train)
        if not train and min(self.resolutions) in bad:
            self._forward_ok = False
        mode = "train" if train else "eval"
        if bad:
            self._plain_instead = True
            try:
                plain = self._failures(self.build(), sorted(bad), train)
            finally:
                self._plain_instead = False
            own = {r: m for r, m in bad.items() if r not in plain}
            if not own:
                raise _Warn(f"{len(bad)} of {len(self.resolutions)} resolutions fail ({mode}, "
                            f"batch 1), and the plain {self.backbone} fails there too, so it "
                            f"is not {self.name}'s doing: " + _res_text(plain))
            shared = f"; the plain {self.backbone} fails at {_res_list(plain)} too" \
                if plain else ""
            raise _Fail(f"{self.name} ({mode}, batch 1): {len(own)} of {len(self.resolutions)} "
                        f"resolutions fail; " + _res_text(own) + shared)
        span = f"{self.resolutions[0]}²..{self.resolutions[-1]}²" \
            if len(self.resolutions) > 1 else f"{self.resolutions[0]}²"
        extra = " + backward" if train else ""
        return f"{len(self.resolutions)} resolutions {span}, batch 1{extra}: " \
               f"(1, {self.num_classes}), finite"

    def _failures(self, model: nn.Module, resolutions: Sequence[int],
                  train: bool) -> Dict[int, str]:
        """``{resolution: why}`` where ``model``'s batch-1 forward (train: and backward)
        fails or gives a wrong or non-finite output."""
        model.train(train)
        bad: Dict[int, str] = {}
        for res in resolutions:
            x = self.input(res)
            try:
                if train:
                    model.zero_grad(set_to_none=True)
                    out = model(x)
                    _loss(out).backward()
                else:
                    with torch.no_grad():
                        out = model(x)
            except Exception as err:  # noqa: BLE001
                bad[res] = error_text(err)
                continue
            if _shape(out) != (1, self.num_classes):
                bad[res] = f"output shape {_shape(out)}, expected (1, {self.num_classes})"
            elif not torch.isfinite(out).all():
                bad[res] = "non-finite output"
        return bad

    def check_forward_eval(self) -> str:
        return self._sweep(train=False)

    def check_forward_train(self) -> str:
        return self._sweep(train=True)

    def check_gradients(self) -> str:
        model = self.build()
        model.train()
        names = self._attention_names
        if not names:
            raise _Warn(f"{self.name} has no parameters of its own (none beyond the plain "
                        f"backbone): nothing to check")
        params = dict(model.named_parameters())
        _loss(model(self.input(min(self.resolutions), batch=2))).backward()
        frozen = [n for n in names if not params[n].requires_grad]
        none = [n for n in names if params[n].requires_grad and params[n].grad is None]
        bad = [n for n in names if params[n].grad is not None
               and not torch.isfinite(params[n].grad).all()]
        zero = [n for n in names if params[n].grad is not None and n not in bad
                and not params[n].grad.abs().sum() > 0]
        if none or bad:
            parts = []
            if none:
                parts.append(f"no gradient reaches {len(none)} of {len(names)} attention "
                             f"parameters (unused in forward, or detached): {_few(none)}")
            if bad:
                parts.append(f"non-finite gradient for {_few(bad)}")
            raise _Fail(f"{self.name}: " + "; ".join(parts))
        note = f"; {len(frozen)} frozen (requires_grad=False)" if frozen else ""
        if zero:
            raise _Warn(f"{self.name}: gradient exactly zero at initialisation for "
                        f"{_few(zero)} (fine if a zero-initialised scale gates them){note}")
        return f"all {len(names) - len(frozen)} attention parameters get a finite, " \
               f"non-zero gradient{note}"

    def check_state_dict(self) -> str:
        a = self.build(seed=self.seed)
        b = self.build(seed=self.seed + 12345)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, map_location=self.device)
        result = b.load_state_dict(state, strict=True)
        if getattr(result, "missing_keys", None) or getattr(result, "unexpected_keys", None):
            raise _Fail(f"{self.name}: state_dict keys differ: {result}")
        a.eval()
        b.eval()
        x = self.input(min(self.resolutions), batch=2)
        with torch.no_grad():
            ya, yb = a(x), b(x)
        if not torch.equal(ya, yb):
            diff = (ya - yb).abs().max().item()
            raise _Fail(f"{self.name}: a rebuilt model with the loaded state_dict gives other "
                        f"outputs (max |diff| {diff:.3g}): some state (a tensor kept as a plain "
                        f"attribute, a non-persistent buffer, Python-side state) is not "
                        f"saved")
        return f"{len(state)} tensors saved and loaded (strict); identical outputs"

    def check_determinism(self) -> str:
        outs = []
        for _ in range(2):
            model = self.build(seed=self.seed)
            x = self.input(min(self.resolutions), batch=1)
            model.eval()
            with torch.no_grad():
                ev = model(x)
            model.train()
            torch.manual_seed(self.seed + 1)
            tr = model(x).detach()
            outs.append((ev, tr))
        problems = []
        if not torch.equal(outs[0][0], outs[1][0]):
            problems.append(f"eval outputs differ (max |diff| "
                            f"{(outs[0][0] - outs[1][0]).abs().max().item():.3g})")
        if not torch.equal(outs[0][1], outs[1][1]):
            problems.append(f"train outputs differ (max |diff| "
                            f"{(outs[0][1] - outs[1][1]).abs().max().item():.3g})")
        if problems:
            raise _Fail(f"{self.name}: two builds with seed {self.seed} disagree: "
                        f"{'; '.join(problems)} (randomness not drawn from torch's seeded "
                        f"generator, or a non-deterministic kernel)")
        return f"seed {self.seed}: identical outputs, eval and train"

    def check_dtype(self) -> str:
        model = self.build()
        loose = []
        for mname, module in model.named_modules():
            for key, value in vars(module).items():
                items = value if isinstance(value, (list, tuple)) else [value]
                if any(isinstance(v, torch.Tensor) for v in items):
                    loose.append(f"{mname}.{key}" if mname else key)
        if loose:
            raise _Fail(f"{self.name}: tensor attribute(s) that are neither parameters nor "
                        f"buffers: {_few(loose)}; they stay behind on .to(device)/.double() "
                        f"and out of the state_dict: register them with register_buffer (or "
                        f"nn.Parameter / nn.ParameterList)")
        model = model.double().eval()
        x = self.input(min(self.resolutions)).double()
        try:
            with torch.no_grad():
                out = model(x)
        except Exception as err:  # noqa: BLE001
            raise _Fail(f"{self.name}: after model.double() the forward fails ({error_text(err)}); "
                        f"a tensor created in forward with a fixed dtype or device? use "
                        f"x.new_tensor / torch.*(..., dtype=x.dtype, device=x.device)") from None
        if out.dtype != torch.float64:
            raise _Fail(f"{self.name}: after model.double() the output is {out.dtype}")
        return "no loose tensor attributes; model.double() runs (a proxy for .to(device))"

    def check_channels_last(self) -> str:
        model = self.build().eval()
        x = self.input(min(self.resolutions), batch=2)
        with torch.no_grad():
            ref = model(x)
            model = model.to(memory_format=torch.channels_last)
            try:
                out = model(x.contiguous(memory_format=torch.channels_last))
            except Exception as err:  # noqa: BLE001
                raise _Warn(f"{self.name}: fails in channels_last memory format "
                            f"({error_text(err)}); use .reshape instead of .view") from None
        if not torch.allclose(ref, out, rtol=1e-4, atol=1e-5):
            raise _Warn(f"{self.name}: channels_last output differs from contiguous "
                        f"(max |diff| {(ref - out).abs().max().item():.3g})")
        return "same outputs in channels_last memory format"

    # FLOPs -------------------------------------------------------------------------
    def check_flops(self, counter: str) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation notes on import
            import fvcore.nn  # noqa: F401
            from attnbench.profilers import flops
        count = flops.count_fvcore if counter == "fvcore" else flops.count_ptflops
        res = self.flops_resolution
        got = count(self.build().eval(), res)
        base = count(self.plain().eval(), res)
        extra = got.macs - base.macs
        new = _uncounted(got.uncounted)
        new.subtract(_uncounted(base.uncounted))
        new = {op: n for op, n in new.items() if n > 0}
        real = sorted(op for op in new if _op_name(op) not in ELEMENTWISE)
        by_convention = sorted(op for op in new if op not in real)
        problems = []
        if real:
            problems.append(
                "ops of the module that do multiply-adds went uncounted: "
                + ", ".join(f"{op} x{new[op]}" for op in real)
                + " (bench/flops.py needs a counting rule for them)")
        if self._attention_names and extra <= 0:
            problems.append(f"counts {extra / 1e9:+.4f} GMac extra for a module with "
                            f"parameters: its work is invisible to {counter}")
        what = (f"{got.macs / 1e9:.4f} GMac at {res}² ({extra / 1e6:+.2f} M over the plain "
                f"{self.backbone}; {got.method})")
        if problems:
            raise _Fail(f"{self.name}: {counter}: {what}; " + "; ".join(problems))
        if by_convention:
            what += ("; uncounted by convention (element-wise, comparisons): "
                     + ", ".join(f"{op} x{new[op]}" for op in by_convention))
        return what


# Element-wise ops and comparisons (max/min, max pooling) that both counters leave at zero by the
# suite's convention (bench/flops.py): listed, never a failure.
ELEMENTWISE = {
    "mul", "add", "sub", "div", "rsub", "neg", "sigmoid", "tanh", "exp", "log", "pow",
    "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "where", "relu", "relu6",
    "hardtanh", "hardswish", "hardsigmoid", "silu", "gelu", "elu", "leaky_relu", "softmax",
    "log_softmax", "max", "min", "amax", "amin", "maximum", "minimum", "reciprocal",
    "square", "erf", "floor", "ceil", "round", "sign", "masked_fill", "fill", "copy",
    "truediv", "radd", "rmul", "rtruediv", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "topk", "sort", "argmax", "argmin",
}


def _res_text(bad: Mapping[int, str]) -> str:
    """``"32²: why; 64²: why"`` (the first three)."""
    return "; ".join(f"{r}²: {m}" for r, m in sorted(bad.items())[:3])


def _res_list(bad: Mapping[int, str]) -> str:
    return ", ".join(f"{r}²" for r in sorted(bad))


def _op_name(op: str) -> str:
    """``aten::mul_`` / ``__rmul__`` / ``mul`` -> ``mul``."""
    name = op.split("::")[-1].strip("_")
    return name


def _few(names: Sequence[str], n: int = 3) -> str:
    names = list(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    return nn.functional.cross_entropy(out.float(), target) + 1e-3 * out.float().square().mean()


def _uncounted(items: Sequence[str]) -> Counter:
    out: Counter = Counter()
    for item in items:
        op, _, n = item.rpartition(" x")
        if not (op and n.isdigit()):
            op, n = item, "1"
        if op.endswith("_") and not op.endswith("__"):
            op = op[:-1]  # in-place and out-of-place variants alike (add_ / add)
        out[op] += int(n)
    return out


# --------------------------------------------------------------------------- the report
def report_text(name: str, results: Sequence[Check]) -> str:
    """The pass/fail table of ``results`` and a last line with the verdict."""
    from tabulate import tabulate
    rows = [[c.name, c.status, f"{c.seconds:.1f}", c.detail] for c in results]
    table = tabulate(rows, headers=["check", "result", "s", "detail"],
                     maxcolwidths=[None, None, None, 90])
    failed = [c.name for c in results if c.status == FAIL]
    counts = {s: sum(c.status == s for c in results) for s in (PASS, WARN, SKIP, FAIL)}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "conforms"
    return f"{table}\n\n{name}: {summary} -- {verdict}"


def exit_code(results: Sequence[Check]) -> int:
    """0 when no check FAILed (WARN and SKIP do not fail), else 1."""
    return 1 if any(c.status == FAIL for c in results) else 0
