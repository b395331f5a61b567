"""Compatibility module: the trainer lives in :mod:`gdnsq.train.trainer` (re-exported here, no logic)."""
from .train.trainer import (BEST, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, LAST, METRICS, Trainer,  # noqa: F401
                            load_checkpoint, save_checkpoint)

__all__ = ["Trainer", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "LAST",
           "BEST", "METRICS"]
