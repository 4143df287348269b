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
  scheduler, epoch, metrics). Each epoch reseeds torch with ``seed + epoch``, shuffles
  with its own permutation and seeds each image's augmentation by (seed, epoch, image),
  so a resumed run sees the same batches and augmentations as an uninterrupted one;
* under ``torchrun --nproc_per_node=N`` DistributedDataParallel over N processes
  (:mod:`attnbench.accuracy.distributed`: ``--batch-size`` is the global batch, optional
  ``--sync-bn``, checkpoints and logs from rank 0).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from attnbench.accuracy import checkpoint as ckpt_io
from attnbench.accuracy import distributed
from attnbench.modules.registry import AttnbenchError
from attnbench.profilers.speed import backward_step
from attnbench.results import check_writable

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


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def eval_transform(res: int, crop_pct: float = 0.875, interpolation: str = "bilinear"):
    """The standard single-crop protocol (timm's ``validate``): resize the shorter side
    to ``int(res / crop_pct)`` with ``interpolation`` (bilinear, bicubic or nearest;
    antialiased except nearest), centre-crop ``res`` x ``res``, normalise."""
    from torchvision import transforms as T
    if interpolation not in INTERPOLATIONS:
        raise TrainError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                         f"got {interpolation!r}")
    mode = getattr(T.InterpolationMode, interpolation.upper())
    return T.Compose([
        T.Resize(resize_size(res, crop_pct), interpolation=mode,
                 antialias=interpolation != "nearest"),
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


#: folders of at most this many images are decoded once and kept in memory
CACHE_MAX_IMAGES = 5000


class CachedLoader:
    """ImageFolder's loader (open, convert to RGB) that decodes each file once: on the
    generated data sets, decoding was about 9 % of a training epoch on the CPU (py-spy).
    The transforms never modify their input image, so the cached one is shared."""

    def __init__(self):
        self.images: Dict[str, Any] = {}

    def __call__(self, path: str):
        image = self.images.get(path)
        if image is None:
            from torchvision.datasets.folder import default_loader
            image = self.images[path] = default_loader(path)
            image.load()
        return image


def image_folder(root: Path, transform, what: str, cache_max: Optional[int] = None):
    """An ImageFolder; folders of up to ``cache_max`` images (default
    :data:`CACHE_MAX_IMAGES`) decode each image once (:class:`CachedLoader`)."""
    from torchvision.datasets import ImageFolder
    root = Path(root)
    if not root.is_dir():
        raise TrainError(f"{root}: no {what} folder (expected an ImageFolder: "
                         f"{root}/<class>/<image>; `attnbench make-data` writes one)")
    try:
        folder = ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise TrainError(f"{root}: not a usable ImageFolder: {err}") from None
    if len(folder.samples) <= (CACHE_MAX_IMAGES if cache_max is None else cache_max):
        folder.loader = CachedLoader()
    return folder


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

#: named training recipes: the settings a preset gives every field left unset (None).
#: ``small-data`` (the default) learns the suite's generated data sets and other small
#: ImageFolders from scratch at CPU scale; ``imagenet`` is the papers' ImageNet recipe
#: (SE / CBAM / TDAM: SGD 0.1 x batch/256, 90-100 epochs, wd 1e-4, crop scale 0.08-1).
RECIPES: Dict[str, Dict[str, Any]] = {
    "small-data": dict(resolution=64, epochs=20, batch_size=32, lr=0.1, optimizer="sgd",
                       nesterov=True, momentum=0.9, weight_decay=5e-4, warmup_epochs=2.0,
                       label_smoothing=0.1, rrc_scale=[0.35, 1.0]),
    "imagenet": dict(resolution=224, epochs=90, batch_size=256, lr=None, optimizer="sgd",
                     nesterov=False, momentum=0.9, weight_decay=1e-4, warmup_epochs=5.0,
                     label_smoothing=0.1, rrc_scale=[0.08, 1.0]),
}
DEFAULT_RECIPE = "small-data"
#: the fields a recipe sets (``lr`` None in a recipe: 0.1 x batch / 256)
RECIPE_FIELDS = ("resolution", "epochs", "batch_size", "lr", "optimizer", "nesterov",
                 "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "rrc_scale")
OPTIMIZERS = ("sgd", "adamw")
_UNSET: Any = None


def recipe_settings(name: str) -> Dict[str, Any]:
    """The settings of recipe ``name`` (a copy); :class:`TrainError` for an unknown one."""
    if name not in RECIPES:
        raise TrainError(f"--recipe {name!r}: unknown; choose one of {', '.join(RECIPES)}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in RECIPES[name].items()}


@dataclass
class TrainConfig:
    """Training settings. Those of :data:`RECIPE_FIELDS` left None take the value of
    ``recipe`` (:data:`RECIPES`); ``lr`` None after that is 0.1 x batch / 256."""

    data: str = ""
    backbone: str = "resnet18"
    module: str = "none"
    options: Dict[str, Any] = field(default_factory=dict)
    stages: Any = None
    recipe: str = DEFAULT_RECIPE
    resolution: int = _UNSET
    crop_pct: float = 0.875
    rrc_scale: List[float] = _UNSET
    epochs: int = _UNSET
    batch_size: int = _UNSET
    lr: Optional[float] = _UNSET
    optimizer: str = _UNSET
    nesterov: bool = _UNSET
    momentum: float = _UNSET
    weight_decay: float = _UNSET
    warmup_epochs: float = _UNSET
    label_smoothing: float = _UNSET
    out: str = "checkpoints/model.pt"
    resume: Optional[str] = None
    device: str = "cpu"
    amp: bool = False
    workers: int = 0
    seed: int = 0
    limit_batches: Optional[int] = None
    eval_every: int = 1
    threads: Optional[int] = None
    sync_bn: bool = False  # under torchrun: batch-norm statistics of the global batch

    def __post_init__(self) -> None:
        preset = recipe_settings(self.recipe)
        for key in RECIPE_FIELDS:
            if getattr(self, key) is None:
                setattr(self, key, preset[key])
        self.rrc_scale = [float(x) for x in self.rrc_scale]

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
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        if not str(self.device).startswith(("cpu", "cuda")):
            raise TrainError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        for key, lo in (("workers", 0), ("eval_every", 0), ("threads", 1)):
            value = getattr(self, key)
            if value is not None and int(value) < lo:
                raise TrainError(f"--{key.replace('_', '-')} must be >= {lo}, got {value!r}")
        if self.module in (None, "", "none") and (self.stages is not None or self.options):
            given = "--stages" if self.stages is not None else "--option"
            raise TrainError(f"{given}: the plain backbone (--module none) has no attention "
                             f"to place or configure; name a module with --module")
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

@dataclass
class _Run:
    """The model and the machinery of one training run."""

    cfg: TrainConfig
    model: nn.Module
    device: torch.device
    amp: bool
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    loader_gen: torch.Generator
    train_loader: Any
    val_loader: Any
    steps: int
    criterion: nn.Module
    net: Optional[nn.Module] = None  # what trains: the model, or its DDP wrapper (torchrun)

    @property
    def label(self) -> str:
        return self.model.attnbench_label


def train(cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] = print,
          allow_changes: bool = False) -> Dict[str, Any]:
    """Train per ``cfg`` (resuming from ``cfg.resume`` if set); returns the final
    checkpoint dict (also written to ``cfg.out``). A resume with other training settings
    (:data:`RECIPE_KEYS`) than the checkpoint's is refused unless ``allow_changes``; every
    setting that changed is recorded in the checkpoint's ``resumes``."""
    resumed = ckpt_io.read_checkpoint(cfg.resume) if cfg.resume else None
    cfg.check()
    resumes = _resumes(cfg, resumed, allow_changes) if resumed is not None else []
    check_writable(cfg.out, "--out")  # before an epoch is spent, not after
    cfg.device = distributed.init(cfg.device)  # torchrun: this rank's device, process group
    log, progress = distributed.main_only(log), progress and distributed.is_main()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    train_set, val_set = _datasets(cfg)
    classes = list(train_set.classes)
    if resumed is not None:
        _check_resumable(cfg, resumed, classes)
    torch.manual_seed(cfg.seed)
    run = _setup(cfg, _build(cfg, len(classes)), train_set, val_set, log)
    start_epoch, history = _restore(run, resumed, log) if resumed is not None else (0, [])
    common = dict(args=asdict(cfg), classes=classes, train_resolution=cfg.resolution,
                  crop_pct=cfg.crop_pct, dataset=str(Path(cfg.data)),
                  extra={"world_size": distributed.world_size(), "resumes": resumes})
    if start_epoch >= cfg.epochs:
        log(f"{cfg.resume}: already trained for {start_epoch} epochs (--epochs {cfg.epochs}); "
            f"nothing to do")
    for epoch in range(start_epoch, cfg.epochs):
        record = _train_epoch(run, epoch, progress)
        if epoch + 1 == cfg.epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            record.update(_validate(run, progress))
        history.append(record)
        _save(run, epoch + 1, history, common)
        log(_epoch_message(run, epoch, record))
    if start_epoch >= cfg.epochs and not Path(cfg.out).exists():
        _save(run, start_epoch, history, common)
    distributed.barrier()
    if not distributed.is_main():  # rank 0 wrote the checkpoint
        return {"label": run.label, "epoch": max(start_epoch, cfg.epochs), "history": history}
    return ckpt_io.read_checkpoint(cfg.out)


def train_seeds(cfg: TrainConfig, seeds: Sequence[int], progress: bool = True,
                log: Callable[[str], None] = print,
                allow_changes: bool = False) -> List[Dict[str, Any]]:
    """Train ``cfg`` once per seed (one seed: into ``cfg.out``; several: into
    ``<out stem>-seed<N>.pt`` each, see :func:`attnbench.accuracy.seeds.seed_path`);
    returns the final checkpoint dicts, in the order of ``seeds``. With ``cfg.resume``
    set and several seeds, each seed resumes its own checkpoint when it exists."""
    from attnbench.accuracy.seeds import seed_path
    seeds = list(seeds)
    if len(seeds) <= 1:
        if seeds:
            cfg.seed = int(seeds[0])
        return [train(cfg, progress, log, allow_changes)]
    out = []
    for seed in seeds:
        one = replace(cfg, seed=int(seed), out=str(seed_path(cfg.out, seed)),
                      options=dict(cfg.options))
        one.resume = one.out if cfg.resume and Path(one.out).exists() else None
        log(f"seed {seed}: {one.out}")
        out.append(train(one, progress, log, allow_changes))
    return out


#: the settings a resumed run may not change unless told to: they change what is learned
RECIPE_KEYS = ("recipe", "resolution", "crop_pct", "rrc_scale", "batch_size", "lr",
               "optimizer", "nesterov", "momentum",
               "weight_decay", "warmup_epochs", "label_smoothing", "seed", "amp", "sync_bn",
               "limit_batches")


def resume_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> Dict[str, List[Any]]:
    """``{setting: [checkpoint's, now]}`` of the settings of ``cfg`` that differ from the
    checkpoint's saved ``args`` (the model's are compared by :func:`_check_resumable`)."""
    now = ckpt_io.plain(asdict(cfg))
    skip = ("out", "resume") + MODEL_FIELDS
    return {k: [saved[k], now[k]] for k in now
            if k in saved and k not in skip and ckpt_io.plain(saved[k]) != now[k]}


def _resumes(cfg: TrainConfig, resumed: Mapping[str, Any], allow: bool) -> List[Dict[str, Any]]:
    """The checkpoint's record of resumes, with this one if it changes any setting;
    :class:`TrainError` for a change of :data:`RECIPE_KEYS` unless ``allow``."""
    changes = resume_changes(resumed.get("args") or {}, cfg)
    recipe = {k: v for k, v in changes.items() if k in RECIPE_KEYS}
    if recipe and not allow:
        what = "; ".join(f"--{k.replace('_', '-')} {v[1]} (checkpoint: {v[0]})"
                         for k, v in recipe.items())
        raise TrainError(f"{cfg.resume}: cannot resume with other training settings than the "
                         f"checkpoint's: {what}; pass --allow-changes to continue anyway (the "
                         f"change is recorded in the checkpoint), or train anew with another "
                         f"--out")
    out = list(resumed.get("resumes") or [])
    if changes:
        out.append({"at_epoch": int(resumed.get("epoch", 0)), "allowed": bool(recipe),
                    "changed": {k: {"from": v[0], "to": v[1]} for k, v in changes.items()}})
    return out


def _datasets(cfg: TrainConfig):
    """The train and val ImageFolders of ``cfg.data``, which must have the same classes."""
    data = Path(cfg.data)
    train_set = image_folder(data / "train", train_transform(cfg.resolution, cfg.rrc_scale),
                             "train")
    val_set = image_folder(data / "val", eval_transform(cfg.resolution, cfg.crop_pct), "val")
    if train_set.classes != val_set.classes:
        raise TrainError(f"{data}: train and val have different classes "
                         f"({len(train_set.classes)} vs {len(val_set.classes)})")
    return train_set, val_set


def _check_resumable(cfg: TrainConfig, resumed: Dict[str, Any], classes: List[str]) -> None:
    """Refuse to resume a checkpoint of another model or of other classes."""
    diffs = ckpt_io.config_differences(resumed["model_config"], cfg.model_config(len(classes)))
    if diffs:
        raise ckpt_io.CheckpointMismatchError(
            f"{cfg.resume}: cannot resume: checkpoint of another model ({'; '.join(diffs)})")
    if resumed.get("classes") and list(resumed["classes"]) != classes:
        raise TrainError(f"{cfg.resume}: cannot resume on {Path(cfg.data)}: its classes differ "
                         f"from the checkpoint's")


def _build(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model of ``cfg``; a module that cannot be built is a :class:`TrainError`."""
    from attnbench.modules.builder import build_model
    try:
        return build_model(cfg.backbone, cfg.module, cfg.stages, num_classes,
                           **dict(cfg.options))
    except AttnbenchError:
        raise
    except Exception as err:  # noqa: BLE001 - a module that cannot be built
        raise TrainError(f"cannot build {cfg.backbone}+{cfg.module} {cfg.options}: "
                         f"{type(err).__name__}: {err}") from err


def _setup(cfg: TrainConfig, model: nn.Module, train_set, val_set, log) -> _Run:
    """Move the model to the device; make the optimizer, loaders, LR schedule, scaler and
    loss."""
    device = torch.device(cfg.device)
    amp = bool(cfg.amp) and device.type == "cuda"
    if cfg.amp and not amp:
        log("note: --amp is for CUDA only; training in float32 on the CPU")
    model.to(device)
    net = distributed.wrap(model, cfg.device, cfg.sync_bn, log)
    optimizer = _optimizer(cfg, model)
    loader_gen = torch.Generator()
    # a DistributedSampler (one replica without torchrun), augmentations seeded per image
    train_loader = distributed.train_loader(
        train_set, cfg.batch_size, cfg.seed, generator=loader_gen, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(
        distributed.shard(val_set), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.workers, pin_memory=device.type == "cuda")
    steps = len(train_loader)
    if cfg.limit_batches:
        steps = min(steps, cfg.limit_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps * cfg.epochs, round(steps * cfg.warmup_epochs)))
    scaler = torch.amp.GradScaler("cuda") if amp else None
    return _Run(cfg, model, device, amp, optimizer, scheduler, scaler, loader_gen,
                train_loader, val_loader, steps,
                nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), net)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov if ``cfg.nesterov``) or AdamW; weight decay on
    weights (ndim > 1), not on biases and BN."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.peak_lr)
    return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.momentum,
                           nesterov=bool(cfg.nesterov) and cfg.momentum > 0)


def _restore(run: _Run, resumed: Dict[str, Any], log) -> Tuple[int, List[Dict[str, Any]]]:
    """Load the resumed checkpoint's weights, optimizer and scheduler; (epoch, history)."""
    ckpt_io.check_state_dict(run.model, resumed["state_dict"], run.cfg.resume)
    run.model.load_state_dict(resumed["state_dict"])
    if resumed.get("optimizer"):
        run.optimizer.load_state_dict(resumed["optimizer"])
    if resumed.get("scheduler"):
        run.scheduler.load_state_dict(resumed["scheduler"])
    start_epoch = int(resumed.get("epoch", 0))
    log(f"resumed {run.cfg.resume} at epoch {start_epoch}/{run.cfg.epochs}")
    ranks = int(resumed.get("world_size") or 1)
    if ranks != distributed.world_size():
        log(f"note: {run.cfg.resume} was trained on {ranks} process(es), this run has "
            f"{distributed.world_size()}: the same global batches, but batch norm sees other "
            f"per-rank batches unless --sync-bn")
    return start_epoch, list(resumed.get("history") or [])


def _train_epoch(run: _Run, epoch: int, progress: bool) -> Dict[str, Any]:
    """One epoch (at most ``run.steps`` batches), reseeded by epoch; its metrics record."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed + epoch)
    run.loader_gen.manual_seed(cfg.seed * 1000 + epoch)
    distributed.start_epoch(run.train_loader, epoch)
    run.model.train()
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=run.steps, desc=f"{run.label} epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", leave=False)
    for i, (images, labels) in enumerate(run.train_loader):
        if i >= run.steps:
            break
        images = images.to(run.device, non_blocking=True)
        labels = labels.to(run.device, non_blocking=True)
        loss, logits = _step(run, images, labels, epoch, i)
        n = labels.numel()
        loss_sum += float(loss.detach()) * n
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}",
                            lr=f"{run.optimizer.param_groups[0]['lr']:.3g}")
    if bar is not None:
        bar.close()
    loss_sum, correct, seen = distributed.all_sum([loss_sum, correct, seen])  # all ranks'
    return {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1), "images": seen,
            "lr": run.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}


def _step(run: _Run, images, labels, epoch: int, i: int):
    """One optimizer and scheduler step on a batch; returns (loss, logits)."""
    with _autocast(run.cfg.device, run.amp):
        logits = (run.net or run.model)(images)
        loss = run.criterion(logits.float(), labels)
    if not torch.isfinite(loss):
        raise TrainError(f"{run.label}: loss became {float(loss)} at epoch {epoch + 1}, "
                         f"step {i + 1} (lower --lr?)")
    run.optimizer.zero_grad(set_to_none=True)
    backward_step(loss, run.optimizer, run.scaler)
    run.scheduler.step()
    distributed.record_digest(run.model, epoch * run.steps + i)
    return loss, logits


def _validate(run: _Run, progress: bool) -> Dict[str, Any]:
    """Validation metrics at the training resolution, as record columns."""
    distributed.sync_buffers(run.model)  # torchrun: every rank evaluates rank 0's model
    val = evaluate(run.model, run.val_loader, run.cfg.device, run.amp, criterion=run.criterion,
                   progress=progress, desc=f"{run.label} val {run.cfg.resolution}px")
    val = distributed.merge_eval(val)[0]  # torchrun: each rank evaluated its share
    return dict(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["topk"],
                val_k=val["k"])


def _save(run: _Run, epoch: int, history: List[Dict[str, Any]], common: Dict[str, Any]) -> None:
    """Write the checkpoint of ``epoch`` finished epochs to ``cfg.out`` (rank 0 only)."""
    if not distributed.is_main():
        return
    ckpt_io.save_checkpoint(run.cfg.out, run.model, optimizer=run.optimizer,
                            scheduler=run.scheduler, epoch=epoch, history=history, **common)


def _epoch_message(run: _Run, epoch: int, record: Dict[str, Any]) -> str:
    """The log line of one finished epoch."""
    msg = (f"{run.label} epoch {epoch + 1}/{run.cfg.epochs}: loss {record['train_loss']:.3f} "
           f"train top1 {record['train_top1']:.1f}%")
    if "val_top1" in record:
        msg += f", val top1 {record['val_top1']:.1f}% top{record['val_k']} " \
               f"{record['val_top5']:.1f}%"
    return msg + f" ({record['seconds']:.0f} s)"


# --------------------------------------------------------------------------- resuming

def resume_settings(checkpoint: str) -> Dict[str, Any]:
    """The :class:`TrainConfig` settings saved in ``checkpoint``, with ``out`` set to it
    (what ``--resume CKPT`` takes where the command line gives nothing)."""
    saved = ckpt_io.read_checkpoint(checkpoint).get("args") or {}
    names = config_fields()
    kw = {k: v for k, v in saved.items() if k in names}
    if "recipe" not in saved:  # written before recipes: SGD without Nesterov, lr None =
        kw["recipe"] = "imagenet"  # 0.1 x batch / 256, as the imagenet recipe resolves it
    kw["out"] = checkpoint
    return kw


def config_fields() -> List[str]:
    """The names of the :class:`TrainConfig` settings."""
    return [f.name for f in fields(TrainConfig)]
