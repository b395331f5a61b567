"""Compatibility module: the torch.distributed helpers live in :mod:`gdnsq.train.distributed`
(re-exported here, no logic)."""
from .train.distributed import (DistInfo, all_gather_object, all_reduce_max, all_reduce_mean,  # noqa: F401
                                all_reduce_sum, average_float_buffers, barrier, broadcast_module,
                                broadcast_object, cleanup, default_backend, init_from_env, is_distributed,
                                is_main, make_loader, make_sampler, rank, world_size)

__all__ = ["DistInfo", "is_distributed", "rank", "world_size", "is_main", "default_backend", "init_from_env",
           "cleanup", "barrier", "all_reduce_mean", "all_reduce_sum", "all_reduce_max", "broadcast_module",
           "average_float_buffers", "all_gather_object", "broadcast_object", "make_sampler", "make_loader"]
