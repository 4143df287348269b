"""Training and evaluation over several processes started by ``torchrun``.

``attnbench train`` and ``attnbench robustness`` call :func:`init`: with ``WORLD_SIZE`` > 1
in the environment it joins the process group from torchrun's variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), NCCL on CUDA (rank on
``cuda:LOCAL_RANK``) and gloo on the CPU. Without torchrun every function here is the
one-process case, so a single process runs the same code with a world of one.

* ``--batch-size`` is the global batch: each rank takes ``batch / world`` images.
* Training images are ordered by a :class:`~torch.utils.data.DistributedSampler` (one
  permutation per epoch from the seed, the same one for a single process); rank r takes
  positions r, r + W, ..., so global batch k holds the same images for any world size.
* Augmentations are seeded per image and epoch (:class:`SeededSamples`): an image gets the
  same crop and flip on any rank, with any number of loader workers, and after a resume.
* DistributedDataParallel averages the gradients, so the ranks' weights stay identical.
  Batch norm normalises with each rank's own images unless ``--sync-bn``: then with the
  global batch's statistics (torch's SyncBatchNorm on CUDA; :class:`CPUSyncBatchNorm` on
  the CPU, where torch's does not run), and W ranks match one process with the same global
  batch up to float rounding.
* Only rank 0 logs, shows progress and writes checkpoints and results. Validation and the
  robustness sweep split the images over the ranks and add up the counts (:func:`merge_eval`).

``ATTNBENCH_DDP_DIGESTS=DIR`` (tests): after every optimizer step each rank appends the
SHA-256 of its parameters and of its buffers to ``DIR/rank<r>.jsonl``.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from attnbench.modules.registry import AttnbenchError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DIGEST_ENV = "ATTNBENCH_DDP_DIGESTS"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class DistributedError(AttnbenchError):
    """A distributed run that cannot start (torchrun variables, batch size, data size)."""


# --------------------------------------------------------------------------- the world

def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> str:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (once per process); returns
    the device of this rank (``cuda:LOCAL_RANK`` for a CUDA device, else ``device``)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return device
    missing = [v for v in TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start "
                               f"distributed runs with torchrun (e.g. torchrun "
                               f"--nproc_per_node={size} -m attnbench train ...)")
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy)
    return device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on rank 0, a no-op on the others."""
    return log if is_main() else (lambda _msg: None)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _tensor_device() -> torch.device:
    """Where collectives' tensors live: the rank's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Sequence[float]) -> List[float]:
    """``values`` summed over the ranks (float64)."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


# --------------------------------------------------------------------------- data

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch``."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset[i]`` with torch's RNG seeded by (seed, epoch, i) while it is made, so the
    random transforms of an image depend on nothing else (rank, order, loader workers)."""

    def __init__(self, dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def per_rank_batch(batch_size: int) -> int:
    """The images per rank of the global ``batch_size``."""
    w = world_size()
    if batch_size % w:
        raise DistributedError(f"--batch-size {batch_size} is the global batch and must be "
                               f"divisible by the {w} ranks (e.g. {batch_size // w * w or w})")
    return batch_size // w


def train_loader(dataset, batch_size: int, seed: int, **loader_kw) -> torch.utils.data.DataLoader:
    """This rank's training loader: seeded augmentations, a DistributedSampler over the
    world (one replica in a single process), ``batch_size / world`` images a batch."""
    seeded = SeededSamples(dataset, seed)
    sampler = torch.utils.data.DistributedSampler(
        seeded, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
        drop_last=True)
    per_rank = per_rank_batch(batch_size)
    return torch.utils.data.DataLoader(seeded, batch_size=per_rank, sampler=sampler,
                                       drop_last=len(sampler) > per_rank, **loader_kw)


def start_epoch(loader, epoch: int) -> None:
    """Tell the loader's sampler and seeded dataset which epoch starts."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if isinstance(loader.dataset, SeededSamples):
        loader.dataset.epoch = epoch


def shard(dataset):
    """This rank's images of ``dataset`` (every W-th from the rank's index)."""
    w = world_size()
    if w == 1:
        return dataset
    if len(dataset) < w:
        raise DistributedError(f"{len(dataset)} evaluation images cannot be split over {w} "
                               f"ranks")
    return torch.utils.data.Subset(dataset, range(rank(), len(dataset), w))


def merge_eval(result: Optional[Dict[str, Any]], error: Optional[str] = None
               ) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``(result, error)`` of the whole evaluation from each rank's (``evaluate`` on its
    :func:`shard`): counts added up, or the first error any rank had. Every rank calls it."""
    if world_size() == 1:
        return result, error
    parts: List[Any] = [None] * world_size()
    dist.all_gather_object(parts, (result, error))
    errors = [e for _, e in parts if e]
    if errors:
        return None, errors[0]
    results = [r for r, _ in parts]
    n = sum(int(r["n"]) for r in results)
    merged = dict(results[0], n=n)
    for key in ("top1", "topk"):
        merged[key] = 100.0 * sum(round(r[key] * r["n"] / 100.0) for r in results) / n
    merged["loss"] = sum(r["loss"] * r["n"] for r in results) / n
    return merged, None


# --------------------------------------------------------------------------- the model

def wrap(model: nn.Module, device: str, sync_bn: bool,
         log: Callable[[str], None] = print) -> nn.Module:
    """The module to train: ``model`` in DistributedDataParallel under torchrun (its batch
    norms synchronised first with ``sync_bn``), else ``model`` itself."""
    if world_size() == 1:
        if sync_bn:
            log("note: --sync-bn has no effect in a single process")
        return model
    if sync_bn:
        n = convert_sync_batchnorm(model, device)
        log(f"--sync-bn: {n} batch-norm layers use the statistics of the global batch")
    dev = torch.device(device)
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)


def convert_sync_batchnorm(model: nn.Module, device: str) -> int:
    """Replace every plain ``nn.BatchNorm1d/2d/3d`` of ``model`` (subclasses, e.g. TDAF's
    multi-flow BN, are left alone) by a synchronised one that keeps its parameters and
    buffers (the same tensors: an optimizer made before stays valid); returns the count."""
    cls = nn.SyncBatchNorm if str(device).startswith("cuda") else CPUSyncBatchNorm
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in BATCH_NORMS:
                setattr(parent, name, _synced(child, cls))
                count += 1
    return count


def _synced(bn: nn.Module, cls) -> nn.Module:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    for key in ("weight", "bias"):
        if getattr(bn, key, None) is not None:
            setattr(new, key, getattr(bn, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(bn, key, None) is not None:
            new.register_buffer(key, getattr(bn, key))
    new.train(bn.training)
    return new


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient (the gradients' sum over the ranks)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad.contiguous())


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are the global batch's (summed over the ranks
    with a differentiable all-reduce, in float64); any device and backend, e.g. gloo on
    the CPU. Same parameters and buffers as ``nn.BatchNorm2d``; plain batch norm in eval
    mode and in a single process."""

    def _check_input_dim(self, input) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        c, dims = x.shape[1], [0] + list(range(2, x.dim()))
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims),
                           xd.new_tensor([x.numel() / c])])
        total = _AllReduceSum.apply(local)
        count = float(total[-1].detach())
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype) + self.eps
                                                             ).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * count / max(count - 1, 1))
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype) * m)
        self.running_var.mul_(1 - m).add_(unbiased_var.to(self.running_var.dtype) * m)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank, e.g. before an
    evaluation: without ``--sync-bn`` each rank's running statistics follow its own images."""
    if world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


# --------------------------------------------------------------------------- tests' hook

def record_digest(model: nn.Module, step: int) -> None:
    """With ``ATTNBENCH_DDP_DIGESTS=DIR``: append this rank's parameter and buffer digests
    after optimizer step ``step`` to ``DIR/rank<r>.jsonl``."""
    folder = os.environ.get(DIGEST_ENV)
    if not folder:
        return
    entry = {"step": step, "params": _digest(p for p in model.parameters()),
             "buffers": _digest(b for b in model.buffers())}
    with open(Path(folder) / f"rank{rank()}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
