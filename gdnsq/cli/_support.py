"""Pieces shared by the subcommands of the ``gdnsq`` command (:mod:`gdnsq.cli`): the usage-error
type, argument types, path checks, device choice, checkpoint loading for evaluation and the
evaluation loop. Every subcommand module imports from here, never from :mod:`gdnsq.cli` itself.

Error policy: a :class:`CliError` (and argparse's own errors) is a usage problem: one line on
stderr, exit code 2. :func:`usage_errors` turns the ValueError / FileNotFoundError raised while
reading a file the user named into a CliError naming the flag. Any other exception is a bug and
keeps its traceback (exit code 1).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import pathlib
import sys
from typing import Optional

import torch

from .. import data as gdata
from ..models import MODELS, extract_state_dict, fit_state_dict, get_model, load_fp_checkpoint, read_checkpoint
from ..train.progress import progress_bar

RUN_FILE = "run.json"  # written by `gdnsq quantize` into --out: how to rebuild the student
CHECKPOINT_NAMES = ("checkpoint_best.pt", "checkpoint_last.pt")


class CliError(Exception):
    """A usage problem reported as one line on stderr with exit code 2."""


def log(msg: str) -> None:
    """A progress/log line on stderr (stdout carries only the result)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def usage_errors(flag: str):
    """Report a ValueError / FileNotFoundError raised inside the block (reading the file given
    to ``flag``: unreadable, not a checkpoint, does not fit the model) as a CliError naming
    ``flag``. Only wrap code that reads user input: anything else there would hide a bug."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CliError(f"{flag}: {msg}") from e


# ---------------------------------------------------------------------------- argument types

def number_arg(kind, what: str, valid, invalid_msg: Optional[str] = None):
    """An argparse ``type``: parse with ``kind`` (int/float), reject values failing ``valid``
    with a one-line message ("expected <what>, got <value>", or ``invalid_msg`` + value)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not valid(v):
            raise argparse.ArgumentTypeError(f"{invalid_msg or 'expected ' + what}, got {text}")
        return v
    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = number_arg(int, "a positive integer", lambda v: v >= 1)
nonneg_int = number_arg(int, "a non-negative integer", lambda v: v >= 0)
positive_float = number_arg(float, "a positive number", lambda v: v > 0 and math.isfinite(v))
nonneg_float = number_arg(float, "a non-negative number", lambda v: v >= 0 and math.isfinite(v))
bits_arg = number_arg(int, "an integer number of bits", lambda v: 1 <= v <= 16, "bits must be between 1 and 16")


def act_bits_arg(text: str) -> Optional[int]:
    """--act-bits: 1-16, or 32 / "none" for float activations (a weights-only model, W<n>A32)."""
    if text.strip().lower() in ("32", "none"):
        return None
    return bits_arg(text)


act_bits_arg.__name__ = "act_bits"


def add_subcommand(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to the ``gdnsq`` subparsers, with the options every subcommand
    takes (:func:`common_args`); returns its parser."""
    parser = subparsers.add_parser(name, help=help)
    common_args(parser)
    return parser


def common_args(p: argparse.ArgumentParser) -> None:
    """The options every subcommand takes: --model, --dataset, --data-dir, --device, --seed, --json."""
    p.add_argument("--model", default="resnet20", choices=sorted(MODELS),
                   help="architecture (default resnet20)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"],
                   help="data set (default cifar10; cifar100 needs the original files in "
                        "--data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="data/cache directory (default $GDNSQ_DATA_DIR or ~/.cache/gdnsq)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of shuffling, augmentation, init (default 0, or the --config's)")
    p.add_argument("--json", action="store_true",
                   help="print the final result as one JSON object on the last stdout line "
                        "(and no progress bars)")


def checkpoint_args(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    """--checkpoint (a quantize run's checkpoint or folder) and the --weight-bits / --act-bits
    used when no run.json sits beside it (evaluate, export)."""
    p.add_argument("--checkpoint", required=required, default=None, help=help)
    p.add_argument("--weight-bits", type=bits_arg, default=None,
                   help="bits of a quantized checkpoint without run.json beside it")
    p.add_argument("--act-bits", type=act_bits_arg, default=None, help="see --weight-bits")


# ---------------------------------------------------------------------------- paths and devices

def check_run_folder(flag: str, path) -> pathlib.Path:
    """``flag`` names a run folder to create or continue: refuse an existing file (or a file
    where a parent folder should be) before any work is done."""
    path = pathlib.Path(path)
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            what = "is an existing file" if p == path else f"lies under {p}, which is a file"
            raise CliError(f"{flag}: {path} {what}; expected a run folder (new, or one from an earlier run)")
    return path


def check_output_file(flag: str, path) -> pathlib.Path:
    """``flag`` names a file to write (replaced atomically when it exists): refuse a folder, or
    a parent that is a file, before any work is done."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CliError(f"{flag}: {path} is a folder; expected a file name to write")
    for p in path.parents:
        if p.exists() and not p.is_dir():
            raise CliError(f"{flag}: {path} lies under {p}, which is a file")
    return path


def checkpoint_file(flag: str, path, names=CHECKPOINT_NAMES, what: str = "a checkpoint file or run folder"
                    ) -> pathlib.Path:
    """The checkpoint file ``flag`` names: the file itself, or the first of ``names`` inside a
    folder. A missing path says "file not found", a folder without them says so."""
    path = pathlib.Path(path)
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise CliError(f"{flag}: {path} is a folder without {' or '.join(names)} (expected {what})")
    if not path.is_file():
        raise CliError(f"{flag}: file not found: {path}")
    return path


def resolve_device(name: Optional[str]) -> torch.device:
    """--device: cpu, cuda, cuda:N or auto (None: auto = CUDA when available)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CliError(f"--device: expected cpu, cuda, cuda:N or auto, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda requested but no CUDA device is available (use --device cpu)")
    return dev


# ---------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader, device, desc: str = "evaluate", *,
                   progress: bool = True) -> dict:
    """Top-1 accuracy (percent), image count and mean cross-entropy of ``model`` on ``loader``."""
    model.eval().to(device)
    correct = 0
    n = 0
    loss_sum = 0.0
    bar = progress_bar(len(loader), desc=desc, enabled=progress)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
        bar.set_postfix(top1=100.0 * correct / max(n, 1), refresh=False)
        bar.update(1)
    bar.close()
    return {"top1": 100.0 * correct / max(n, 1), "n": n, "loss": loss_sum / max(n, 1)}


def read_run_file(ckpt: pathlib.Path) -> Optional[dict]:
    """The run.json beside a quantize run's checkpoint (or one folder up), or None."""
    for folder in (ckpt.parent, ckpt.parent.parent):
        f = folder / RUN_FILE
        if f.is_file():
            return json.loads(f.read_text(encoding="utf-8"))
    return None


def load_model_for_eval(args) -> tuple:
    """Build the model of ``--model`` and load ``--checkpoint`` (FP or a quantize run's).

    Returns ``(model, info)`` where info has "normalization", "kind" ("fp"/"quantized"),
    "weight_bits"/"act_bits" for quantized models.
    """
    from ..convert import quantize_model

    path = checkpoint_file("--checkpoint", args.checkpoint)
    num_classes = gdata.num_classes_of(args.dataset)
    model = get_model(args.model, num_classes)
    with usage_errors("--checkpoint"):
        obj = read_checkpoint(path)
        sd = extract_state_dict(obj)
    if not any("quantizer" in k for k in sd):
        with usage_errors("--checkpoint"):
            meta = load_fp_checkpoint(model, obj)
        return model, {"normalization": meta["normalization"], "kind": "fp", "checkpoint": str(path)}
    run = read_run_file(path) or {}
    wb = args.weight_bits if args.weight_bits is not None else run.get("weight_bits")
    # act_bits None in run.json is a weights-only (A32) run
    ab = args.act_bits if args.act_bits is not None else run.get("act_bits", "missing")
    if wb is None or ab == "missing":
        raise CliError(f"--checkpoint {path} is a quantized model but no {RUN_FILE} was found "
                       "next to it; pass --weight-bits and --act-bits")
    if run.get("model") not in (None, args.model):
        raise CliError(f"--checkpoint {path} is a {run['model']} run ({RUN_FILE}), not --model {args.model}")
    student = quantize_model(model, int(wb), None if ab is None else int(ab), **(run.get("quantize_kwargs") or {}))
    with usage_errors("--checkpoint"):
        fit_state_dict(student, sd)
    norm = run.get("normalization") or (obj.get("normalization") if isinstance(obj, dict) else None) or "imagenet"
    return student, {"normalization": norm, "kind": "quantized", "weight_bits": int(wb),
                     "act_bits": None if ab is None else int(ab), "checkpoint": str(path)}
