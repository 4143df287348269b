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
        try:
            return [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise OptionError(f"--stages {text!r}: {STAGES_HELP}") from None
    return check_stages_text(text, value)


# --------------------------------------------------------------------------- validation

STAGES_HELP = ("expected layer numbers 1..4 separated by commas (e.g. 3,4), 'all', a preset "
               "name, or JSON such as '[3, 4]' or '{\"3\": [0, 1], \"4\": \"all\"}'")


def check_stages_text(text: str, value: Any) -> Any:
    """``value`` (parsed from ``--stages text``) if it has the shape of a stage selection."""
    if isinstance(value, bool) or not isinstance(value, (str, int, list, dict)):
        raise OptionError(f"--stages {text!r}: {STAGES_HELP}")
    return value


def number_type(kind: type, minimum: float, strict: bool = False):
    """An argparse ``type``: ``kind`` (int or float), finite, ``>= minimum`` (``>`` when
    ``strict``); a bad value is a one-line usage error naming what would be valid."""
    import argparse
    import math
    op = ">" if strict else ">="
    what = "an integer" if kind is int else "a number"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < minimum \
                or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {what} {op} {minimum:g}, got {text!r}")
        return value
    convert.__name__ = f"{what} {op} {minimum:g}"
    return convert


POSITIVE_INT = number_type(int, 1)
NONNEG_INT = number_type(int, 0)
POSITIVE_FLOAT = number_type(float, 0, strict=True)
NONNEG_FLOAT = number_type(float, 0)


def int_list(text: str, flag: str, minimum: int = 1, example: str = "1,8") -> list:
    """``"64,96"`` -> ``[64, 96]``; anything else names ``flag`` and what it wants."""
    try:
        out = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or min(out) < minimum:
        raise OptionError(f"{flag} {text!r}: expected integers >= {minimum} separated by "
                          f"commas (e.g. {example})")
    return out


def check_device(device: str, flag: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine, else :class:`OptionError`."""
    import re
    text = str(device).strip()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise OptionError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    if text.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise OptionError(f"{flag} {device}: no CUDA device is available on this machine "
                              f"(use --device cpu)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise OptionError(f"{flag} {device}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s), cuda:0.."
                              f"cuda:{torch.cuda.device_count() - 1}")
    return text
