"""``torch.distributed`` helpers for multi-process data-parallel GDNSQ training.

Launch one process per device with torchrun, e.g.::

    torchrun --standalone --nproc_per_node=2 train.py      # gloo on CPU, NCCL on CUDA

and call :func:`init_from_env` at the top of ``train.py``. Every helper here is a no-op (or the
identity) when the default process group is not initialised, so single-process code can call
them unconditionally.

How every rank takes identical steps (used by :class:`gdnsq.Trainer`):

* the student's parameters and buffers are broadcast from rank 0 before training
  (:func:`broadcast_module`);
* the training step runs through ``torch.nn.parallel.DistributedDataParallel``, whose bucketed
  all-reduces average the gradients over ranks while the backward runs, so the identical
  optimizer on every rank makes the identical update;
* the objective's running mean of the distillation loss is updated with the rank average
  (its default ``reduce_fn``), so the penalty coefficient is the same;
* AEWGS's per-channel statistics are averaged by the quantizers through :func:`all_reduce_mean`;
* at epoch ends the floating-point buffers (BatchNorm running statistics) are averaged, and
  the activation quantizers' observed bits are max-reduced (:class:`gdnsq.ConvergenceTracker`),
  so the convergence decision is the same on every rank;
* on resume rank 0 alone reads the checkpoint and broadcasts it (:func:`broadcast_object`),
  so ranks agree also where their disks differ.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .._dist import all_reduce, comm_device, is_distributed


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and the
    torch ``device`` it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the rank that writes files and prints."""
    return rank() == 0


def default_backend(device: Optional[torch.device] = None) -> str:
    """"nccl" for CUDA devices, "gloo" otherwise."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(backend: Optional[str] = None, *, device: Optional[str] = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    ``init_method="env://"``). Without ``WORLD_SIZE`` (plain ``python train.py``) nothing is
    initialised and a single-process DistInfo is returned.

    Args:
        backend: "gloo", "nccl" or None (NCCL when the device is CUDA, gloo otherwise).
        device: "cpu", "cuda" or None (CUDA when available). On CUDA the process uses
            ``cuda:<LOCAL_RANK>``.
    """
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"init_from_env: backend must be 'gloo', 'nccl' or None, got {backend!r}")
    if device is None:
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = torch.device(device).type
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if dev_type == "cuda" else torch.device(dev_type)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1 and not dist.is_initialized():
        return DistInfo(0, 1, local_rank, dev, None)
    if not dist.is_initialized():
        backend = backend or default_backend(dev)
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError("init_from_env: backend 'nccl' needs CUDA devices; use 'gloo' on CPU")
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def cleanup() -> None:
    """Destroy the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce(value, op: str):
    """``value`` (tensor or number) reduced over ranks; a number comes back as a float."""
    if torch.is_tensor(value):
        return all_reduce(value, op)
    if not is_distributed():
        return value
    return float(all_reduce(torch.tensor(float(value), dtype=torch.float64), op).item())


def all_reduce_mean(value):
    """Average ``value`` over ranks. Tensors are reduced in float32-or-wider and returned as a
    new tensor of the input dtype; Python numbers come back as float. Identity when not
    distributed. Used for AEWGS's per-channel statistics (the objective's default
    ``reduce_fn`` is the same reduction)."""
    return _reduce(value, "mean")


def all_reduce_sum(value):
    """Sum ``value`` (tensor or number) over ranks; identity when not distributed."""
    return _reduce(value, "sum")


def all_reduce_max(value):
    """Maximum of ``value`` (tensor or number) over ranks; identity when not distributed."""
    return _reduce(value, "max")


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            buf = t.detach().to(comm_device()).contiguous()
            dist.broadcast(buf, src=src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf.to(t.device))


def average_float_buffers(module: torch.nn.Module) -> None:
    """Average every floating-point buffer of ``module`` over ranks (BatchNorm running mean and
    variance, which each rank updates from its own batches)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for b in module.buffers():
            if b.is_floating_point():
                b.copy_(all_reduce_mean(b))


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself when not distributed."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def make_sampler(dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` when distributed, else None (let the DataLoader shuffle).

    The trainer calls ``sampler.set_epoch(epoch)`` before each epoch, so the per-epoch order
    depends only on ``seed`` and the epoch number (which makes resume exact)."""
    if not is_distributed():
        return None
    from torch.utils.data.distributed import DistributedSampler
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)


def make_loader(dataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False, **kwargs):
    """A DataLoader that shards ``dataset`` over ranks when distributed.

    Single process: ``shuffle`` uses a dedicated ``torch.Generator`` seeded with ``seed`` whose
    state the trainer checkpoints. Distributed: a :class:`DistributedSampler` (each rank sees
    ``len(dataset) / world_size`` items per epoch; batch_size is per rank)."""
    from torch.utils.data import DataLoader
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    sampler = make_sampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if sampler is not None:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                          drop_last=drop_last, **kwargs)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=num_workers, drop_last=drop_last, **kwargs)
