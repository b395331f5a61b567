"""One-file snapshots of a training run, so that a long run survives a new machine.

A run folder holds ``checkpoint_last.pt`` (everything to continue bit-identically),
``checkpoint_best.pt`` (the selected student so far), ``metrics.jsonl`` and ``run.json``. A run
that outlives a machine is carried as a snapshot: one sealed (checksummed) file with all four,
committed beside the run's results and replaced at the end of every session::

    gdnsq snapshot RUN_DIR --out results/resnet20_cifar10_w1a1/resume.gdnsq-run
    # on another machine: the same quantize command plus --resume-from FILE
    gdnsq quantize ... --out RUN_DIR --resume-from results/resnet20_cifar10_w1a1/resume.gdnsq-run

``--resume-from`` restores the snapshot into ``--out`` when that folder holds no run or an
older one, then the usual resume continues from its last epoch. The metrics file is cut at the
last checkpoint's offset, as a resume does, so the restored folder is exactly what the run
folder was when that checkpoint was written.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

from .._atomic import atomic_write_bytes, atomic_write_text
from .._sealed import read_sealed, write_sealed
from .checkpoint import BEST, CHECKPOINT_FORMAT, LAST, METRICS, READABLE_VERSIONS, load_checkpoint, save_checkpoint

__all__ = ["SNAPSHOT_FORMAT", "write_snapshot", "read_snapshot", "restore_snapshot", "snapshot_epoch"]

SNAPSHOT_FORMAT = "gdnsq.run.snapshot"  # a file-format tag written into snapshots: never renamed
SNAPSHOT_VERSION = 1
_LAST, _BEST, _METRICS, _RUN = LAST, BEST, METRICS, "run.json"


def write_snapshot(run_dir, path) -> dict:
    """Write the snapshot of ``run_dir`` to ``path`` (atomically, sealed). Returns a summary
    ``{"epoch": last completed epoch, "best_epoch": epoch of checkpoint_best.pt or None,
    "bytes": file size}``. Raises FileNotFoundError when the folder holds no checkpoint."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / _LAST).is_file():
        raise FileNotFoundError(f"snapshot: {run_dir} holds no {_LAST} (not a started run folder)")
    last = load_checkpoint(str(run_dir / _LAST), kind="last")
    best = load_checkpoint(str(run_dir / _BEST), kind="best") if (run_dir / _BEST).is_file() else None
    metrics = b""
    if (run_dir / _METRICS).is_file():
        with open(run_dir / _METRICS, "rb") as f:
            metrics = f.read(last["metrics_offset"])
    run_json = (run_dir / _RUN).read_text(encoding="utf-8") if (run_dir / _RUN).is_file() else None
    write_sealed({"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "last": last, "best": best,
                  "metrics": metrics.decode("utf-8"), "run": run_json}, path)
    return {"epoch": last["epoch"], "best_epoch": None if best is None else best["epoch"],
            "bytes": os.path.getsize(path)}


def read_snapshot(path) -> dict:
    """Read and check snapshot ``path``: ``{"last", "best", "metrics", "run", ...}``; a damaged
    or foreign file raises ValueError naming it."""
    snap = read_sealed(path)  # SealError (a ValueError naming the file) when damaged
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path} is not a gdnsq run snapshot (written by `gdnsq snapshot`)")
    if snap.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"{path}: snapshot version {snap.get('version')!r} is not supported "
                         f"(this gdnsq reads version {SNAPSHOT_VERSION})")
    for key, kind in (("last", dict), ("metrics", str)):
        if not isinstance(snap.get(key), kind):
            raise ValueError(f"{path}: snapshot field {key!r} is missing or not a {kind.__name__}")
    if snap.get("best") is not None and not isinstance(snap["best"], dict):
        raise ValueError(f"{path}: snapshot field 'best' is not a checkpoint")
    if snap.get("run") is not None and not isinstance(snap["run"], str):
        raise ValueError(f"{path}: snapshot field 'run' is not text")
    for key in ("last", "best"):
        ckpt = snap[key]
        if ckpt is None:
            continue
        if (ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("version") not in READABLE_VERSIONS
                or ckpt.get("complete") is not True or ckpt.get("kind") != key
                or not isinstance(ckpt.get("epoch"), int)):
            raise ValueError(f"{path}: snapshot field {key!r} is not a complete '{key}' trainer checkpoint "
                             f"of a version this gdnsq reads ({list(READABLE_VERSIONS)})")
    return snap


def snapshot_epoch(path) -> int:
    """The last completed epoch stored in snapshot ``path``."""
    return read_snapshot(path)["last"]["epoch"]


def restore_snapshot(path, run_dir) -> Optional[int]:
    """Restore snapshot ``path`` into ``run_dir`` unless that folder already holds the same or a
    later epoch of the run. Returns the restored epoch, or None when nothing was written.

    The whole snapshot is read and verified before any file is written, and each file is written
    atomically, so a damaged snapshot never leaves a half-restored folder."""
    snap = read_snapshot(path)
    run_dir = pathlib.Path(run_dir)
    if (run_dir / _LAST).is_file():
        here = load_checkpoint(str(run_dir / _LAST), kind="last")["epoch"]
        if here >= snap["last"]["epoch"]:
            return None
    run_dir.mkdir(parents=True, exist_ok=True)
    if snap["run"] is not None:
        atomic_write_text(run_dir / _RUN, snap["run"])
    atomic_write_bytes(run_dir / _METRICS, snap["metrics"].encode("utf-8"))
    if snap["best"] is not None:
        save_checkpoint(snap["best"], str(run_dir / _BEST))
    elif (run_dir / _BEST).exists():
        os.remove(run_dir / _BEST)
    # the last checkpoint goes last: until it is written, the folder resumes as before
    save_checkpoint(snap["last"], str(run_dir / _LAST))
    return snap["last"]["epoch"]
