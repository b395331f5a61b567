"""Trainer checkpoint files and random streams: what makes a resumed run bit-identical.

* :func:`save_checkpoint` / :func:`load_checkpoint`: sealed files (length + SHA-256, see
  :mod:`gdnsq._sealed`) with a format tag, a version and a completion marker; a damaged or
  foreign file is refused with a one-line ValueError, never half-loaded.
* :func:`read_on_main`: rank 0 alone reads a checkpoint and broadcasts it, so every rank
  resumes from the same state also where the ranks do not share a disk.
* :class:`RandomStreams`: the trainer's own random streams (torch CPU and CUDA, NumPy,
  Python), seeded from the config, swapped into the global generators only while the trainer
  trains, and saved in every checkpoint with the loaders' generators.
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from typing import Iterable, Optional

import numpy as np
import torch

from . import distributed as gdist
from .._sealed import MAGIC as _SEAL_MAGIC, read_sealed, write_sealed

CHECKPOINT_FORMAT = "gdnsq.trainer.checkpoint"  # a file-format tag written into checkpoints: never renamed
#: Version 2: the schedule is an LRScheduler and the objective's state tensors (version 1 still loads).
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
METRICS = "metrics.jsonl"

# Config fields that may change between a run and its resume without breaking exactness
# (they decide when to stop, what to print, or where to run).
RESUME_FREE_FIELDS = {"max_epochs", "max_minutes", "patience", "progress", "log_every", "num_workers",
                      "device", "extra", "val_every"}


# --------------------------------------------------------------------------- files

def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write a trainer checkpoint atomically with its length and SHA-256 (see gdnsq._sealed)."""
    write_sealed(ckpt, path)


def load_checkpoint(path: str, kind: Optional[str] = None) -> dict:
    """Load and check a trainer checkpoint (CPU tensors).

    Raises ValueError with the path when the file is truncated/corrupt (length or SHA-256 checksum
    mismatch), is not a gdnsq trainer checkpoint, has a format version this gdnsq does not read,
    lacks the completion marker, or (with ``kind``) is not of that kind ("last" or "best").
    Checkpoints written before checksums (plain ``torch.save`` archives) still load, with a
    warning that they are unverified."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(len(_SEAL_MAGIC))
    if head == _SEAL_MAGIC:
        ckpt = read_sealed(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip archive fails inside torch.load
            raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "delete it to restart, or restore a complete copy") from None
        if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
            warnings.warn(f"checkpoint {path} was written without a checksum (older gdnsq); "
                          "it is loaded unverified")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a gdnsq trainer checkpoint (format marker missing)")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')!r}; "
                         f"this gdnsq reads versions {list(READABLE_VERSIONS)}")
    if ckpt.get("complete") is not True:
        raise ValueError(f"checkpoint {path} lacks its completion marker (incomplete write)")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"checkpoint {path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


def read_on_main(path: str, kind: str, fields: Optional[Iterable[str]] = None) -> Optional[dict]:
    """The checkpoint at ``path`` as rank 0 reads it, on every rank (None where rank 0 finds no
    file): only rank 0 touches the file system, then broadcasts what it read, or the error it
    raised (every rank raises it). ``fields`` keeps only those keys (less to broadcast)."""
    result, error = None, None
    if gdist.is_main():
        try:
            if os.path.exists(path):
                ckpt = load_checkpoint(path, kind=kind)
                result = ("ok", ckpt if fields is None else {k: ckpt[k] for k in fields})
            else:
                result = ("ok", None)
        except Exception as e:  # the other ranks must learn of it, or they wait forever
            if not gdist.is_distributed():
                raise
            result, error = ("error", e), e
    result = gdist.broadcast_object(result)
    if error is not None:
        raise error  # rank 0: the original exception, with its traceback
    if result[0] == "error":
        raise result[1]
    return result[1]


def config_changes(old: dict, new: dict) -> list:
    """Names of the config fields that differ between a checkpoint's config and the current one
    and break an exact resume (the fields outside :data:`RESUME_FREE_FIELDS`). A field the
    checkpoint predates (added to TrainConfig later) counts as its default value, which is what
    the older code did."""
    import dataclasses

    from .presets import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    return sorted(k for k in new if k not in RESUME_FREE_FIELDS
                  and old.get(k, defaults.get(k)) != new[k])


# --------------------------------------------------------------------------- random streams

def _numpy_state_to_plain(state):
    # Plain Python types so the checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain):
    name, keys, pos, has_gauss, cached = plain
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(plain):
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


def loader_generators(loader) -> list:
    """The torch.Generator objects a DataLoader draws its shuffle order from (deduplicated)."""
    gens = []
    for obj in (getattr(loader, "generator", None),
                getattr(getattr(loader, "sampler", None), "generator", None),
                getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)):
        if isinstance(obj, torch.Generator) and all(obj is not g for g in gens):
            gens.append(obj)
    return gens


def _cuda_devices() -> list:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class RandomStreams:
    """A trainer's own random streams, kept apart from the caller's.

    The layers draw their dither seeds, and DataLoaders without a generator their shuffle
    order, from torch's global generators; augmentations may use NumPy's or Python's. While
    :meth:`active` runs, those global generators hold this object's streams (first use: torch
    seeded with ``seed + rank``, each rank its own dither stream; NumPy and Python with
    ``seed``); on exit the streams are stored here and the caller's generators are restored
    as they were. Constructing one touches no generator.

    :meth:`capture` (inside :meth:`active`) returns the streams plus the loaders' generators as
    plain data for a checkpoint; :meth:`restore` puts such a capture back.
    """

    def __init__(self, seed: int, rank: int, loaders: Iterable = ()):
        self.seed, self.rank = int(seed), int(rank)
        self.loaders = {name: loader for name, loader in loaders}
        self._state: Optional[dict] = None  # None: seed on first activation
        self._active = False

    @contextlib.contextmanager
    def active(self):
        """Swap this object's streams into the global generators for the ``with`` block."""
        if self._active:
            yield
            return
        with torch.random.fork_rng(devices=_cuda_devices()):
            caller_python, caller_numpy = random.getstate(), np.random.get_state()
            try:
                if self._state is None:
                    random.seed(self.seed)
                    np.random.seed(self.seed % (2 ** 32))
                    torch.manual_seed(self.seed + self.rank)
                else:
                    self._set_global(self._state)
                self._active = True
                yield
            finally:
                self._active = False
                self._state = self._global()
                random.setstate(caller_python)
                np.random.set_state(caller_numpy)

    @staticmethod
    def _global() -> dict:
        state = {"torch": torch.get_rng_state(),
                 "numpy": _numpy_state_to_plain(np.random.get_state()),
                 "python": _python_state_to_plain(random.getstate())}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _set_global(state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        random.setstate(_python_state_from_plain(state["python"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])

    def capture(self) -> dict:
        """The streams (as the global generators hold them now) and every loader's generators."""
        if not self._active:
            raise RuntimeError("RandomStreams.capture() runs inside active()")
        state = self._global()
        for name, loader in self.loaders.items():
            state[f"{name}_generators"] = [g.get_state() for g in loader_generators(loader)]
        return state

    def restore(self, state: dict) -> None:
        """Continue from a :meth:`capture`: the streams take effect at the next :meth:`active`,
        the loaders' generators at once."""
        self._state = {k: state[k] for k in ("torch", "numpy", "python", "cuda") if k in state}
        for name, loader in self.loaders.items():
            key = f"{name}_generators"
            gens = loader_generators(loader)
            if len(gens) != len(state.get(key, [])):
                warnings.warn(f"Trainer resume: the {name} loader has {len(gens)} generator(s), the "
                              f"checkpoint {len(state.get(key, []))}; its shuffle order will differ from an "
                              "uninterrupted run")
                continue
            for g, s in zip(gens, state[key]):
                g.set_state(s)
