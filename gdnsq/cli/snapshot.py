"""``gdnsq snapshot``: one sealed file that carries a training run to another machine::

    gdnsq snapshot RUN_DIR --out FILE [--json]

The file holds the run's last and best checkpoints, its metrics and run.json
(:mod:`gdnsq.train.snapshot`). ``gdnsq quantize ... --resume-from FILE`` restores it into its
``--out`` folder and continues the run bit-identically.
"""
from __future__ import annotations

from ._support import CliError, add_subcommand, check_output_file, usage_errors

__all__ = ["cmd_snapshot", "add_parser"]


def add_parser(subparsers) -> None:
    """Add ``snapshot`` to the ``gdnsq`` subparsers."""
    s = add_subcommand(subparsers, "snapshot", "pack a quantize run folder into one resumable file")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a `gdnsq quantize` run folder")
    s.add_argument("--out", required=True, help="snapshot file to write (atomically)")
    s.set_defaults(func=cmd_snapshot)


def cmd_snapshot(args) -> dict:
    """``gdnsq snapshot``: write the snapshot; returns result + human text."""
    import pathlib

    from ..train.snapshot import write_snapshot

    run_dir = pathlib.Path(args.run_dir)
    if not run_dir.is_dir():
        raise CliError(f"RUN_DIR: {run_dir} is not a folder (expected a `gdnsq quantize` run folder)")
    out = check_output_file("--out", args.out)
    with usage_errors("RUN_DIR"):
        summary = write_snapshot(run_dir, out)
    summary.update(run_dir=str(run_dir), out=str(out))
    best = "no selected epoch yet" if summary["best_epoch"] is None else f"selected epoch {summary['best_epoch']}"
    return {"result": summary,
            "human": f"snapshot of {run_dir} after epoch {summary['epoch']} ({best}): {out}, "
                     f"{summary['bytes'] / 1e6:.1f} MB"}
