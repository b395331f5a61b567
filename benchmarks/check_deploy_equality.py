"""Whole-test-set check that a frozen ResNet-20 predicts exactly what its fake-quant model does.

For each bit-width b in --bits (default 1 2 4):

1. the akamaster FP ResNet-20 (``../shared/models/resnet20_cifar10_akamaster.th``) is converted
   with ``gdnsq.quantize_model`` (default placement: first conv, classifier FP) and calibrated
   (``gdnsq.calibrate``, 10 bits, on --calib-batches batches of the validation split = the last
   5,000 training images; never the test set);
2. every quantizer is then set to b bits: weights ``s_c = range_c / (2**b - 1)``; activations
   offset = calibrated offset, clamp top = the 99.9th percentile of the layer's input on one
   validation batch, ``log2_range = log2_step + b`` (so exactly 2**b levels);
3. the model is frozen twice, each saved and reloaded through an artifact: "integer" (the
   default freeze: binary ops for W1A1, else int or bit-plane as measured) and "float"
   (``path="float"``: float32 conv of the dequantized codes), and all three models run on the
   full CIFAR-10 test set (10,000 images) in eval mode; on the CPU the "integer" artifact also
   runs on the fused runtime (``gdnsq.deploy.runtime``, variant "runtime", compared with the
   exact fake-quant model).

Written to --out (default results/deploy_equality.json): per bit-width the fake-quant and
deployed top-1 and, per frozen variant, the number of images whose top-1 differs from the
fake-quant model's, the max relative error of the logits
(max |deployed - fake_quant| / max |fake_quant| per image, maxed over images), the per-layer
relative error of each deployed layer on its fake-quant input (first test batch), the layer
paths and the time of each pass.

    python benchmarks/check_deploy_equality.py                 # ~5 min on 2 CPU cores
    python benchmarks/check_deploy_equality.py --limit 1000    # quick look
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gdnsq import data as gdata  # noqa: E402
from gdnsq._atomic import atomic_write_text  # noqa: E402
from gdnsq.calibrate import calibrate  # noqa: E402
from gdnsq.convert import quantize_model  # noqa: E402
from gdnsq.deploy import deployed_layers, freeze, layer_table  # noqa: E402
from gdnsq.layers import set_exact_inference  # noqa: E402
from gdnsq.models import get_model, load_fp_checkpoint  # noqa: E402

DEFAULT_CKPT = ROOT.parent / "shared" / "models" / "resnet20_cifar10_akamaster.th"


def quantized(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]


@torch.no_grad()
def set_bits(student, batch, bits: int, quantile: float = 0.999) -> None:
    """Set every quantizer of the calibrated ``student`` to exactly 2**bits levels."""
    layers = quantized(student)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, i, n=n: inputs.__setitem__(n, i[0].detach()))
             for n, m in layers]
    for _, m in layers:
        m._fp_passthrough = True  # FP statistics, as calibrate uses
    student.eval()(batch)
    for _, m in layers:
        m._fp_passthrough = False
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    for n, m in layers:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        span = (w.amax(1) - w.amin(1)).clamp_min(1e-12)
        m.weight_quantizer.log2_step.copy_(torch.log2(span / (2 ** bits - 1) * (1 + 1e-6)))
        m.weight_quantizer.target_bits.fill_(bits)
        aq = m.act_quantizer
        if aq is None or not aq.enabled:
            continue
        x = inputs[n].reshape(-1).float()
        if x.numel() > 2_000_000:
            x = x[torch.randint(0, x.numel(), (2_000_000,), generator=g)]
        lo = float(aq.offset)
        hi = float(torch.quantile(x, quantile))
        if hi <= lo:
            hi = float(x.max())
        alpha = math.log2(max(hi - lo, 1e-12) / (2 ** bits - 1))
        aq.log2_step.copy_(torch.tensor(alpha))
        aq.log2_range.copy_(torch.tensor(alpha + bits))
        aq.target_bits.fill_(bits)


@torch.no_grad()
def per_layer_errors(student, frozen, x) -> dict:
    """Relative error of each deployed layer against its fake-quant layer on the same input."""
    caps = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: caps.__setitem__(n, (i[0], o)))
             for n, m in quantized(student)]
    student(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, layer in deployed_layers(frozen):
        inp, ref = caps[n]
        out[n] = float((layer(inp) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return out


@torch.no_grad()
def _roundtrip(frozen, norm, device):
    """save + load through a temporary file (what ships is what is checked)."""
    from gdnsq.deploy import load, save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.gdnsq")
        save(frozen.cpu(), path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}},
             normalization=norm)
        return load(path, map_location=device), os.path.getsize(path)


@torch.no_grad()
def run_bits(bits, fp, norm, calib_loader, test_loader, device, limit, calib_batches, student=None) -> dict:
    first_val = next(iter(calib_loader))[0].to(device)
    if student is None:  # calibrated model set to exactly 2**bits levels
        student = quantize_model(fp, bits, bits).to(device)
        calibrate(student, calib_loader, num_batches=calib_batches, device=device)
        set_bits(student, first_val, bits)
    student = student.to(device)
    student.eval()
    t0 = time.time()
    frozen = freeze(student, example_input=first_val[:16], strict=True, reps=1)
    freeze_s = time.time() - t0
    frozen, size = _roundtrip(frozen, norm, device)
    exact, _ = _roundtrip(freeze(student, path="float", strict=True), norm, device)
    variants = {"integer": frozen, "float": exact}
    if device.type == "cpu":  # the fused C++ runtime on the reloaded artifact (docs/deploy.md)
        from gdnsq.deploy.runtime import runtime

        variants["runtime"] = runtime(frozen, example_input=first_val[:16])
    stats = {k: {"agree": 0, "agree_default_fq": 0, "correct": 0, "max_rel": 0.0, "rels": [], "seconds": 0.0} for k in variants}
    n = fq_correct = 0
    t_fq = 0.0
    layer_err = None
    for x, y in test_loader:
        if limit and n >= limit:
            break
        x, y = x.to(device), y.to(device)
        if layer_err is None:
            layer_err = per_layer_errors(student, frozen, x[:100])
        t = time.time()
        ref = student(x)
        t_fq += time.time() - t
        fq_correct += int((ref.argmax(1) == y).sum())
        # The integer paths compute each layer's exact value rounded once; the fake-quant model
        # with exact inference (float64 conv of the quantized operands) does the same, while its
        # default float32 accumulation differs by rounding, which flips codes of the next
        # quantizer on a few images. Integer variant vs exact fake-quant, float variant vs the
        # default fake-quant; both comparisons are recorded.
        set_exact_inference(student, True)
        ref_exact = student(x)
        set_exact_inference(student, False)
        refs = {"integer": ref_exact, "float": ref, "runtime": ref_exact}
        for k, model in variants.items():
            t = time.time()
            out = model(x)
            st = stats[k]
            st["seconds"] += time.time() - t
            r = refs[k]
            rel = (out - r).abs().amax(1) / r.abs().amax(1).clamp_min(1e-30)
            st["rels"].append(rel.cpu())
            st["agree"] += int((out.argmax(1) == r.argmax(1)).sum())
            st["agree_default_fq"] += int((out.argmax(1) == ref.argmax(1)).sum())
            st["correct"] += int((out.argmax(1) == y).sum())
        n += y.numel()
    res = {"bits": bits, "images": n, "fake_quant_top1": 100.0 * fq_correct / n,
           "fake_quant_seconds": round(t_fq, 2), "artifact_bytes": size, "freeze_seconds": round(freeze_s, 2),
           "max_rel_err_per_layer": max(layer_err.values()), "rel_err_per_layer": layer_err,
           "paths": {r["name"]: r["path"] for r in layer_table(frozen)}}
    if "runtime" in variants:
        res["runtime_isa"] = variants["runtime"].isa
        res["runtime_fallback"] = variants["runtime"].fallback_reason
    for k, st in stats.items():
        rels = torch.cat(st["rels"])
        res[k] = {"compared_with": "float32 fake-quant" if k == "float" else "exact fake-quant",
                  "differing_predictions": n - st["agree"],
                  "differing_predictions_vs_float32_fake_quant": n - st["agree_default_fq"],
                  "top1": 100.0 * st["correct"] / n,
                  "max_rel_err_logits": float(rels.max()), "median_rel_err_logits": float(rels.median()),
                  "images_rel_err_above_1e-4": int((rels > 1e-4).sum()), "seconds": round(st["seconds"], 2)}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="stop after this many test images (0: all)")
    p.add_argument("--out", default=str(ROOT / "results" / "deploy_equality.json"))
    p.add_argument("--run", nargs="*", default=[],
                   help="trained `gdnsq quantize` run folders to check instead of --bits "
                        "(their selected checkpoint, bits from run.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    fp = get_model("resnet20", 10)
    meta = load_fp_checkpoint(fp, args.checkpoint)
    fp.eval()
    norm = meta["normalization"]
    loaders = gdata.build_loaders("cifar10", data_dir=args.data_dir, batch_size=args.batch_size,
                                  eval_batch_size=args.batch_size, val_size=5000, normalization=norm,
                                  device="cpu")
    results = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(b, None, None) for b in args.bits] if not args.run else []
    for run_dir in args.run:
        from gdnsq.cli._support import load_model_for_eval  # the CLI's loader of a quantize run
        ns = argparse.Namespace(checkpoint=run_dir, model="resnet20", dataset="cifar10",
                                weight_bits=None, act_bits=None)
        student, info = load_model_for_eval(ns)
        if info["normalization"] != norm:
            raise SystemExit(f"--run {run_dir}: normalisation {info['normalization']} != {norm}")
        jobs.append((int(info["weight_bits"]), student, run_dir))
    for b, student, run_dir in jobs:
        r = run_bits(b, fp, norm, loaders["val"], loaders["test"], device, args.limit, args.calib_batches,
                     student=student)
        if run_dir is not None:
            r["trained_run"] = os.path.basename(os.path.normpath(run_dir))
        print(json.dumps({k: v for k, v in r.items() if k not in ("rel_err_per_layer", "paths")}), flush=True)
        results.append(r)
        doc = {  # rewritten after every bit-width, so a partial run keeps what it measured
            "command": "python benchmarks/check_deploy_equality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "platform": platform.platform(), "torch": torch.__version__,
            "checkpoint": os.path.basename(args.checkpoint), "results": results,
        }
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
