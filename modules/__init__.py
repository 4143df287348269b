"""Attention modules, their registry and the backbone builder.

Importing this package registers every built-in module. To add one, write a file
like ``modules/se.py`` (``attnbench.modules.se``: a factory decorated with
:func:`register`) and import it below -- or, without touching this package, use
the plugin interface (README, "Add a new module").
"""
if __name__ != "attnbench.modules":  # imported as the old top-level ``modules``
    raise ImportError("the top-level package 'modules' is now 'attnbench.modules': use "
                      "`from attnbench import build_model, register`")

from .registry import (REGISTRY, AttnbenchError, ModuleSpec, OptionError, RegistrationError,
                       UnknownNameError, get, list_modules, register)
from . import se, cbam, eca, fca, td, aw, tdaf  # noqa: F401  (registration side effects)
from .builder import BACKBONES, build_model, resolve_stages
from .common import ProductGate

__all__ = ["REGISTRY", "AttnbenchError", "ModuleSpec", "OptionError", "RegistrationError",
           "UnknownNameError", "get", "list_modules", "register", "build_model",
           "resolve_stages", "BACKBONES", "ProductGate"]
