"""``attnbench train``: train a backbone with one registered attention module.

Standard ImageNet-style recipe on any torchvision ImageFolder (``DIR/train/<class>``,
``DIR/val/<class>``):

* train: ``RandomResizedCrop(res, scale=(0.08, 1))`` + horizontal flip; val:
  ``Resize(int(res / crop_pct))`` (shorter side) + ``CenterCrop(res)``; ImageNet
  mean/std normalisation;
* SGD with momentum (weight decay on conv/linear weights, not on biases and BN),
  peak LR ``--lr`` (default 0.1 x batch / 256, the linear scaling rule), a per-step
  learning-rate schedule (``torch.optim.lr_scheduler.LambdaLR``): linear warm-up over
  ``--warmup-epochs``, then cosine decay to 0 at the last step;
* ``CrossEntropyLoss(label_smoothing=...)``; AMP (float16 autocast + GradScaler) on
  CUDA only;
* a checkpoint (see :mod:`attnbench.accuracy.checkpoint`) written at the end of every epoch, so
  ``--resume CKPT`` continues from the last finished epoch (model, optimizer,
  scheduler, epoch, metrics). Each epoch reseeds torch with ``seed + epoch`` and
  shuffles with its own generator, so a resumed run sees the same batches and
  augmentations as an uninterrupted one.
"""
from __future__ import annotations

from attnbench.cli.args import parse_options, parse_stages, parse_value  # noqa: F401

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from attnbench.modules.registry import AttnbenchError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TrainError(AttnbenchError):
    """Bad training arguments or data."""


# --------------------------------------------------------------------------- transforms

def resize_size(res: int, crop_pct: float) -> int:
    """Shorter side before the centre crop: ``int(res / crop_pct)`` (float-safe)."""
    if not 0 < crop_pct <= 1:
        raise TrainError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return int(res / crop_pct + 1e-6)


def eval_transform(res: int, crop_pct: float = 0.875):
    """The standard single-crop protocol: resize the shorter side to
    ``int(res / crop_pct)``, centre-crop ``res`` x ``res``, normalise."""
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(resize_size(res, crop_pct), interpolation=T.InterpolationMode.BILINEAR,
                 antialias=True),
        T.CenterCrop(res),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def train_transform(res: int, scale: Tuple[float, float] = (0.08, 1.0)):
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(res, scale=tuple(scale), antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def image_folder(root: Path, transform, what: str):
    from torchvision.datasets import ImageFolder
    root = Path(root)
    if not root.is_dir():
        raise TrainError(f"{root}: no {what} folder (expected an ImageFolder: "
                         f"{root}/<class>/<image>; `attnbench make-data` writes one)")
    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise TrainError(f"{root}: not a usable ImageFolder: {err}") from None


# --------------------------------------------------------------------------- metrics

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str, amp: bool = False,
             topk: int = 5, desc: Optional[str] = None, progress: bool = False,
             criterion: Optional[nn.Module] = None) -> Dict[str, float]:
    """Top-1, top-k (k = min(topk, classes)) accuracy in % and mean loss over ``loader``."""
    model.eval()
    correct1 = correctk = seen = 0
    loss_sum = 0.0
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc=desc or "eval", unit="batch", leave=False)
    for images, labels in it:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        if criterion is not None:
            loss_sum += float(criterion(logits, labels)) * labels.numel()
        k = min(topk, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top.eq(labels[:, None])
        correct1 += int(hit[:, 0].sum())
        correctk += int(hit.any(dim=1).sum())
        seen += labels.numel()
    if seen == 0:
        raise TrainError("evaluation saw no images")
    return {"top1": 100.0 * correct1 / seen, "topk": 100.0 * correctk / seen,
            "k": min(topk, _num_classes(model)), "loss": loss_sum / seen, "n": seen}


def _num_classes(model: nn.Module) -> int:
    cfg = getattr(model, "attnbench_config", None) or {}
    return int(cfg.get("num_classes") or 1000)


def _autocast(device: str, amp: bool):
    if amp and str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    import contextlib
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    data: str = ""
    backbone: str = "resnet18"
    module: str = "none"
    options: Dict[str, Any] = field(default_factory=dict)
    stages: Any = None
    resolution: int = 112
    crop_pct: float = 0.875
    rrc_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    epochs: int = 10
    batch_size: int = 64
    lr: Optional[float] = None  # None: 0.1 * batch_size / 256 (linear scaling rule)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    out: str = "checkpoints/model.pt"
    resume: Optional[str] = None
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    seed: int = 0
    limit_batches: Optional[int] = None
    eval_every: int = 1
    threads: Optional[int] = None

    def check(self) -> None:
        for key in ("resolution", "epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise TrainError(f"--{key.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, key)!r}")
        if self.lr is not None and self.lr <= 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0:
            raise TrainError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.limit_batches is not None and self.limit_batches < 1:
            raise TrainError(f"--limit-batches must be >= 1, got {self.limit_batches}")
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise TrainError(f"--rrc-scale must be 0 < lo <= hi <= 1, got {self.rrc_scale}")
        if not str(self.device).startswith(("cpu", "cuda")):
            raise TrainError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise TrainError("--device cuda: no CUDA device is available here")

    @property
    def peak_lr(self) -> float:
        return float(self.lr) if self.lr is not None else 0.1 * self.batch_size / 256

    def model_config(self, num_classes: int) -> Dict[str, Any]:
        return {"backbone": self.backbone, "attention": self.module, "stages": self.stages,
                "num_classes": num_classes, "options": dict(self.options)}


MODEL_FIELDS = ("backbone", "module", "options", "stages")


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at optimizer step ``s`` (0-based): linear warm-up
    ``(s + 1) / warmup`` then cosine ``0.5 * (1 + cos(pi * t))`` to 0 at the end."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


# --------------------------------------------------------------------------- training

def train(cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] = print,
          ) -> Dict[str, Any]:
    """Train per ``cfg`` (resuming from ``cfg.resume`` if set); returns the final
    checkpoint dict (also written to ``cfg.out``)."""
    from attnbench.modules.builder import build_model
    from attnbench.accuracy.checkpoint import check_state_dict, config_differences, read_checkpoint, \
        save_checkpoint

    start_epoch = 0
    history: List[Dict[str, Any]] = []
    resumed = None
    if cfg.resume:
        resumed = read_checkpoint(cfg.resume)
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    data = Path(cfg.data)
    train_set = image_folder(data / "train", train_transform(cfg.resolution, cfg.rrc_scale),
                             "train")
    val_set = image_folder(data / "val", eval_transform(cfg.resolution, cfg.crop_pct), "val")
    if train_set.classes != val_set.classes:
        raise TrainError(f"{data}: train and val have different classes "
                         f"({len(train_set.classes)} vs {len(val_set.classes)})")
    classes = list(train_set.classes)
    config = cfg.model_config(len(classes))
    if resumed is not None:
        diffs = config_differences(resumed["model_config"], config)
        if diffs:
            from attnbench.accuracy.checkpoint import CheckpointMismatchError
            raise CheckpointMismatchError(f"{cfg.resume}: cannot resume: checkpoint of another "
                                          f"model ({'; '.join(diffs)})")
        if resumed.get("classes") and list(resumed["classes"]) != classes:
            raise TrainError(f"{cfg.resume}: cannot resume on {data}: its classes differ from "
                             f"the checkpoint's")
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.backbone, cfg.module, cfg.stages, len(classes),
                            **dict(cfg.options))
    except AttnbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - a module that cannot be built
        raise TrainError(f"cannot build {cfg.backbone}+{cfg.module} {cfg.options}: "
                         f"{type(err).__name__}: {err}") from err
    device = torch.device(cfg.device)
    amp = bool(cfg.amp) and device.type == "cuda"
    if cfg.amp and not amp:
        log("note: --amp is for CUDA only; training in float32 on the CPU")
    model.to(device)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.peak_lr, momentum=cfg.momentum)
    loader_gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, generator=loader_gen,
        num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size,
        pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda")
    steps = len(train_loader)
    if cfg.limit_batches:
        steps = min(steps, cfg.limit_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps * cfg.epochs, round(steps * cfg.warmup_epochs)))
    scaler = torch.amp.GradScaler("cuda") if amp else None
    if resumed is not None:
        check_state_dict(model, resumed["state_dict"], cfg.resume)
        model.load_state_dict(resumed["state_dict"])
        if resumed.get("optimizer"):
            optimizer.load_state_dict(resumed["optimizer"])
        if resumed.get("scheduler"):
            scheduler.load_state_dict(resumed["scheduler"])
        start_epoch = int(resumed.get("epoch", 0))
        history = list(resumed.get("history") or [])
        log(f"resumed {cfg.resume} at epoch {start_epoch}/{cfg.epochs}")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    label = model.attnbench_label
    args = asdict(cfg)
    ckpt_common = dict(args=args, classes=classes, train_resolution=cfg.resolution,
                       crop_pct=cfg.crop_pct, dataset=str(data))
    if start_epoch >= cfg.epochs:
        log(f"{cfg.resume}: already trained for {start_epoch} epochs (--epochs {cfg.epochs}); "
            f"nothing to do")
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed + epoch)
        loader_gen.manual_seed(cfg.seed * 1000 + epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"{label} epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", leave=False)
        for i, (images, labels) in enumerate(train_loader):
            if i >= steps:
                break
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with _autocast(cfg.device, amp):
                logits = model(images)
                loss = criterion(logits.float(), labels)
            if not torch.isfinite(loss):
                raise TrainError(f"{label}: loss became {float(loss)} at epoch {epoch + 1}, "
                                 f"step {i + 1} (lower --lr?)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            n = labels.numel()
            loss_sum += float(loss.detach()) * n
            correct += int((logits.argmax(1) == labels).sum())
            seen += n
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.3g}")
        if bar is not None:
            bar.close()
        record: Dict[str, Any] = {
            "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1), "images": seen,
            "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            val = evaluate(model, val_loader, cfg.device, amp, criterion=criterion,
                           progress=progress, desc=f"{label} val {cfg.resolution}px")
            record.update(val_loss=val["loss"], val_top1=val["top1"],
                          val_top5=val["topk"], val_k=val["k"])
        history.append(record)
        save_checkpoint(cfg.out, model, optimizer=optimizer, scheduler=scheduler,
                        epoch=epoch + 1, history=history, **ckpt_common)
        msg = (f"{label} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.3f} "
               f"train top1 {record['train_top1']:.1f}%")
        if "val_top1" in record:
            msg += f", val top1 {record['val_top1']:.1f}% top{record['val_k']} " \
                   f"{record['val_top5']:.1f}%"
        log(msg + f" ({record['seconds']:.0f} s)")
    if start_epoch >= cfg.epochs and not Path(cfg.out).exists():
        save_checkpoint(cfg.out, model, optimizer=optimizer, scheduler=scheduler,
                        epoch=start_epoch, history=history, **ckpt_common)
    from attnbench.accuracy.checkpoint import read_checkpoint as _read
    return _read(cfg.out)


# --------------------------------------------------------------------------- CLI

def register_cli(sub, parent) -> None:
    p = sub.add_parser(
        "train", parents=[parent], help="train a backbone + attention module on an ImageFolder",
        description="Train a torchvision ResNet with one registered attention module on an "
                    "ImageFolder dataset (DIR/train/<class>, DIR/val/<class>): "
                    "RandomResizedCrop+flip, SGD with momentum, linear warm-up + cosine LR, "
                    "label smoothing, AMP on CUDA. Writes a checkpoint every epoch; "
                    "--resume CKPT continues it (settings not given on the command line "
                    "are taken from the checkpoint).")
    d = TrainConfig()
    S = argparse.SUPPRESS

    def add(flag, help_, default=None, **kw):
        text = help_ + (f" (default: {default})" if default is not None else "")
        p.add_argument(flag, default=S, help=text, **kw)

    add("--data", "ImageFolder root with train/ and val/ (required unless --resume)")
    add("--backbone", "torchvision ResNet", d.backbone)
    add("--module", "registered module name, or none", d.module)
    p.add_argument("--option", action="append", default=S, metavar="KEY=VALUE",
                   help="module option (repeatable); values parsed as JSON, else strings "
                        "(e.g. --option variant=joint --option steps=2)")
    add("--stages", "stage selection as JSON (e.g. '[3,4]'), 'all' or a preset name",
        "the module's default stages")
    add("--resolution", "training resolution", d.resolution, type=int)
    add("--crop-pct", "validation: resize to int(res/crop_pct), centre-crop res", d.crop_pct,
        type=float)
    add("--rrc-scale", "RandomResizedCrop area scale range LO,HI", "0.08,1.0")
    add("--epochs", "total epochs (of the whole run, resumed or not)", d.epochs, type=int)
    add("--batch-size", "batch size", d.batch_size, type=int)
    add("--lr", "peak learning rate (after warm-up)", "0.1 * batch-size / 256", type=float)
    add("--momentum", "SGD momentum", d.momentum, type=float)
    add("--weight-decay", "on weights (not on biases / BN)", d.weight_decay, type=float)
    add("--warmup-epochs", "linear warm-up length", d.warmup_epochs, type=float)
    add("--label-smoothing", "CrossEntropyLoss label smoothing", d.label_smoothing,
        type=float)
    add("--out", "checkpoint path, rewritten every epoch", f"{d.out}, or --resume's path")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue training from this checkpoint (same model and data)")
    add("--device", "cpu, cuda or cuda:N", d.device)
    p.add_argument("--amp", action="store_true", default=S,
                   help="float16 autocast + GradScaler (CUDA only; ignored on the CPU)")
    add("--workers", "DataLoader workers", d.workers, type=int)
    add("--seed", "seed", d.seed, type=int)
    add("--limit-batches", "at most this many batches per epoch (smoke tests)", type=int)
    add("--eval-every", "validate every N epochs (and after the last)", d.eval_every, type=int)
    add("--threads", "torch CPU threads (1 is much faster on an oversubscribed machine)",
        "torch's choice", type=int)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_cli)
    from attnbench.accuracy import data
    data.register_cli(sub, parent)


def config_from_args(args) -> TrainConfig:
    """Command-line values, else (with ``--resume``) the checkpoint's, else defaults."""
    given = {k: v for k, v in vars(args).items()}
    names = {f.name for f in fields(TrainConfig)}
    kw: Dict[str, Any] = {}
    if given.get("resume"):
        from attnbench.accuracy.checkpoint import read_checkpoint
        saved = read_checkpoint(given["resume"]).get("args") or {}
        kw.update({k: v for k, v in saved.items() if k in names})
        kw["out"] = given["resume"]
    if "stages" in given:
        given["stages"] = parse_value(given["stages"])
    if "rrc_scale" in given:
        try:
            lo, hi = (float(x) for x in str(given["rrc_scale"]).split(","))
        except ValueError:
            raise TrainError(f"--rrc-scale {given['rrc_scale']!r}: expected LO,HI "
                             f"(e.g. 0.08,1.0)") from None
        given["rrc_scale"] = [lo, hi]
    if "option" in given:
        given["options"] = parse_options(given["option"])
    kw.update({k: v for k, v in given.items() if k in names and k != "resume"})
    kw["resume"] = given.get("resume")
    if not kw.get("data"):
        raise TrainError("train: --data DIR is required (unless --resume names a checkpoint)")
    return TrainConfig(**kw)


def _run_cli(args) -> int:
    cfg = config_from_args(args)
    ckpt = train(cfg, progress=not args.no_progress)
    last = ckpt["history"][-1] if ckpt.get("history") else {}
    print(f"wrote {cfg.out} ({ckpt['label']}, epoch {ckpt['epoch']}"
          + (f", val top1 {last['val_top1']:.1f}%" if "val_top1" in last else "") + ")")
    return 0
