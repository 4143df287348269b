"""Parsing shared by the commands that build a model (profile, train, check-module)."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from attnbench.modules.registry import OptionError


def parse_value(text: str) -> Any:
    """``2`` -> 2, ``0.5`` -> 0.5, ``true``/``True`` -> True, ``[3,4]`` -> list,
    ``joint`` -> ``"joint"`` (JSON, else the bare string)."""
    low = text.strip()
    if low in ("True", "False"):
        return low == "True"
    try:
        return json.loads(low)
    except ValueError:
        return low


def parse_options(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``--option KEY=VALUE`` items -> options dict."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--option {item!r}: expected KEY=VALUE (e.g. reduction=8)")
        out[key.strip()] = parse_value(value)
    return out


def parse_stages(text: Optional[str]) -> Any:
    """``--stages``: ``3,4`` -> [3, 4]; JSON (``{"3": [0, 1], "4": "all"}``); a preset name."""
    if text is None:
        return None
    value = parse_value(text)
    if isinstance(value, str) and "," in value:
        return [int(v) for v in value.split(",") if v.strip()]
    return value
