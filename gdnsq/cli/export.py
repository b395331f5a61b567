"""``gdnsq export``: freeze a ``gdnsq quantize`` run's checkpoint into a deployed file::

    gdnsq export --checkpoint RUN_CHECKPOINT --out FILE [--model resnet20] [--dataset cifar10]
                 [--weight-bits B --act-bits B] [--strict] [--path auto|int|bitplane|binary|float]
                 [--measure-batch 16] [--device cpu] [--json]

It loads the run checkpoint (file or run folder, as ``gdnsq evaluate``), freezes it
(:func:`gdnsq.deploy.freeze`, per-layer path chosen by timing a random batch of
``--measure-batch`` CIFAR-sized inputs), writes the artifact (:func:`gdnsq.deploy.save`) and
prints the layer table and the size report (weight bytes per layer and in total, FP32 vs
deployed). Problems with what the user named (a folder as ``--out``, ``--strict`` refusing a
layer) raise :class:`gdnsq.cli._support.CliError` (exit code 2). ``gdnsq evaluate --deployed``
is in :mod:`gdnsq.cli.evaluate`.
"""
from __future__ import annotations

import os
import warnings

import torch

from .. import data as gdata
from ..deploy.artifact import save
from ..deploy.freeze import format_layer_table, format_size_report, freeze, layer_table, size_report
from ..deploy.layers import PATHS
from ._support import (CliError, add_subcommand, check_output_file, checkpoint_args, load_model_for_eval,
                       positive_int, resolve_device, usage_errors)

__all__ = ["cmd_export", "add_parser"]


def add_parser(subparsers) -> None:
    """Add ``export`` to the ``gdnsq`` subparsers."""
    e = add_subcommand(subparsers, "export", "freeze a quantize run's checkpoint into a deployed file")
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
