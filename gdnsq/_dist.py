"""The ``torch.distributed`` reductions the method itself needs (the objective's running mean,
the convergence test's observed bits). Each is the identity when no process group with more
than one rank is initialised, so single-process code calls them unconditionally.

The training layer's helpers (:mod:`gdnsq.train.distributed`) build on these.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "mean": "SUM"}


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where a tensor must be for a collective: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value: torch.Tensor, op: str) -> torch.Tensor:
    """``value`` reduced over ranks with ``op`` ("sum", "max" or "mean"), as a new tensor on
    ``value``'s device with its dtype; ``value`` itself when not distributed.

    A mean is a SUM divided by the world size (ReduceOp.AVG does not exist on gloo), computed in
    float32 or wider (integers and half types are widened for it).
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return value
    t = value.detach().clone()
    if op == "mean" and (not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16)):
        t = t.float()
    t = t.to(comm_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        t = t / dist.get_world_size()
    return t.to(device=value.device, dtype=value.dtype)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``all_reduce(value, "mean")``: the default ``reduce_fn`` of :class:`gdnsq.GDNSQObjective`."""
    return all_reduce(value, "mean")
