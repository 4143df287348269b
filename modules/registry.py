"""The one registry of attention modules.

Every method -- built-in or plugin -- is a :class:`ModuleSpec`: a name, a kind
(where it attaches to a network), a factory, default options, the paper it
follows and the stages it applies to by default. The builder, the harness, the
command line and the configs all look methods up here by the same short name.

Factory signatures by kind (what :func:`modules.builder.build_model` calls):

========  =====================================================================
kind      factory call and contract
========  =====================================================================
gate      ``factory(channels, **options)`` -> module mapping (N, C, H, W) to the
          same shape; ``stage=`` (1..4) is passed too if the factory accepts it.
conv      ``factory(conv, **options)`` -> module replacing the ``nn.Conv2d``
          ``conv`` (same channels, kernel, stride, padding).
block     ``factory(block, **options)`` -> module replacing a torchvision
          ``BasicBlock`` / ``Bottleneck`` (same input and output shapes).
network   ``factory(backbone, num_classes=..., **options)`` -> the whole model.
head      ``factory(channels, **options)`` -> module replacing global pooling,
          mapping (N, C, H, W) to (N, C, 1, 1).
========  =====================================================================
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

KINDS = ("gate", "conv", "block", "network", "head")


class AttnbenchError(Exception):
    """Base class of the errors this suite raises on purpose."""


class UnknownNameError(AttnbenchError, KeyError):
    """An unknown module or backbone name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OptionError(AttnbenchError, ValueError):
    """A bad option for a module (unknown name, wrong type, impossible value)."""


class RegistrationError(AttnbenchError, ValueError):
    """A module that cannot be registered (clashing name, bad factory...)."""


def closest(name: str, known: Iterable[str]) -> List[str]:
    """Known names closest to ``name`` (for 'did you mean' messages)."""
    known = list(known)
    near = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.4)
    return near or [k for k in known if k.startswith(name[:1].lower())][:3]


def unknown_name_message(what: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    near = closest(name, known)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(known)}."


@dataclass(frozen=True)
class ModuleSpec:
    """One registered attention method."""

    name: str
    kind: str
    factory: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""
    stages: tuple = (1, 2, 3, 4)
    label: Optional[Callable[[Mapping[str, Any]], str]] = None
    description: str = ""
    stage_presets: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)
    source: str = "builtin"

    def options(self, given: Mapping[str, Any]) -> Dict[str, Any]:
        """Defaults updated by ``given``; unknown names and wrong types fail."""
        opts = dict(self.defaults)
        for key, value in given.items():
            if key not in self.defaults:
                known = ", ".join(sorted(self.defaults)) or "none"
                raise OptionError(
                    f"{self.name}: unknown option {key!r} (known options: {known})")
            opts[key] = _coerce(self.name, key, value, self.defaults[key])
        return opts

    def display(self, options: Optional[Mapping[str, Any]] = None) -> str:
        """Readable variant label used in results and reports, e.g. ``TDjoint(T=2,m=1)``."""
        opts = self.options(options or {})
        if self.label is not None:
            return self.label(opts)
        changed = {k: v for k, v in opts.items() if v != self.defaults.get(k)}
        base = self.name.upper() if len(self.name) <= 4 else self.name
        if not changed:
            return base
        return base + "(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")"


def _coerce(module: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the default (ints may stand for floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    else:
        return value
    raise OptionError(
        f"{module}: option {key!r} must be {type(default).__name__} "
        f"(like the default {default!r}), got {value!r}")


class Registry:
    """Name -> :class:`ModuleSpec`; names are short and lowercase."""

    def __init__(self) -> None:
        self._specs: Dict[str, ModuleSpec] = {}

    def add(self, spec: ModuleSpec, *, replace: bool = False) -> ModuleSpec:
        _check_spec(spec)
        old = self._specs.get(spec.name)
        if old is not None and not replace:
            raise RegistrationError(
                f"module name {spec.name!r} is already registered (by {old.source}); "
                f"choose another name, or pass replace=True to override it on purpose")
        self._specs[spec.name] = spec
        return spec

    def remove(self, name: str) -> None:
        self._specs.pop(name, None)

    def get(self, name: str) -> ModuleSpec:
        if not isinstance(name, str):
            raise UnknownNameError(f"module name must be a string, got {name!r}")
        spec = self._specs.get(name.lower())
        if spec is None:
            raise UnknownNameError(unknown_name_message("attention module", name, self._specs))
        return spec

    def names(self) -> List[str]:
        return sorted(self._specs)

    def specs(self) -> List[ModuleSpec]:
        return [self._specs[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._specs

    def snapshot(self) -> Dict[str, ModuleSpec]:
        """A copy of name -> spec, for :meth:`restore` (plugin roll-back, test isolation)."""
        return dict(self._specs)

    def restore(self, snapshot: Mapping[str, ModuleSpec]) -> None:
        """Put the registry back exactly as it was when ``snapshot`` was taken."""
        self._specs.clear()
        self._specs.update(snapshot)

    def set_source(self, name: str, source: str) -> None:
        """Record where a registered module came from (``builtin`` / ``plugin ...``)."""
        import dataclasses
        self._specs[name] = dataclasses.replace(self._specs[name], source=source)


def _check_spec(spec: ModuleSpec) -> None:
    if not spec.name or not spec.name.replace("_", "").replace("-", "").isalnum() \
            or spec.name != spec.name.lower():
        raise RegistrationError(
            f"module name {spec.name!r} must be short, lowercase letters/digits/'-'/'_'")
    if spec.name == "none":
        raise RegistrationError("'none' is reserved for the plain backbone")
    if spec.kind not in KINDS:
        raise RegistrationError(
            f"module {spec.name!r}: kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if not callable(spec.factory):
        raise RegistrationError(f"module {spec.name!r}: factory {spec.factory!r} is not callable")
    try:
        sig = inspect.signature(spec.factory)
    except (TypeError, ValueError):  # builtins without a signature: accept
        return
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    if not positional and not var_pos:
        first = {"gate": "channels", "conv": "conv", "block": "block",
                 "network": "backbone", "head": "channels"}[spec.kind]
        raise RegistrationError(
            f"module {spec.name!r}: a {spec.kind} factory must take the {first!r} argument "
            f"first, as factory({first}, **options); got signature {sig}")
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    if not var_kw:
        names = {p.name for p in params}
        missing = [k for k in spec.defaults if k not in names]
        if missing:
            raise RegistrationError(
                f"module {spec.name!r}: factory signature {sig} does not accept the "
                f"default option(s) {', '.join(missing)}")


REGISTRY = Registry()


def register(name: str, kind: str, *, defaults: Optional[Mapping[str, Any]] = None,
             paper: str = "", stages: Iterable[int] = (1, 2, 3, 4),
             label: Optional[Callable[[Mapping[str, Any]], str]] = None,
             description: str = "", stage_presets: Optional[Mapping[str, Any]] = None,
             replace: bool = False, registry: Optional[Registry] = None):
    """Decorator registering a factory (a function or an ``nn.Module`` class).

    >>> @register("mygate", "gate", defaults={"reduction": 16}, paper="Me et al. 2026")
    ... class MyGate(nn.Module):
    ...     def __init__(self, channels, reduction=16): ...
    """
    def deco(factory):
        doc = (inspect.getdoc(factory) or "").split("\n")[0]
        module = getattr(factory, "__module__", "") or ""
        source = "builtin" if module.startswith("attnbench.modules.") else f"plugin {module}"
        spec = ModuleSpec(name=name, kind=kind, factory=factory, defaults=dict(defaults or {}),
                          paper=paper, stages=tuple(stages), label=label,
                          description=description or doc,
                          stage_presets=dict(stage_presets or {}), source=source)
        (registry or REGISTRY).add(spec, replace=replace)
        return factory
    return deco


def get(name: str) -> ModuleSpec:
    return REGISTRY.get(name)


def list_modules() -> List[ModuleSpec]:
    return REGISTRY.specs()
