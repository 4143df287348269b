"""Plugin loading (placeholder until the plugin issue lands): ``--plugin`` files/modules
and the ``attnbench.modules`` entry-point group."""
from __future__ import annotations

import importlib
from typing import Iterable


def load_all(specs: Iterable[str] = ()) -> None:
    for spec in specs:
        importlib.import_module(spec)
