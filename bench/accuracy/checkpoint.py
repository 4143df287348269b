"""Training checkpoints: save, and load back into the exact model that wrote them.

A checkpoint is a ``torch.save`` dict of plain types only (tensors, dicts, lists, str,
int, float, bool, None), so it loads with ``torch.load(..., weights_only=True)`` --
no arbitrary code runs when a checkpoint is read. Keys:

``format``            ``"attnbench-checkpoint"``; ``version``: 1
``model_config``      ``model.attnbench_config``: backbone, attention, stages,
                      num_classes, options (what :func:`modules.build_model` takes)
``label``             ``model.attnbench_label``, e.g. ``SE``, ``TDjoint(T=2,m=1)``
``state_dict``        the weights (and buffers)
``optimizer``, ``scheduler``   their ``state_dict()`` (for ``--resume``), or None
``epoch``             epochs completed
``args``              the training arguments (a dict)
``classes``           class names, in label order
``history``           metrics per epoch (list of dicts)
``train_resolution``, ``crop_pct``, ``dataset``     how the model was trained
``rng``               torch's CPU RNG state at the save (a uint8 tensor)
``torch``             the torch version that wrote it
``content_hash``      ``"sha256:<hex>"`` of every tensor above (name, dtype, shape, bytes),
                      checked on every load: weights changed inside the file are refused
``resumes``           each ``--resume`` that changed a setting: ``at_epoch``, ``changed``
                      ``{setting: {from, to}}``, ``allowed`` (written by :mod:`.train`)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from attnbench.modules.registry import AttnbenchError
from attnbench.results import atomic_write, canonical_options

FORMAT = "attnbench-checkpoint"
VERSION = 1
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(AttnbenchError):
    """A file that is not a readable attnbench checkpoint (missing, corrupt, truncated)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint of another model than the one expected (config, keys or shapes)."""


# --------------------------------------------------------------------------- helpers

def plain(value: Any) -> Any:
    """``value`` reduced to the types ``torch.load(weights_only=True)`` accepts
    (paths become str, tuples and sets lists; unknown objects their ``str``)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    for t in (bool, int, float, str):  # subclasses (e.g. TorchVersion) to the base type
        if isinstance(value, t):
            return t(value)
    if isinstance(value, Mapping):
        return {(k if isinstance(k, (str, int)) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def canonical_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """A model config with defaults filled in, for comparing two configs.

    ``attention`` None/""/"none" -> "none"; backbone lower-cased; options completed
    with the module's defaults (when the module is registered), so ``se`` and
    ``se`` with ``reduction=16`` compare equal; stages as canonical JSON.
    """
    att = config.get("attention")
    att = "none" if att in (None, "", "none") else str(att).lower()
    opts = dict(config.get("options") or {})
    if att != "none":
        try:
            opts = canonical_options(att, opts)[0]
        except AttnbenchError:
            pass  # not registered here: compare the options as given
    stages = config.get("stages")
    return {
        "backbone": str(config.get("backbone", "")).lower(),
        "attention": att,
        "stages": json.dumps(plain(stages), sort_keys=True),
        "num_classes": config.get("num_classes"),
        "options": json.loads(json.dumps(plain(opts), sort_keys=True)),
    }


def config_differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list:
    """``["attention: 'se' != 'cbam'", ...]`` (found vs expected), empty when equal."""
    a, b = canonical_config(found), canonical_config(expected)
    out = []
    for key in ("backbone", "attention", "stages", "num_classes"):
        if a[key] != b[key]:
            out.append(f"{key}: checkpoint has {a[key]!r}, expected {b[key]!r}")
    if a["options"] != b["options"]:
        keys = sorted(set(a["options"]) | set(b["options"]))
        for k in keys:
            va, vb = a["options"].get(k, "<unset>"), b["options"].get(k, "<unset>")
            if va != vb:
                out.append(f"option {k}: checkpoint has {va!r}, expected {vb!r}")
    return out


def describe(config: Mapping[str, Any]) -> str:
    c = canonical_config(config)
    opts = ",".join(f"{k}={v}" for k, v in sorted(c["options"].items()))
    return f"{c['backbone']}+{c['attention']}" + (f"({opts})" if opts else "") \
        + f", {c['num_classes']} classes"


# --------------------------------------------------------------------------- saving

def save_checkpoint(path: PathLike, model: nn.Module, *, optimizer=None, scheduler=None,
                    epoch: int = 0, args: Optional[Mapping[str, Any]] = None,
                    classes=None, history=None, train_resolution: Optional[int] = None,
                    crop_pct: Optional[float] = None, dataset: Optional[str] = None,
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write a checkpoint of ``model`` (built by :func:`modules.build_model`) atomically.

    Returns the path. The model must carry ``attnbench_config`` (the build arguments).
    """
    config = getattr(model, "attnbench_config", None)
    if config is None:
        raise CheckpointError("save_checkpoint: the model has no attnbench_config; build it "
                              "with modules.build_model so that it can be rebuilt on load")
    ckpt: Dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": plain(config),
        "label": str(getattr(model, "attnbench_label", "")),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()) if optimizer is not None else None,
        "scheduler": plain(scheduler.state_dict()) if scheduler is not None else None,
        "epoch": int(epoch),
        "args": plain(dict(args or {})),
        "classes": [str(c) for c in (classes or [])],
        "history": plain(list(history or [])),
        "train_resolution": train_resolution,
        "crop_pct": crop_pct,
        "dataset": dataset,
        "rng": torch.get_rng_state(),
        "torch": str(torch.__version__),
    }
    if extra:
        ckpt.update(plain(dict(extra)))
    ckpt["content_hash"] = content_hash(ckpt)
    path = Path(path)
    atomic_write(path, lambda fh: torch.save(ckpt, fh), binary=True)
    return path


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_cpu(v) for v in obj]
    return plain(obj)


# --------------------------------------------------------------------------- loading

def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """The checkpoint dict (``weights_only=True``); :class:`CheckpointError` if the
    file is missing, unreadable, corrupt, truncated or not an attnbench checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zipfile/pickle/EOF/runtime errors alike
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        msg = next((ln for ln in lines if "error:" in ln.lower()), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: not a readable attnbench checkpoint (corrupt or truncated file?): "
            f"{type(err).__name__}: {msg[:300]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = (f"a dict without format={FORMAT!r} (keys: {', '.join(map(str, list(ckpt)[:8]))})"
                if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path}: not an attnbench checkpoint: it holds {what}; "
                              f"checkpoints are written by `attnbench train`")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt.get('version')!r} is "
                              f"not supported (this attnbench reads version {VERSION})")
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} dict")
    recorded = ckpt.get("content_hash")
    if recorded is not None and content_hash(ckpt) != recorded:
        raise CheckpointError(f"{path}: its tensors do not match the checkpoint's content hash "
                              f"({str(recorded)[:19]}...): the file was changed after "
                              f"attnbench wrote it; restore it or train again")
    return ckpt


def _tensors(value: Any, name: str = ""):
    """``(name, tensor)`` of every tensor in ``value`` (dicts in key order, then lists)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            if not (name == "" and key == "content_hash"):
                yield from _tensors(value[key], f"{name}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{name}/{i}")


def content_hash(ckpt: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of the checkpoint's tensors: for each, its place in the dict,
    dtype, shape and bytes (as stored, on the CPU)."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in _tensors(ckpt):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load_checkpoint(path: PathLike, expect_config: Any = None,
                    map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the checkpoint's model with ``build_model`` and load its weights.

    ``expect_config``: a model config (``model.attnbench_config``) or a model; when
    given, a checkpoint of another model fails with :class:`CheckpointMismatchError`
    naming the file and every difference. Keys or shapes of the weights that do not
    fit the rebuilt model fail the same way. Returns ``(model in eval mode, ckpt)``.
    """
    from attnbench.modules.builder import build_model
    path = Path(path)
    ckpt = read_checkpoint(path, map_location)
    config = ckpt["model_config"]
    if expect_config is not None:
        expected = getattr(expect_config, "attnbench_config", expect_config)
        diffs = config_differences(config, expected)
        if diffs:
            raise CheckpointMismatchError(
                f"{path}: checkpoint of another model: it holds {describe(config)}, expected "
                f"{describe(expected)} ({'; '.join(diffs)})")
    try:
        model = build_model(config.get("backbone"), config.get("attention"),
                            config.get("stages"), config.get("num_classes", 1000),
                            **dict(config.get("options") or {}))
    except AttnbenchError as err:
        raise CheckpointError(f"{path}: cannot rebuild the checkpoint's model "
                              f"{describe(config)}: {err}") from None
    check_state_dict(model, ckpt["state_dict"], path)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    return model, ckpt


def check_state_dict(model: nn.Module, state: Mapping[str, Any], path: PathLike = "?") -> None:
    """:class:`CheckpointMismatchError` listing missing/unexpected keys and shape
    differences between ``state`` and ``model.state_dict()``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and isinstance(state[k], torch.Tensor)
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {name}: {', '.join(items[:5])}{more}")
    label = getattr(model, "attnbench_label", type(model).__name__)
    raise CheckpointMismatchError(f"{path}: weights do not fit the model {label}: "
                                  + "; ".join(parts))
