"""How certain an FP teacher is on the images the student distils from.

A teacher that trained on the training images (the akamaster CIFAR ResNets trained on all 50,000)
is nearly certain on them, so its distribution at temperature 1 is almost the label and carries
little about the other classes: the reason for ``--distill-temperature``. This measures, on the
training split the student sees (the first 45,000 images, augmented as in training, seed 0) and
on the held-out validation images (the last 5,000, not augmented; the teacher trained on them
too; the test set is not read): top-1 accuracy, the median and mean top-class probability, the share of images
with top probability > 0.99, and the mean entropy of the teacher's distribution at each given
temperature (nats; log 10 = 2.30 is uniform over CIFAR-10).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/teacher_confidence.py \\
        --checkpoint ../shared/models/resnet20_cifar10_akamaster.th \\
        --out benchmarks/results/teacher_confidence.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from gdnsq._atomic import atomic_write_text
from gdnsq.data import build_loaders
from gdnsq.models import get_model, load_fp_checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_lsq_peer import machine  # noqa: E402  (CPU, flags, threads, load)


@torch.no_grad()
def confidence(model: torch.nn.Module, loader, temperatures, max_images: int | None) -> dict:
    """Statistics of ``model``'s softmax over the batches of ``loader`` (up to ``max_images``)."""
    top_probs, correct, entropies = [], [], {t: [] for t in temperatures}
    seen = 0
    for images, labels in loader:
        logits = model(images).double()
        probs = logits.softmax(-1)
        top_probs.append(probs.max(-1).values)
        correct.append(probs.argmax(-1) == labels)
        for t in temperatures:
            p_t = (logits / t).softmax(-1)
            entropies[t].append(-(p_t * p_t.clamp_min(1e-300).log()).sum(-1))
        seen += len(labels)
        if max_images is not None and seen >= max_images:
            break
    top = torch.cat(top_probs)
    return {"images": int(top.numel()),
            "top1_percent": round(100.0 * torch.cat(correct).double().mean().item(), 2),
            "top_prob_median": top.median().item(),
            "top_prob_mean": round(top.mean().item(), 5),
            "share_top_prob_over_0.99": round((top > 0.99).double().mean().item(), 4),
            "mean_entropy_nats": {str(t): round(torch.cat(v).mean().item(), 4) for t, v in entropies.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="FP CIFAR-10 checkpoint of the teacher")
    ap.add_argument("--model", default="resnet20", help="its architecture (default resnet20)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--max-images", type=int, default=None, help="stop each split after this many images")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    if any(not t > 0 for t in a.temperatures):
        ap.error("--temperatures: expected numbers > 0")
    model = get_model(a.model)
    load_fp_checkpoint(model, a.checkpoint)
    model.eval()
    loaders = build_loaders("cifar10", batch_size=500, seed=0, with_test=False)
    start = time.time()
    record = {"checkpoint": os.path.basename(a.checkpoint), "model": a.model,
              "command": "python benchmarks/teacher_confidence.py " + " ".join(argv or sys.argv[1:]),
              "train_augmented": confidence(model, loaders["train"], a.temperatures, a.max_images),
              "val": confidence(model, loaders["val"], a.temperatures, a.max_images),
              "seconds": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "machine": machine()}
    atomic_write_text(a.out, json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("train_augmented", "val")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
