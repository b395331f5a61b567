"""Inference speed of deployed GDNSQ models against FP32 (eager and torch.compile), one run.

Architectures (``--models``, definitions in benchmarks/_arch_full.py):

* ``r20``: CIFAR-10 ResNet-20, input 3x32x32 (akamaster checkpoint when ``shared/models`` has
  it, else He init), batches ``--batches`` plus ``--r20-batches`` (default 256);
* ``resnet18``: torchvision-shaped ResNet-18, 3x224x224, 1000 classes;
* ``mobilenet_v2``: torchvision-shaped MobileNetV2, width 1.0, 3x224x224, 1000 classes;
* ``bert``: BERT-base-sized encoder (12 x ``nn.TransformerEncoderLayer(768, 12, 3072, GELU)``),
  input = embeddings (B, 128, 768) float.

Rows per architecture, each at every ``--batches`` x ``--threads`` (``torch.set_num_threads``)
point:

* ``fp32``: the float network (speed does not depend on the weights: random init);
* ``fp32-compile``: the same under ``torch.compile`` (``--no-compile`` skips it; compiled in the
  warm-up call of each shape, not timed);
* ``fake-quant WbAb`` (only with ``--fake-quant``): ``gdnsq.quantize_model`` (default
  placement) + ``calibrate`` on a random batch + every quantizer set to exactly b bits
  (``check_deploy_equality.set_bits``), eval mode;
* ``deployed WbAb``: ``gdnsq.deploy.freeze`` of that model (paths measured on a small batch),
  written with ``gdnsq.deploy.save`` and read back with ``gdnsq.deploy.load``, run through its
  normal ``forward``: the default path a user gets;
* r20 only, as before: ``deployed-float WbAb`` (``freeze(path="float")``) and, on the CPU,
  ``runtime WbAb`` (``gdnsq.deploy.runtime.runtime``, the fused CIFAR-ResNet C++ runtime).

Median latency over the timed calls (``--reps``, four times that at batch 1, cut short after
``--max-seconds`` per point but never below 2 calls: BERT at batch 16 takes seconds per call),
inputs/s = batch / median. Ratios in the markdown compare rows of the same run, batch and
thread count: vs FP32 (eager) and vs FP32-compile. Artifact size: bytes of the saved file vs the
FP32 model's float32 parameters and buffers (FP first layer and classifier included).

Every row is appended to ``--out-dir``/inference.jsonl (CPU model and SIMD flags, load average,
threads, date, versions, command) and ``inference.md`` is rewritten from the latest run per
device, with a "targets" table (deployed vs FP32 eager at 1 thread: ResNet-18 W1A1 >= 3x, W2A2
>= 2x, W4A4 >= 1.5x; MobileNetV2 W4A4 >= 1.2x; BERT W4A4 / W2A2 >= 1.5x; R20 W1A1 >= 3.5x at
batch 1 and >= 2.5x at batch 256; 2 threads >= 1.7x the 1-thread throughput at batch 16;
ResNet-18 W1A1 artifact <= 1/20 of FP32), each met or missed with its ratio.

The lead's command on a quiet core (about 15-25 min on one core with today's per-layer paths;
BERT at batch 16 dominates)::

    taskset -c 1 python benchmarks/bench_inference.py

A quick look while other jobs load the machine (write outside the committed results)::

    OMP_NUM_THREADS=1 nice -n 5 taskset -c 1 python benchmarks/bench_inference.py --models r20 \\
        --bits 1 --batches 1 --r20-batches --threads 1 --reps 2 --no-compile --out-dir /tmp/bench
    ... --models resnet18 mobilenet_v2 bert --scale small ...   # tiny widths: checks the script only
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import gdnsq  # noqa: E402
from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq.cli.benchmark import measure_latency, plan_info, system_info  # noqa: E402
from gdnsq.deploy import freeze, layer_table, load, save  # noqa: E402

import _arch_full  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CKPT_NAME = "resnet20_cifar10_akamaster.th"
# worktrees sit one level deeper than the main checkout: look for ../shared and ../../shared
CKPTS = [ROOT.parent / "shared" / "models" / CKPT_NAME, ROOT.parent.parent / "shared" / "models" / CKPT_NAME]
R20_ARCH = {"name": "resnet20", "kwargs": {"num_classes": 10}}
CALIB_BATCH = {"r20": 64, "resnet18": 8, "mobilenet_v2": 8, "bert": 2}

#: (arch, bits, batch or None for every measured batch but 256, min speed-up of "deployed" over
#: "fp32" at 1 thread)
SPEED_TARGETS = [("resnet18", 1, None, 3.0), ("resnet18", 2, None, 2.0), ("resnet18", 4, None, 1.5),
                 ("mobilenet_v2", 4, None, 1.2), ("bert", 4, None, 1.5), ("bert", 2, None, 1.5),
                 ("r20", 1, 1, 3.5), ("r20", 1, 256, 2.5)]
THREAD_TARGET = (16, 1.7)   # at batch 16, 2 threads >= 1.7x the 1-thread throughput (deployed rows)
SIZE_TARGET = ("resnet18", 1, 20.0)  # W1A1 ResNet-18 artifact <= FP32 bytes / 20


def fp32_bytes(model) -> int:
    """float32 bytes of every parameter and buffer of the FP model (integers at their size)."""
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())


def student(fp, arch: str, shape, bits: int, device, scale: str):
    """Calibrated fake-quant model of ``fp`` with every quantizer at exactly ``bits`` bits."""
    from check_deploy_equality import calibrated_student

    return calibrated_student(fp, shape, bits, device, CALIB_BATCH[arch] if scale == "full" else 4)


@torch.no_grad()
def deploy_roundtrip(q, arch: str, shape, device, tmp: str):
    """freeze -> save -> load of the fake-quant model ``q``: (loaded model, artifact bytes, paths)."""
    frozen = freeze(q, example_input=torch.randn(2 if arch != "bert" else 1, *shape, device=device), reps=1)
    paths = "+".join(sorted({r["path"] for r in layer_table(frozen)}))
    path = os.path.join(tmp, f"{arch}.gdnsq")
    save(frozen.cpu(), path, architecture=R20_ARCH if arch == "r20" else None)
    size = os.path.getsize(path)
    # the CIFAR ResNet is rebuilt from the file's architecture; the others need a skeleton (the
    # fake-quant model: its attention modules have the projection submodules the file deploys)
    loaded = load(path, map_location=device) if arch == "r20" else load(path, q, map_location=device)
    return loaded, size, paths


def r20_fp(device):
    fp, shape = _arch_full.build("r20")
    for ckpt in CKPTS:
        if ckpt.is_file():
            from gdnsq.models import load_fp_checkpoint

            load_fp_checkpoint(fp, ckpt)
            break
    return fp.to(device).eval(), shape


def variants(arch, fp, shape, bits_list, device, args, tmp):
    """Yield ``(label, bits, model, paths, extra)`` one at a time (models of one bit-width are
    built when needed and dropped after, so BERT's copies do not pile up)."""
    yield "fp32", None, fp, "", {}
    if not args.no_compile:
        yield "fp32-compile", None, torch.compile(fp), "torch.compile", {}
    for b in bits_list:
        q = student(fp, arch, shape, b, device, args.scale)
        if args.fake_quant:
            yield f"fake-quant W{b}A{b}", b, q, "", {}
        loaded, size, paths = deploy_roundtrip(q, arch, shape, device, tmp)
        extra = {"artifact_bytes": size, "fp32_bytes": fp32_bytes(fp), "plan": plan_info(loaded)}
        yield f"deployed W{b}A{b}", b, loaded, paths, extra
        if arch == "r20":
            yield f"deployed-float W{b}A{b}", b, freeze(q, path="float"), "float", {}
            if device.type == "cpu":
                from gdnsq.deploy.runtime import runtime

                rt = runtime(loaded, example_input=torch.randn(8, *shape, device=device))
                if rt.fallback_reason:
                    label = "fallback"
                else:  # ISA build and the conv input formats its plan chose
                    formats = {f for plan in rt._plans.values() for pair in plan.formats for f in pair}
                    label = f"runtime-{rt.isa} " + "+".join(sorted(formats))
                yield f"runtime W{b}A{b}", b, rt, label, {}
        del q, loaded
        gc.collect()


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({system_info()['cpu']})"


# ------------------------------------------------------------------------------------- report

def _arch(r) -> str:
    return r.get("arch", "r20")  # rows written before the other architectures were added


def target_rows(rows: list) -> list:
    """The targets of the module docstring on one run's rows: dicts with ``target``, ``value``
    (None when not measured), ``threshold`` and ``met`` (None when not measured)."""
    by = {(_arch(r), r["model"], r["batch"], r.get("threads")): r for r in rows}
    out = []

    def add(target, value, threshold):
        out.append({"target": target, "value": value, "threshold": threshold,
                    "met": None if value is None else value >= threshold})

    for arch, bits, batch, need in SPEED_TARGETS:
        batches = [batch] if batch is not None else sorted(
            {r["batch"] for r in rows if _arch(r) == arch and r["batch"] != 256}) or [16]
        for bt in batches:
            fp = by.get((arch, "fp32", bt, 1))
            dep = by.get((arch, f"deployed W{bits}A{bits}", bt, 1))
            add(f"{arch} W{bits}A{bits} batch {bt}, 1 thread: deployed vs FP32",
                fp["latency_ms"] / dep["latency_ms"] if fp and dep else None, need)
    batch, need = THREAD_TARGET
    for r in rows:
        if r["model"].startswith("deployed W") and r["batch"] == batch and r.get("threads") == 2:
            one = by.get((_arch(r), r["model"], batch, 1))
            if one:
                add(f"{_arch(r)} {r['model']} batch {batch}: 2 threads vs 1 thread throughput",
                    one["latency_ms"] / r["latency_ms"], need)
    arch, bits, need = SIZE_TARGET
    sized = [r for r in rows if _arch(r) == arch and r["model"] == f"deployed W{bits}A{bits}"
             and r.get("artifact_bytes")]
    add(f"{arch} W{bits}A{bits} artifact: FP32 bytes / artifact bytes",
        sized[0]["fp32_bytes"] / sized[0]["artifact_bytes"] if sized else None, need)
    return out


def format_targets(targets: list) -> list:
    lines = ["| target | ratio | needed | |", "|---|---:|---:|---|"]
    for t in targets:
        v = "not measured" if t["value"] is None else f"{t['value']:.2f}x"
        verdict = "" if t["met"] is None else ("met" if t["met"] else "**missed**")
        lines.append(f"| {t['target']} | {v} | >= {t['threshold']:g}x | {verdict} |")
    return lines


def write_markdown(jsonl: pathlib.Path, md: pathlib.Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    latest = {}
    for r in rows:  # latest run per device
        if r["device"] not in latest or r["run"] > latest[r["device"]]:
            latest[r["device"]] = r["run"]
    lines = ["# Inference speed: FP32 vs deployed (and fake-quant)", "",
             "Written by `python benchmarks/bench_inference.py` from `inference.jsonl` in the same folder "
             "(latest run per device). Median of the timed calls; vs FP32 (-compile) = FP32 "
             "(torch.compile) latency / this row's latency, vs fake-quant = fake-quant latency / this "
             "row's latency; same architecture, batch and thread count.", ""]
    for dev, run in sorted(latest.items()):
        sel = [r for r in rows if r["device"] == dev and r["run"] == run]
        v = sel[0]["versions"]
        loads = [r.get("load_avg_1min") for r in sel if r.get("load_avg_1min") is not None]
        busy = (f"; machine load average {min(loads):.1f}-{max(loads):.1f} during the run (other jobs were "
                f"running: absolute times are inflated, compare rows with care)"
                if loads and max(loads) > 1.5 * (os.cpu_count() or 1) else "")
        flags = " ".join(sel[0].get("cpu_flags") or [])
        lines += [f"## {dev}", "", f"run {run}, torch {v['torch']}, triton {v.get('triton')}, gdnsq {v['gdnsq']}"
                  f"{busy}", ""] + ([f"CPU flags: {flags}", ""] if flags else [])
        by = {(_arch(r), r["model"], r["batch"], r.get("threads")): r for r in sel}
        for arch in dict.fromkeys(_arch(r) for r in sel):
            lines += [f"### {arch}", "",
                      "| model | paths | batch | threads | latency (ms) | inputs/s | vs FP32 | vs FP32-compile | vs fake-quant |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in (r for r in sel if _arch(r) == arch):
                key = (arch, r["batch"], r.get("threads"))
                f32, f32c = by.get((arch, "fp32") + key[1:]), by.get((arch, "fp32-compile") + key[1:])
                fq = by.get((arch, f"fake-quant W{r['bits']}A{r['bits']}") + key[1:]) if r["bits"] else None

                def ratio(ref, skip):
                    return f"{ref['latency_ms'] / r['latency_ms']:.2f}x" if ref and r["model"] != skip else ""

                lines.append(f"| {r['model']} | {r.get('paths') or ''} | {r['batch']} | {r.get('threads', '')} | "
                             f"{r['latency_ms']:.2f} | {r['images_per_s']:.1f} | {ratio(f32, 'fp32')} | "
                             f"{ratio(f32c, 'fp32-compile')} | {ratio(fq, (fq or {}).get('model'))} |")
            lines.append("")
        sizes = {}
        for r in sel:
            if r.get("artifact_bytes"):
                sizes[(_arch(r), r["model"])] = r
        if sizes:
            lines += ["Artifact size (saved file) vs the FP32 model's float32 parameters and buffers:", "",
                      "| model | artifact bytes | FP32 bytes | ratio |", "|---|---:|---:|---:|"]
            for (arch, name), r in sizes.items():
                lines.append(f"| {arch} {name} | {r['artifact_bytes']} | {r['fp32_bytes']} | "
                             f"{r['fp32_bytes'] / r['artifact_bytes']:.1f}x |")
            lines.append("")
        elif sel[0].get("artifact_bytes_w1a1"):
            lines += [f"W1A1 artifact: {sel[0].get('artifact_bytes_w1a1')} bytes", ""]
        if any("arch" in r for r in sel):
            lines += ["Targets:", ""] + format_targets(target_rows(sel)) + [""]
    atomic_write_text(md, "\n".join(lines))


# --------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(_arch_full.NAMES), choices=_arch_full.NAMES)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--r20-batches", type=int, nargs="*", default=[256],
                   help="extra batch sizes for r20 (default 256; empty: none)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    p.add_argument("--reps", type=int, default=0, help="timed calls per point (default: 20 on GPU, 10 on CPU)")
    p.add_argument("--max-seconds", type=float, default=4.0,
                   help="stop timing a point after this many seconds of timed calls (at least 2 calls)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", choices=["full", "small"], default="full",
                   help="small: tiny widths and inputs (checks the script, not a measurement)")
    p.add_argument("--fake-quant", action="store_true", help="add the fake-quant rows (slow)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile FP32 rows")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    for flag, values in (("--batches", args.batches), ("--threads", args.threads), ("--bits", args.bits)):
        if any(v < 1 for v in values):
            p.error(f"{flag}: expected positive integers, got {values}")
    device = torch.device(args.device)
    reps = args.reps or (20 if device.type == "cuda" else 10)
    run = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t_start = time.time()
    system = system_info()
    dev = device_name(device)
    versions = {"torch": torch.__version__, "gdnsq": gdnsq.__version__, "python": system["python"]}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "inference.jsonl"
    command = "python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            if arch == "r20" and args.scale == "full":
                fp, shape = r20_fp(device)
            else:
                fp, shape = _arch_full.build(arch, args.scale)
                fp = fp.to(device)
            batches = sorted(set(args.batches) | (set(args.r20_batches) if arch == "r20" else set()))
            torch.manual_seed(0)
            inputs = {b: torch.randn(b, *shape, device=device) for b in batches}
            for name, bits, model, paths, extra in variants(arch, fp, shape, args.bits, device, args, tmp):
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for batch in batches:
                        m = measure_latency(model, inputs[batch], reps=reps * 4 if batch == 1 else reps, warmup=1,
                                            max_seconds=args.max_seconds, min_reps=2)
                        lat = m["median_ms"] / 1e3
                        row = {"run": run, "device": dev, "versions": versions, "arch": arch, "model": name,
                               "bits": bits, "input_shape": list(shape), "scale": args.scale,
                               "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                               "cpu_flags": system["cpu_flags"], "paths": paths, "batch": batch,
                               "threads": threads, "reps": m["reps"], "latency_ms": m["median_ms"],
                               "min_ms": m["min_ms"], "images_per_s": batch / lat, "command": command,
                               **{k: v for k, v in extra.items() if k != "plan"}}
                        if extra.get("plan") is not None:
                            row["plan_segments"] = len(extra["plan"])
                        rows.append(row)
                        print(f"{arch:12s} {name:22s} batch {batch:4d} threads {threads}: {m['median_ms']:10.2f} ms "
                              f"{batch / lat:9.1f}/s  ({m['reps']} reps) {paths or ''}", flush=True)
                torch.set_num_threads(saved_threads)
            del fp
            gc.collect()
    atomic_append_text(jsonl, "".join(json.dumps(row) + "\n" for row in rows))  # one line per point
    write_markdown(jsonl, out_dir / "inference.md")
    print("\n" + "\n".join(format_targets(target_rows(rows))))
    print(f"\nappended {len(rows)} rows to {jsonl}; wrote {out_dir / 'inference.md'} "
          f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
