"""attnbench: a comparative benchmark suite for attention modules in CNNs.

The public API (everything else is internal and may move)::

    from attnbench import build_model, register, list_modules
    model = build_model("resnet50", "td", variant="top", m=3, stages="paper-r50-m3")

Layers, each importing only from the ones below it (``tests/test_layering.py``):
``cli`` -> ``matrix``, ``report``, ``accuracy`` -> ``plugins`` -> ``profilers``,
``results`` -> ``modules``. In the repository this package's root is the folder
``bench/`` and ``attnbench.modules`` is the folder ``modules/`` (README, Layout).
"""
if __name__ != "attnbench":  # imported as the old top-level ``bench``
    raise ImportError("the top-level package 'bench' is now 'attnbench': "
                      "use `import attnbench` / `from attnbench import ...`")

from attnbench.modules import (BACKBONES, AttnbenchError, ModuleSpec, OptionError,  # noqa: E402
                               ProductGate, RegistrationError, UnknownNameError, build_model,
                               get, list_modules, register, resolve_stages)
from attnbench.plugins.loader import load_all as load_plugins  # noqa: E402
from attnbench.plugins.loader import load_plugin  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "BACKBONES", "AttnbenchError", "ModuleSpec", "OptionError", "ProductGate", "RegistrationError",
    "UnknownNameError", "build_model", "get", "list_modules", "register", "resolve_stages",
    "load_plugin", "load_plugins", "__version__",
]
