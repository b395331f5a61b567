"""``gdnsq evaluate``: top-1 accuracy of a checkpoint (FP or a quantize run) or of a deployed
file (``--deployed``, written by ``gdnsq export``) on the test or validation split."""
from __future__ import annotations

import pathlib
import time
from typing import Optional

import torch

from .. import data as gdata
from ..deploy.artifact import load
from ..deploy.freeze import layer_table
from ..deploy.plan import plan_report
from ._support import (CliError, add_subcommand, checkpoint_args, evaluate_model, load_model_for_eval,
                       log as _log, positive_int, resolve_device, usage_errors)

__all__ = ["cmd_evaluate", "evaluate_deployed_file", "add_parser"]


def split_loader(dataset: str, split: str, *, data_dir, val_size: int, batch_size: int, device,
                 normalization: str, progress=None):
    """The evaluation loader of ``split``: "test" or "val" (the last ``val_size`` training images)."""
    if split == "test":
        return gdata.build_loaders(dataset, data_dir=data_dir, with_train=False, eval_batch_size=batch_size,
                                   device=device, normalization=normalization, progress=progress)["test"]
    if split == "val":
        return gdata.build_loaders(dataset, data_dir=data_dir, with_test=False, val_size=val_size,
                                   eval_batch_size=batch_size, device=device, normalization=normalization,
                                   progress=progress)["val"]
    raise ValueError(f"split must be 'test' or 'val', got {split!r}")


def _load_for_dataset(path, dataset: str, device) -> tuple:
    """(deployed model, its normalisation name, its architecture) of ``path``; ValueError when
    the file is not a deployed model or was built for another number of classes."""
    model = load(path, map_location=device)
    norm = model.gdnsq_normalization or "imagenet"
    if not isinstance(norm, str):
        raise ValueError(f"{path}: normalization {norm!r} is not a gdnsq.data normalisation name")
    arch = model.gdnsq_architecture or {}
    classes = arch.get("kwargs", {}).get("num_classes")
    if classes is not None and classes != gdata.num_classes_of(dataset):
        raise ValueError(f"{path} has {classes} classes but --dataset {dataset} has {gdata.num_classes_of(dataset)}")
    return model, norm, arch


@torch.no_grad()
def evaluate_deployed_file(path, *, dataset: str = "cifar10", data_dir=None, split: str = "test",
                           val_size: int = 5000, batch_size: int = 500, device="cpu",
                           progress: bool = True, _loaded: Optional[tuple] = None) -> dict:
    """Top-1 (percent), image count and mean cross-entropy of a deployed file on CIFAR.

    The input normalisation stored in the artifact is applied; ``split`` is "test" or "val"
    (the last ``val_size`` training images).
    """
    device = resolve_device(device)
    model, norm, arch = _loaded if _loaded is not None else _load_for_dataset(path, dataset, device)
    loader = split_loader(dataset, split, data_dir=data_dir, val_size=val_size, batch_size=batch_size,
                          device=device, normalization=norm)
    t0 = time.time()
    res = evaluate_model(model, loader, device, desc=f"evaluate deployed {split}", progress=progress)
    res.update(split=split, dataset=dataset, deployed=str(path), kind="deployed", normalization=norm,
               architecture=arch, seconds=round(time.time() - t0, 2),
               paths={r["name"]: r["path"] for r in layer_table(model)},
               plan=plan_report(model))  # load attaches the deploy plan: the segments that ran
    return res


def evaluate_deployed(args) -> dict:
    """``gdnsq evaluate --deployed FILE`` (``args``: the evaluate namespace)."""
    path = pathlib.Path(args.deployed)
    if not path.is_file():
        raise CliError(f"--deployed: {'a folder, expected a file' if path.is_dir() else 'file not found'}: {path}")
    device = resolve_device(getattr(args, "device", "cpu"))
    with usage_errors("--deployed"):  # not a deployed model, corrupt, or for another data set
        loaded = _load_for_dataset(path, args.dataset, device)
    res = evaluate_deployed_file(path, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                                 val_size=getattr(args, "val_size", 5000), batch_size=args.batch_size,
                                 device=device, progress=not getattr(args, "json", False), _loaded=loaded)
    human = (f"{path} ({(res['architecture'] or {}).get('name', '?')}, deployed) {args.dataset} {args.split}: "
             f"top-1 {res['top1']:.2f} % on {res['n']} images ({res['seconds']:.1f} s)")
    return {"result": res, "human": human}


def cmd_evaluate(args) -> dict:
    device = resolve_device(args.device)
    if args.deployed:
        return evaluate_deployed(args)
    if not args.checkpoint:
        raise CliError("--checkpoint is required (or --deployed FILE)")
    model, info = load_model_for_eval(args)
    loader = split_loader(args.dataset, args.split, data_dir=args.data_dir, val_size=args.val_size,
                          batch_size=args.batch_size, device=device, normalization=info["normalization"],
                          progress=_log)
    t0 = time.time()
    res = evaluate_model(model, loader, device, desc=f"evaluate {args.split}", progress=not args.json)
    res.update(split=args.split, model=args.model, dataset=args.dataset,
               seconds=round(time.time() - t0, 2), **info)
    human = (f"{args.model} {args.dataset} {args.split}: top-1 {res['top1']:.2f} % on "
             f"{res['n']} images ({info['kind']}, {res['seconds']:.1f} s)")
    return {"result": res, "human": human}


def add_parser(subparsers) -> None:
    """Add ``evaluate`` to the ``gdnsq`` subparsers."""
    e = add_subcommand(subparsers, "evaluate", "top-1 accuracy of a checkpoint on the test set")
    checkpoint_args(e, required=False,
                    help="FP checkpoint, or a quantize run's checkpoint (file or run folder)")
    e.add_argument("--deployed", default=None, help="a file written by `gdnsq export`")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="test (default) or the validation split (last --val-size train images)")
    e.add_argument("--val-size", type=positive_int, default=5000)
    e.add_argument("--batch-size", type=positive_int, default=500, help="default 500")
    e.set_defaults(func=cmd_evaluate)
