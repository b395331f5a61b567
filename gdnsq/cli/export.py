"""Command-line pieces of gdnsq.deploy, used by ``gdnsq/cli.py``.

* :func:`add_subcommands(subparsers, common)` adds ``gdnsq export``::

      gdnsq export --checkpoint RUN_CHECKPOINT --out FILE [--model resnet20] [--dataset cifar10]
                   [--weight-bits B --act-bits B] [--strict] [--path auto|int|bitplane|binary|float]
                   [--measure-batch 16] [--device cpu] [--json]

  It loads a ``gdnsq quantize`` run checkpoint (file or run folder, as ``gdnsq evaluate``),
  freezes it (:func:`gdnsq.deploy.freeze`, per-layer path chosen by timing a random batch of
  ``--measure-batch`` CIFAR-sized inputs), writes the artifact (:func:`gdnsq.deploy.save`) and
  prints the layer table and the size report (weight bytes per layer and in total, FP32 vs
  deployed).

* :func:`evaluate_deployed(args)` runs ``gdnsq evaluate --deployed FILE`` (``args`` is the
  ``evaluate`` namespace: ``deployed``, ``dataset``, ``data_dir``, ``device``, ``split``,
  ``val_size``, ``batch_size``); :func:`evaluate_deployed_file` is the same as a plain function.

Both command functions return ``{"result": dict, "human": str}`` as the other subcommands do.
Shared CLI pieces come from :mod:`gdnsq.cli_support` (this module never imports
:mod:`gdnsq.cli`, which imports it). Problems with what the user named (a folder as ``--out``,
an unreadable ``--deployed`` file, ``--strict`` refusing a layer) raise
:class:`gdnsq.cli_support.CliError` (exit code 2).
"""
from __future__ import annotations

import os
import pathlib
import time
from typing import Optional

import torch

from gdnsq import data as gdata
from ._support import (CliError, check_output_file, checkpoint_args, common_args, evaluate_model,
                               load_model_for_eval, positive_int, resolve_device, usage_errors)

from ..deploy.artifact import load, save
from ..deploy.freeze import format_layer_table, format_size_report, freeze, layer_table, size_report
from ..deploy.layers import PATHS


def add_subcommands(subparsers, common=None) -> None:
    """Add ``export`` to the ``gdnsq`` subparsers; ``common(parser)`` (default
    :func:`gdnsq.cli_support.common_args`) adds the shared options
    (--model, --dataset, --data-dir, --device, --seed, --json)."""
    e = subparsers.add_parser("export", help="freeze a quantize run's checkpoint into a deployed file")
    (common or common_args)(e)
    checkpoint_args(e, required=True, help="a `gdnsq quantize` run checkpoint (file, or the run folder)")
    e.add_argument("--out", required=True, help="deployed model file to write (atomically)")
    e.add_argument("--strict", action="store_true",
                   help="fail when a layer's realised bits exceed its target (default: warn)")
    e.add_argument("--path", default="auto", choices=("auto",) + PATHS[:4],
                   help="GEMM path: auto (default: binary for W1A1, else the faster of int and "
                        "bitplane, measured per layer), or force one where it applies; float "
                        "reproduces the fake-quant model bit for bit (float32 conv of the "
                        "dequantized codes)")
    e.add_argument("--measure-batch", type=positive_int, default=16,
                   help="batch size of the random input used to time the paths (default 16)")
    e.set_defaults(func=cmd_export)


def cmd_export(args) -> dict:
    """``gdnsq export``: checkpoint -> frozen model -> artifact; returns result + human text."""
    import warnings

    out = check_output_file("--out", args.out)
    device = resolve_device(getattr(args, "device", "cpu"))
    seed = getattr(args, "seed", None)
    torch.manual_seed(0 if seed is None else seed)
    model, info = load_model_for_eval(args)
    if info.get("kind") != "quantized":
        raise CliError(f"--checkpoint {args.checkpoint} is an FP model; export needs a `gdnsq quantize` run")
    model = model.to(device).eval()
    example = torch.randn(args.measure_batch, 3, 32, 32, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            if args.strict:
                with usage_errors("--strict"):  # a layer above its target bits is refused
                    frozen = freeze(model, strict=True, example_input=example if args.path == "auto" else None,
                                    path=args.path)
            else:
                frozen = freeze(model, strict=False, example_input=example if args.path == "auto" else None,
                                path=args.path)
    notes = [str(w.message) for w in caught]
    arch = {"name": args.model, "kwargs": {"num_classes": gdata.num_classes_of(args.dataset)}}
    meta = {"source_checkpoint": str(info.get("checkpoint")), "weight_bits": info.get("weight_bits"),
            "act_bits": info.get("act_bits"), "dataset": args.dataset, "warnings": notes}
    save(frozen.cpu(), out, architecture=arch, normalization=info["normalization"], metadata=meta)
    size = size_report(frozen)
    result = {"out": str(out), "file_bytes": os.path.getsize(out), "architecture": arch,
              "normalization": info["normalization"], "layers": layer_table(frozen), "size": size,
              "warnings": notes, "device": str(device)}
    human = "\n".join(
        [f"wrote {args.out} ({result['file_bytes']} bytes; {args.model} W{info.get('weight_bits')}"
         f"A{info.get('act_bits')})"]
        + [f"warning: {n}" for n in notes]
        + ["", format_layer_table(frozen), "", format_size_report(size)]
    )
    return {"result": result, "human": human}


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
    if split == "test":
        loader = gdata.build_loaders(dataset, data_dir=data_dir, with_train=False, eval_batch_size=batch_size,
                                     device=device, normalization=norm)["test"]
    elif split == "val":
        loader = gdata.build_loaders(dataset, data_dir=data_dir, with_test=False, val_size=val_size,
                                     eval_batch_size=batch_size, device=device, normalization=norm)["val"]
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    t0 = time.time()
    res = evaluate_model(model, loader, device, desc=f"evaluate deployed {split}", progress=progress)
    res.update(split=split, dataset=dataset, deployed=str(path), kind="deployed", normalization=norm,
               architecture=arch, seconds=round(time.time() - t0, 2),
               paths={r["name"]: r["path"] for r in layer_table(model)})
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
