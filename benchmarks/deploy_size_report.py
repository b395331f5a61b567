"""Weight bytes of ResNet-20 (CIFAR-10), FP32 vs deployed at W1A1 / W2A2 / W4A4.

The size depends only on the shapes and bit-widths, so the quantizers are calibrated on a
random batch and set to b bits (as in check_deploy_equality.py); every layer is frozen on the
``int`` path (no timing needed). Writes ``benchmarks/results/deploy_size.md`` (and .json):
the per-layer table of gdnsq.deploy.size_report for W1A1 and the totals for every width.

    python benchmarks/deploy_size_report.py
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from check_deploy_equality import set_bits  # noqa: E402
from gdnsq._atomic import atomic_write_text  # noqa: E402
from gdnsq.calibrate import calibrate  # noqa: E402
from gdnsq.convert import quantize_model  # noqa: E402
from gdnsq.deploy import format_size_report, freeze, save, size_report  # noqa: E402
from gdnsq.models import get_model  # noqa: E402


@torch.no_grad()
def main() -> int:
    torch.manual_seed(0)
    fp = get_model("resnet20", 10).eval()
    x = torch.randn(32, 3, 32, 32)
    reports, md = {}, ["# ResNet-20 weight bytes: FP32 vs deployed", "",
                       "Written by `python benchmarks/deploy_size_report.py`. Per quantized layer: FP32 = "
                       "4 bytes per weight (+ bias); deployed = packed codes (b bits per weight) + "
                       "per-channel step and zero point (float32) + the 3 activation parameters. The "
                       "first conv, the classifier and BatchNorm stay float32 in both.", ""]
    totals = ["| bits | quantized layers FP32 | quantized layers deployed | whole model FP32 | "
              "whole model deployed | ratio | artifact file |", "|---|---:|---:|---:|---:|---:|---:|"]
    for b in (1, 2, 4):
        q = quantize_model(fp, b, b)
        calibrate(q, [x])
        set_bits(q, x, b)
        frozen = freeze(q.eval(), path="int")
        rep = size_report(frozen)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.gdnsq")
            save(frozen, path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}})
            rep["artifact_bytes"] = os.path.getsize(path)
        reports[f"W{b}A{b}"] = rep
        totals.append(f"| W{b}A{b} | {rep['quantized_fp32_bytes']} | {rep['quantized_deployed_bytes']} | "
                      f"{rep['total_fp32_bytes']} | {rep['total_deployed_bytes']} | {rep['total_ratio']:.1f}x | "
                      f"{rep['artifact_bytes']} |")
        if b == 1:
            per_layer = format_size_report(rep)
    md += totals + ["", "Per layer at W1A1:", "", per_layer, ""]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("deploy_size.md", "\n".join(md)), ("deploy_size.json", json.dumps(reports, indent=1))):
        atomic_write_text(out / name, text + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
