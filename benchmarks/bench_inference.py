"""Inference speed of ResNet-20: FP32 vs GDNSQ fake-quant vs deployed (gdnsq.deploy), one run.

Models (CIFAR-10 ResNet-20, input 3x32x32):

* ``fp32``: the float network (akamaster checkpoint when ``../shared/models`` has it, else He
  init: speed does not depend on the weights);
* ``fake-quant WbAb``: ``gdnsq.quantize_model`` + ``calibrate`` on a random batch + every
  quantizer set to b bits (the eval-mode fake-quant forward a trained model runs);
* ``deployed WbAb``: ``gdnsq.deploy.freeze`` of that model (W1A1: binary ops; W2A2/W4A4: int or
  bit-plane per layer, chosen by freeze's measurement on a batch of 32);
* ``deployed-float WbAb``: ``freeze(path="float")`` (float32 conv of the dequantized codes);
* ``runtime WbAb``: ``gdnsq.deploy.runtime.runtime(frozen)``: the fused C++ runtime for the
  quantized trunk (docs/runtime.md), same logits as ``deployed``; the paths column names the
  ISA build and the conv input formats its plan chose (``packed``: bit-plane popcount,
  ``bytes``: uint8 x int8 codes, ``vpdpbusd`` on the avx512vnni build);
* ``fp32-compile``: the float network under ``torch.compile`` (skip with --no-compile).

Every point is measured at each --threads value (``torch.set_num_threads``); the markdown
compares rows of the same batch and thread count. The W1A1 artifact size (``save`` of the
frozen model) is recorded in every row as ``artifact_bytes_w1a1``.

The lead's command on a quiet machine (about 5-10 min)::

    python benchmarks/bench_inference.py --threads 1 2

A quick sanity run while other jobs load the machine (the rows record ``os.getloadavg()``;
write them outside the committed results)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_inference.py --threads 1 --batches 1 \
        --no-compile --out-dir /tmp/bench

For each model and batch size (1 and 256 by default): median latency over --reps timed calls
after one warm-up, and images/s = batch / median latency. Every row is appended to
``benchmarks/results/inference.jsonl`` with device, versions and date; the markdown table
``benchmarks/results/inference.md`` is rewritten from the latest run of every device found in
the jsonl.

    python benchmarks/bench_inference.py                 # CPU, ~2-3 min on 2 cores
    python benchmarks/bench_inference.py --device cuda   # GPU (benchmarks/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gdnsq  # noqa: E402
from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq.calibrate import calibrate  # noqa: E402
from gdnsq.convert import quantize_model  # noqa: E402
from gdnsq.deploy import freeze, layer_table  # noqa: E402
from gdnsq.models import get_model, load_fp_checkpoint  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CKPT = ROOT.parent / "shared" / "models" / "resnet20_cifar10_akamaster.th"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_model(model, batch, device, reps) -> float:
    """Median seconds per forward of a (batch, 3, 32, 32) input."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    model(x)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def build_models(bits_list, device, paths_batch, compile_fp=True) -> dict:
    from check_deploy_equality import set_bits

    torch.manual_seed(0)
    fp = get_model("resnet20", 10)
    if CKPT.is_file():
        load_fp_checkpoint(fp, CKPT)
    fp = fp.to(device).eval()
    models = {"fp32": (fp, None, None)}
    calib = torch.randn(64, 3, 32, 32, device=device)
    for b in bits_list:
        q = quantize_model(fp, b, b).to(device)
        calibrate(q, [calib], device=device)
        set_bits(q, calib, b)
        q.eval()
        models[f"fake-quant W{b}A{b}"] = (q, b, None)
        frozen = freeze(q, example_input=torch.randn(paths_batch, 3, 32, 32, device=device), reps=1)
        paths = sorted({r["path"] for r in layer_table(frozen)})
        models[f"deployed W{b}A{b}"] = (frozen, b, "+".join(paths))
        models[f"deployed-float W{b}A{b}"] = (freeze(q, path="float"), b, "float")
        if device.type == "cpu":
            from gdnsq.deploy.runtime import runtime

            rt = runtime(frozen, example_input=calib[:8])
            if rt.fallback_reason:
                label = "fallback"
            else:  # ISA build and the conv input formats its plan chose (packed popcount / bytes VNNI)
                formats = {f for plan in rt._plans.values() for pair in plan.formats for f in pair}
                label = f"runtime-{rt.isa} " + "+".join(sorted(formats))
            models[f"runtime W{b}A{b}"] = (rt, b, label)
    if compile_fp:
        models["fp32-compile"] = (torch.compile(fp), None, "torch.compile")
    return models


def artifact_bytes(model) -> int:
    """Bytes of ``gdnsq.deploy.save(model)``."""
    from gdnsq.deploy import save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.gdnsq")
        save(model, path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}})
        return os.path.getsize(path)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict:
    out = {"torch": torch.__version__, "gdnsq": gdnsq.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def write_markdown(jsonl: pathlib.Path, md: pathlib.Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:  # latest run per device
        if r["device"] not in latest or r["run"] > latest[r["device"]]:
            latest[r["device"]] = r["run"]
    lines = ["# ResNet-20 inference speed: FP32 vs fake-quant vs deployed", "",
             "Written by `python benchmarks/bench_inference.py [--device cuda]` from "
             "`benchmarks/results/inference.jsonl` (latest run per device). Median of the timed "
             "calls; speed-up = fake-quant latency / deployed latency of the same bit-width; "
             "vs FP32 (-compile) = FP32 (torch.compile) latency / this row's latency, same batch and "
             "thread count.", ""]
    for dev, run in sorted(latest.items()):
        sel = [r for r in rows if r["device"] == dev and r["run"] == run]
        v = sel[0]["versions"]
        loads = [r.get("load_avg_1min") for r in sel if r.get("load_avg_1min") is not None]
        busy = (f"; machine load average {min(loads):.1f}-{max(loads):.1f} during the run (other jobs were "
                f"running: absolute times are inflated, compare rows with care)"
                if loads and max(loads) > 1.5 * os.cpu_count() else "")
        lines += [f"## {dev}", "", f"run {run}, torch {v['torch']}, triton {v['triton']}, gdnsq {v['gdnsq']}{busy}", "",
                  f"W1A1 artifact: {sel[0].get('artifact_bytes_w1a1')} bytes", "",
                  "| model | paths | batch | threads | latency (ms) | images/s | vs fake-quant | vs FP32 | vs FP32-compile |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        by = {(r["model"], r["batch"], r.get("threads")): r for r in sel}
        verdict = []
        for r in sel:
            fq = by.get((f"fake-quant W{r['bits']}A{r['bits']}", r["batch"], r.get("threads"))) if r["bits"] else None
            f32 = by.get(("fp32", r["batch"], r.get("threads")))
            vs_fq = f"{fq['latency_ms'] / r['latency_ms']:.2f}x" if fq and r["model"].startswith("deployed") else ""
            vs_fp = f"{f32['latency_ms'] / r['latency_ms']:.2f}x" if f32 and r["model"] != "fp32" else ""
            f32c = by.get(("fp32-compile", r["batch"], r.get("threads")))
            vs_fpc = f"{f32c['latency_ms'] / r['latency_ms']:.2f}x" if f32c and r["model"] != "fp32-compile" else ""
            lines.append(f"| {r['model']} | {r['paths'] or ''} | {r['batch']} | {r.get('threads', '')} | {r['latency_ms']:.2f} | "
                         f"{r['images_per_s']:.0f} | {vs_fq} | {vs_fp} | {vs_fpc} |")
            if fq and (r["model"].startswith("deployed ") or r["model"].startswith("runtime ")):
                faster = fq["latency_ms"] > r["latency_ms"]
                verdict.append(f"{r['model']} at batch {r['batch']}, {r.get('threads')} thread(s): "
                               f"{'faster' if faster else 'slower'} than fake-quant "
                               f"({fq['latency_ms'] / r['latency_ms']:.2f}x), "
                               f"{'faster' if f32['latency_ms'] > r['latency_ms'] else 'slower'} than FP32 "
                               f"({f32['latency_ms'] / r['latency_ms']:.2f}x)")
        lines += ["", "Deployed (integer paths) on this device:", ""] + [f"- {v}" for v in verdict] + [""]
    atomic_write_text(md, "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=0, help="timed calls per point (default: 20 on GPU, 5 on CPU)")
    p.add_argument("--paths-batch", type=int, default=32, help="batch of freeze's path measurement")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile FP32 row")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (20 if device.type == "cuda" else 5)
    run = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t_start = time.time()
    models = build_models(args.bits, device, args.paths_batch, compile_fp=not args.no_compile)
    w1 = models.get("deployed W1A1")
    art_w1 = artifact_bytes(w1[0]) if w1 else None
    dev = device_name(device)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "inference.jsonl"
    rows = []
    points = [(t, name, batch) for t in args.threads for name in models for batch in args.batches]
    for threads, name, batch in points:
        model, bits, paths = models[name]
        torch.set_num_threads(threads)
        lat = time_model(model, batch, device, reps if batch > 1 else reps * 4)
        row = {"run": run, "device": dev, "versions": versions(), "model": name, "bits": bits,
               "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
               "paths": paths, "batch": batch, "threads": threads, "artifact_bytes_w1a1": art_w1,
               "reps": reps, "latency_ms": lat * 1e3,
               "images_per_s": batch / lat, "command": "python benchmarks/bench_inference.py "
               + " ".join(argv if argv is not None else sys.argv[1:])}
        rows.append(row)
        print(f"{name:24s} batch {batch:4d} threads {threads}: {lat * 1e3:9.2f} ms  {batch / lat:9.0f} img/s  {paths or ''}",
              flush=True)
    atomic_append_text(jsonl, "".join(json.dumps(row) + "\n" for row in rows))  # one line per point
    write_markdown(jsonl, out_dir / "inference.md")
    print(f"appended {len(rows)} rows to {jsonl}; wrote {out_dir / 'inference.md'} "
          f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
