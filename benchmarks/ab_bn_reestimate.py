"""A/B: does re-estimating BatchNorm statistics after QAT help a trained student?

For each quantize run folder given, loads its selected student (checkpoint_best.pt), evaluates
top-1 on the held-out validation split (never the test set), re-estimates every BatchNorm's
statistics on N un-augmented training images (``gdnsq.calibrate.reestimate_batchnorm``) and
evaluates again. Appends one JSON record per run to ``--out`` (default
benchmarks/results/ab_bn_reestimate.jsonl).

    python benchmarks/ab_bn_reestimate.py RUN_DIR [RUN_DIR ...] --batches 100
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from types import SimpleNamespace

import torch

from gdnsq import data as gdata
from gdnsq._atomic import atomic_append_text
from gdnsq.calibrate import reestimate_batchnorm
from gdnsq.cli._support import evaluate_model, load_model_for_eval


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="gdnsq quantize run folders")
    p.add_argument("--batches", type=int, default=100, help="training batches of 128 for the statistics")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "ab_bn_reestimate.jsonl"))
    a = p.parse_args()
    dev = torch.device("cpu")
    for run in a.runs:
        args = SimpleNamespace(checkpoint=run, model="resnet20", dataset="cifar10", weight_bits=None, act_bits=None)
        model, info = load_model_for_eval(args)
        loaders = gdata.build_loaders("cifar10", data_dir=a.data_dir, with_test=False, val_size=a.val_size,
                                      batch_size=128, normalization=info["normalization"], device=dev)
        tr = loaders["train"]
        # the training split without augmentation, in a fixed order
        plain = gdata.CifarLoader((tr.images.permute(0, 2, 3, 1).cpu(), tr.labels.cpu()), 128, train=False,
                                  normalization=info["normalization"], device=dev)
        before = evaluate_model(model, loaders["val"], dev, progress=False)
        t0 = time.time()
        used = reestimate_batchnorm(model, plain, num_batches=a.batches)
        after = evaluate_model(model, loaders["val"], dev, progress=False)
        rec = {"run": pathlib.Path(run).name, "weight_bits": info["weight_bits"], "act_bits": info["act_bits"],
               "val_top1_before": round(before["top1"], 2), "val_top1_after": round(after["top1"], 2),
               "val_loss_before": round(before["loss"], 4), "val_loss_after": round(after["loss"], 4),
               "images_for_statistics": used, "seconds": round(time.time() - t0, 1),
               "threads": torch.get_num_threads(), "loadavg_1min": round(os.getloadavg()[0], 2),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(json.dumps(rec), flush=True)
        atomic_append_text(a.out, json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
