"""Plugins: attention modules from outside this package, in the one registry.

Three ways in, all ending in :func:`attnbench.modules.registry.register`:

1. ``--plugin path/to/file.py`` or ``--plugin package.module`` on any command
   (:func:`load_plugin`, :func:`load_all`). A file is imported under a unique module
   name (two ``attn.py`` in different folders do not collide), once per process.
2. The entry-point group ``attnbench.modules`` of installed packages, found and loaded
   once, lazily, before a command runs (:func:`load_entry_points`). An entry point
   names a module, e.g. ``coordatt = "attnbench_coordatt.coordatt"``; importing it
   runs its ``@register`` decorators.
3. Matrix configs and every command then use the same names.

A plugin that fails leaves the registry as it was (snapshot and restore: no half
registered names) and raises :class:`PluginError` naming the file or module, the line
where it failed and the original error (``__cause__``). Worker processes load the
same plugins: pass them :func:`loaded_plugins` and call :func:`load_all` there
(idempotent, also in forked children).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
import warnings
from types import ModuleType
from typing import Dict, Iterable, List, Optional

import attnbench.modules  # noqa: F401  (built-ins first, so plugin clashes are detected)
from attnbench.modules.registry import REGISTRY, AttnbenchError

ENTRY_POINT_GROUP = "attnbench.modules"

#: attnbench's old top-level packages, which a plugin written for them may still import
OLD_PACKAGES = {"modules": "attnbench.modules", "bench": "attnbench"}
_OLD_IMPORT = re.compile(r"\s*(?:from|import)\s+(modules|bench)\b")


class PluginError(AttnbenchError):
    """A plugin (file, module or entry point) that could not be loaded."""


_loaded: List[str] = []                    # specs loaded by this process, in order
_file_modules: Dict[str, ModuleType] = {}  # absolute path -> module
_names_by_plugin: Dict[str, List[str]] = {}
_entry_points_done = False
_entry_point_errors: List[str] = []


def is_file_spec(spec: str) -> bool:
    """``True`` for a path (``x.py``, ``dir/x``), ``False`` for a dotted module name."""
    return spec.endswith(".py") or os.sep in spec or "/" in spec or os.path.isfile(spec)


def loaded_plugins() -> List[str]:
    """The ``--plugin`` specs loaded so far (files as absolute paths), in order.

    Hand this list to worker processes and call ``load_all(specs)`` there first; entry
    points need not be passed (``load_all`` finds them itself).
    """
    return list(_loaded)


def plugin_names() -> Dict[str, List[str]]:
    """Which module names each loaded plugin (spec or ``entry point NAME``) registered."""
    return {k: list(v) for k, v in _names_by_plugin.items()}


def entry_point_errors() -> List[str]:
    """Messages of installed entry points that failed to load (see :func:`load_entry_points`)."""
    return list(_entry_point_errors)


def load_all(specs: Iterable[str] = ()) -> List[ModuleType]:
    """Entry points (once per process), then each ``--plugin`` spec, in order."""
    load_entry_points()
    return [load_plugin(spec) for spec in (specs or ())]


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin: a ``.py`` file path or a dotted module name (idempotent)."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"--plugin needs a .py file or a dotted module name, got {spec!r}")
    spec = spec.strip()
    if is_file_spec(spec):
        path = os.path.abspath(os.path.expanduser(spec))
        if path in _file_modules:
            return _file_modules[path]
        same = _imported_from(path)  # e.g. an installed plugin's file given again
        if same is not None:
            _file_modules[path] = same
            _remember(path)
            return same
        if not os.path.isfile(path):
            hint = "" if spec.endswith(".py") else " (a dotted module name has no '/')"
            raise PluginError(f"plugin file {spec!r} not found (looked for {path}){hint}")
        module = _guarded(spec, path, lambda: _import_file(path), f"plugin {path}")
        _check_registers(spec, module, path)
        _file_modules[path] = module
        _remember(path)
        return module
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", spec):
        raise PluginError(f"plugin {spec!r} is neither an existing .py file nor a dotted "
                          f"module name")
    if spec in sys.modules:
        _check_registers(spec, sys.modules[spec], spec)
        _remember(spec)
        return sys.modules[spec]
    module = _guarded(spec, _origin(spec), lambda: _import_module(spec), f"plugin {spec}",
                      key=spec)
    _check_registers(spec, module, spec)
    _remember(spec)
    return module


def _check_registers(spec: str, module: ModuleType, key: str) -> None:
    """:class:`PluginError` when the plugin ``spec`` registered no attention module: neither
    while it was imported (``key`` in :func:`plugin_names`) nor, for a module imported
    before, with a factory defined in it or in its package."""
    if _names_by_plugin.get(key):
        return
    name = module.__name__
    for registered in REGISTRY.specs():
        home = getattr(registered.factory, "__module__", "") or ""
        if home == name or home.startswith(name + "."):
            return
    if name.startswith("attnbench_plugin_"):  # a file imported under a name of ours
        sys.modules.pop(name, None)
    raise PluginError(f"plugin {spec!r} registered no attention module: importing it ran no "
                      f"@register (is it the right file or module? a plugin registers its "
                      f"modules with `from attnbench import register`)")


def load_entry_points(strict: bool = False, force: bool = False) -> List[str]:
    """Load the installed ``attnbench.modules`` entry points, once per process.

    Returns the names of the entry points loaded by this call. One that fails is
    rolled back and reported as a warning (one broken package must not stop every
    command); ``strict=True`` raises its :class:`PluginError` instead.
    """
    global _entry_points_done
    if _entry_points_done and not force:
        return []
    _entry_points_done = True
    done: List[str] = []
    seen = set()
    for ep in _entry_points():
        key = (ep.name, ep.value)
        if key in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(key)
        dist = getattr(getattr(ep, "dist", None), "name", None)
        what = f"entry point {ep.name!r} = {ep.value!r}" + (f" of {dist}" if dist else "")
        try:
            _guarded(what, _origin(ep.module), ep.load,
                     f"plugin {ep.value}" + (f" ({dist})" if dist else ""),
                     key=f"entry point {ep.name}")
        except PluginError as err:
            if strict:
                raise
            _entry_point_errors.append(str(err))
            warnings.warn(f"attnbench: skipped a broken plugin: {err}", RuntimeWarning,
                          stacklevel=2)
            continue
        done.append(ep.name)
    return done


def _entry_points():
    from importlib import metadata
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return list(eps)


def _imported_from(path: str) -> Optional[ModuleType]:
    """A module already imported from the file ``path`` (importing it twice would clash)."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file) == path:
            return module
    return None


def _origin(name: str) -> Optional[str]:
    """The file of a dotted module name, or ``None`` (imports its parent packages)."""
    try:
        found = importlib.util.find_spec(name)
    except Exception:  # noqa: BLE001  (a missing or broken parent package)
        return None
    origin = getattr(found, "origin", None)
    return os.path.abspath(origin) if origin and os.path.isfile(origin) else None


def _remember(spec: str) -> None:
    if spec not in _loaded:
        _loaded.append(spec)


def _unique_name(path: str) -> str:
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]) or "plugin"
    return f"attnbench_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _import_file(path: str) -> ModuleType:
    name = _unique_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise PluginError(
                f"plugin {name!r}: no module named {err.name!r} (and no file {name!r}); give "
                f"a path to a .py file, or a module importable from sys.path "
                f"(pip install the package, or set PYTHONPATH)") from None
        raise


def _guarded(what: str, path: Optional[str], load, source: str, key: Optional[str] = None):
    """Run ``load`` with the registry snapshotted; on any error restore it and raise."""
    before = REGISTRY.snapshot()
    try:
        module = load()
    except PluginError:
        REGISTRY.restore(before)
        raise
    except BaseException as err:  # noqa: BLE001  (SystemExit in a plugin too)
        REGISTRY.restore(before)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise PluginError(f"{what} failed to load{_where(err, path)}: "
                          f"{type(err).__name__}: {_reason(err)}; no module of it was "
                          f"registered") from err
    added = [n for n, s in REGISTRY.snapshot().items() if before.get(n) is not s]
    for name in added:  # a readable source for `attnbench list` and clash messages
        if REGISTRY.get(name).source.startswith("plugin "):
            REGISTRY.set_source(name, source)
    _names_by_plugin[key or (path or what)] = added
    return module


def _reason(err: BaseException) -> str:
    """The error's message; for an import of attnbench's old top-level names (``modules``,
    ``bench``) what to import instead."""
    old = _old_package(err)
    if old is None:
        return str(err)
    return (f"it imports '{old}', the old top-level name of '{OLD_PACKAGES[old]}'; import "
            f"from attnbench instead, e.g. `from attnbench import register` (the public API: "
            f"attnbench.__all__)")


def _old_package(err: BaseException) -> Optional[str]:
    """``modules`` or ``bench`` when ``err`` is the failed import of that old name (not
    installed, or refused by the folder of a checkout), else ``None``."""
    if not isinstance(err, ImportError):
        return None
    top = (err.name or "").split(".")[0]
    if top in OLD_PACKAGES:
        return top
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        found = _OLD_IMPORT.match(frame.line or "")
        if found:
            return found.group(1)
    return None


def _where(err: BaseException, path: Optional[str]) -> str:
    """`` (FILE, line N)``: the innermost frame in the plugin (or any file) that raised."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" ({err.filename}, line {err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    if path is not None:
        mine = [f for f in frames if os.path.abspath(f.filename) == path]
        if mine:
            return f" ({path}, line {mine[-1].lineno})"
        return f" ({path})"
    frames = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    if frames:
        return f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return ""
