"""Benchmark the bit-packed W1A1 ops against float matmul / conv on the same shapes.

Providers (one run compares them on the same device):

* ``packed``: ``xnor_gemm`` on pre-packed operands (GEMM rows), or ``binary_conv2d`` /
  ``binary_linear`` with a pre-packed weight (layer rows: includes packing the activation codes
  and the float64 affine epilogue). Backend ``auto``: ``cpu`` on CPU, ``triton`` on CUDA.
* ``float32``: ``torch.matmul`` / ``F.conv2d`` in float32 with the weight stored as float32.
* ``bf16`` (CUDA only): the same in bfloat16.

Shapes: a 4096x4096 linear layer at batch 1..256, and the five 3x3 ResNet-20 (CIFAR) convs at
batch 1, 32 and 256. Each row records the weight bytes of the provider's stored weight.

Every result is appended to ``<out-dir>/binary.jsonl`` (device, versions, date, git commit;
default ``benchmarks/results``); ``<out-dir>/binary.md`` is rewritten with the newest run per
device.

Usage::

    python benchmarks/bench_binary.py              # full run (CPU: about 2-3 minutes)
    python benchmarks/bench_binary.py --quick      # fewer shapes and repeats (smoke test)
    python benchmarks/bench_binary.py --crossover  # also time the CPU GEMM strategies
    python benchmarks/bench_binary.py --out-dir benchmarks/results/gpu   # gpu_check.sh
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gdnsq_kernels  # noqa: E402
from gdnsq_kernels import pack_bits, xnor_gemm  # noqa: E402
from gdnsq_kernels.binary import conv2d as binary_conv2d_module  # noqa: E402
from gdnsq_kernels.binary import cpu_xnor, numpy_gemm  # noqa: E402
from gdnsq_kernels.binary import (  # noqa: E402
    binary_conv2d,
    binary_linear,
    pack_conv_weight,
    pack_linear_weight,
)

RESULTS = ROOT / "benchmarks" / "results"
RESNET20 = [  # (C_in, C_out, H=W, stride), 3x3, padding 1
    (16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_group(fns: dict, device, repeats: int, budget_s: float = 3.0) -> dict:
    """{name: dict(ms, median, p20, p80, stat)} in wall milliseconds for each callable.

    CUDA: ``triton.testing.do_bench`` per callable; ``ms`` = median. CPU: the callables run
    interleaved, one call each per round, so a burst of load from other processes hits all of
    them alike; ``ms`` = the minimum over rounds, the estimate least disturbed on a shared
    machine (median and percentiles are recorded too). Rounds shrink to stay near budget_s,
    but never below 3.
    """
    if device.type == "cuda":
        import triton.testing

        out = {}
        for name, fn in fns.items():
            med, p20, p80 = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5, 0.2, 0.8])
            out[name] = dict(ms=float(med), median=float(med), p20=float(p20), p80=float(p80), stat="median")
        return out
    ts = {name: [] for name in fns}
    t_round = 0.0
    for name, fn in fns.items():  # warm-up (first call may allocate / build), then one timed call
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        ts[name].append(dt)
        t_round += dt
    rounds = max(3, min(repeats, int(budget_s / max(t_round, 1e-6))))
    for _ in range(rounds - 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    out = {}
    for name, v in ts.items():
        v = sorted(x * 1e3 for x in v)
        q = lambda f: v[min(len(v) - 1, int(f * len(v)))]  # noqa: E731
        out[name] = dict(ms=v[0], median=statistics.median(v), p20=q(0.2), p80=q(0.8), stat="min")
    return out


def env_info(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": np.__version__,
        "gdnsq": gdnsq_kernels.__version__,
        "commit": commit,
        "cpu_gemm": "c++ popcount" if (device.type == "cpu" and cpu_xnor.available()) else
                    ("numpy/float" if device.type == "cpu" else "triton"),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def bench_gemm(device, batches, repeats, rows, providers):
    O = K = 4096
    k = torch.randint(0, 2, (O, K), device=device, dtype=torch.uint8)
    wq = pack_linear_weight(k, torch.rand(O, device=device) * 0.1, -torch.rand(O, device=device) * 0.05)
    wf = {"float32": torch.randn(K, O, device=device)}
    if "bf16" in providers:
        wf["bf16"] = wf["float32"].to(torch.bfloat16)
    for M in batches:
        j = torch.randint(0, 2, (M, K), device=device, dtype=torch.uint8)
        jp = pack_bits(j)
        shape = f"linear {K}x{O}, batch {M}"
        cases = {
            "packed gemm": (lambda: xnor_gemm(jp, wq.packed, K), wq.nbytes),
            "packed layer": (lambda: binary_linear(j, 0.5, 0.0, wq), wq.nbytes + 8 * O),
        }
        for p, w in wf.items():
            x = torch.randn(M, K, device=device, dtype=w.dtype)
            cases[p] = ((lambda x=x, w=w: x @ w), w.numel() * w.element_size())
        times = time_group({p: c[0] for p, c in cases.items()}, device, repeats)
        for prov, (fn, nbytes) in cases.items():
            t = times[prov]
            rows.append(dict(kind="linear", shape=shape, batch=M, provider=prov, **t,
                             weight_bytes=nbytes, macs=M * K * O))
            print(f"{shape:32s} {prov:16s} {t['ms']:9.3f} ms  weight {nbytes/1e6:7.2f} MB", flush=True)


def _conv_with(strategy, j, wq, stride):
    """binary_conv2d with the cpu backend's conv strategy forced (None: the measured default)."""
    binary_conv2d_module.CPU_CONV_STRATEGY = strategy
    try:
        return binary_conv2d(j, 0.5, 0.0, wq, stride=stride, padding=1)
    finally:
        binary_conv2d_module.CPU_CONV_STRATEGY = None


def bench_conv(device, batches, repeats, rows, providers):
    for (C, O, H, s) in RESNET20:
        k = torch.randint(0, 2, (O, C, 3, 3), device=device, dtype=torch.uint8)
        wq = pack_conv_weight(k, torch.rand(O, device=device) * 0.1, -torch.rand(O, device=device) * 0.05)
        wf = {"float32": torch.randn(O, C, 3, 3, device=device)}
        if "bf16" in providers:
            wf["bf16"] = wf["float32"].to(torch.bfloat16)
        for N in batches:
            j = torch.randint(0, 2, (N, C, H, H), device=device, dtype=torch.uint8)
            shape = f"conv {C}->{O} {H}x{H} s{s}, batch {N}"
            Ho = (H + 2 - 3) // s + 1
            cases = {"packed layer": (lambda: _conv_with(None, j, wq, s), wq.nbytes + 8 * O)}
            if device.type == "cpu":
                # The alternative exact CPU strategy: float conv of the 0/1 codes + same epilogue.
                cases["codes-conv layer"] = (lambda: _conv_with("float", j, wq, s), wq.nbytes + 8 * O)
            for p, w in wf.items():
                x = torch.randn(N, C, H, H, device=device, dtype=w.dtype)
                cases[p] = ((lambda x=x, w=w: F.conv2d(x, w, stride=s, padding=1)), w.numel() * w.element_size())
            times = time_group({p: c[0] for p, c in cases.items()}, device, repeats)
            for prov, (fn, nbytes) in cases.items():
                t = times[prov]
                rows.append(dict(kind="conv", shape=shape, batch=N, provider=prov, **t,
                                 weight_bytes=nbytes, macs=N * Ho * Ho * O * C * 9))
                print(f"{shape:32s} {prov:16s} {t['ms']:9.3f} ms  weight {nbytes/1e3:7.1f} kB", flush=True)


def _cpu_choice(M, N):
    """The strategy the cpu backend runs for an (M, N) GEMM."""
    if cpu_xnor.available():
        return "c++ popcount"
    return "float sgemm" if numpy_gemm.use_float_gemm(M, N) else "numpy popcount"


def bench_crossover(repeats, rows):
    """The two CPU GEMM strategies on the GEMM shapes the layers produce (the switch rule)."""
    for (N, K) in [(4096, 4096), (64, 576), (16, 144)]:
        b = pack_bits(torch.randint(0, 2, (N, K)))
        for M in [1, 8, 32, 64, 256, 4096]:
            if N == 4096 and M > 256:
                continue
            a = pack_bits(torch.randint(0, 2, (M, K)))
            strategies = {"numpy popcount": numpy_gemm.gemm_cpu_popcount,
                          "float sgemm": numpy_gemm.gemm_cpu_float}
            if cpu_xnor.available():
                strategies["c++ popcount"] = cpu_xnor.packed_gemm_cpp
            times = time_group({p: (lambda fn=fn: fn(a, b, K, True)) for p, fn in strategies.items()},
                               torch.device("cpu"), repeats, 1.5)
            for prov in strategies:
                t = times[prov]
                med = t["ms"]
                rows.append(dict(kind="cpu-crossover", shape=f"M={M} N={N} K={K}", batch=M, provider=prov,
                                 **t, weight_bytes=None, macs=M * N * K,
                                 chosen=prov == _cpu_choice(M, N)))
                print(f"crossover M={M:5d} N={N:5d} K={K:5d} {prov:15s} {med:9.3f} ms", flush=True)


def render_md(jsonl: pathlib.Path) -> str:
    """Markdown tables of the newest run per device, from every record in the jsonl file."""
    recs = [json.loads(x) for x in jsonl.read_text(encoding="utf-8").splitlines() if x.strip()]
    latest = {}
    for r in recs:
        latest[r["device"]] = max(latest.get(r["device"], ""), r["run"])
    out = ["# Bit-packed W1A1 ops vs float (benchmarks/bench_binary.py)", "",
           "Wall time per call in ms: the minimum over repeats on CPU (the machine is shared; the "
           "minimum is the least disturbed estimate), the median of `triton.testing.do_bench` on "
           "CUDA; medians and 20th/80th percentiles are in the jsonl. `packed gemm`: "
           "`xnor_gemm` on pre-packed operands; `packed layer`: `binary_linear`/`binary_conv2d` with a "
           "pre-packed weight, including packing the activation codes and the affine epilogue; "
           "`codes-conv layer` (CPU): `binary_conv2d` computing sum(k*j) as a float conv of the 0/1 "
           "codes instead of the popcount GEMM (the other exact CPU strategy). "
           "`speed-up` = float32 time / packed time (>1: packed wins). Weight bytes: stored weight "
           "of the provider (packed: codes + 8 bytes/channel of step and minimum).", ""]
    for dev in sorted(latest):
        run = [r for r in recs if r["device"] == dev and r["run"] == latest[dev]]
        e = run[0]["env"]
        out += [f"## {dev}: {e['device_name']}", "",
                f"torch {e['torch']}, triton {e['triton']}, numpy {e['numpy']}, packed GEMM: "
                f"{e.get('cpu_gemm', '?')}, torch threads {e.get('threads', '?')}, commit {e['commit']}, "
                f"{e['date']}, command `{run[0]['command']}`", ""]
        for kind in ("linear", "conv"):
            sel = [r for r in run if r["kind"] == kind]
            if not sel:
                continue
            provs = [p for p in ("packed gemm", "packed layer", "codes-conv layer", "float32", "bf16")
                     if any(r["provider"] == p for r in sel)]
            out.append("| shape | " + " | ".join(f"{p} ms" for p in provs)
                       + " | speed-up layer vs fp32 | weight bytes packed / fp32 |")
            out.append("|---" * (len(provs) + 3) + "|")
            for shape in dict.fromkeys(r["shape"] for r in sel):
                by = {r["provider"]: r for r in sel if r["shape"] == shape}
                cells = [f"{by[p]['ms']:.3f}" if p in by else "" for p in provs]
                sp = by["float32"]["ms"] / by["packed layer"]["ms"]
                wb = f"{by['packed layer']['weight_bytes']:,} / {by['float32']['weight_bytes']:,}"
                out.append(f"| {shape} | " + " | ".join(cells) + f" | {sp:.2f}x | {wb} |")
            out.append("")
        cross = [r for r in run if r["kind"] == "cpu-crossover"]
        if cross:
            strat = [p for p in ("c++ popcount", "numpy popcount", "float sgemm") if any(r["provider"] == p for r in cross)]
            out += ["CPU GEMM strategies (XNOR form, ms; `*` = the one the `cpu` backend picks):", "",
                    "| GEMM | " + " | ".join(strat) + " |", "|---" * (len(strat) + 1) + "|"]
            for shape in dict.fromkeys(r["shape"] for r in cross):
                by = {r["provider"]: r for r in cross if r["shape"] == shape}
                c = [f"{by[p]['ms']:.3f}{'*' if by[p]['chosen'] else ''}" for p in strat]
                out.append(f"| {shape} | " + " | ".join(c) + " |")
            out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--crossover", action="store_true", help="also time the two CPU GEMM strategies")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); NumPy popcount is single-threaded")
    ap.add_argument("--out-dir", default=str(RESULTS),
                    help="folder for binary.jsonl (appended) and binary.md (rewritten)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                       (args.device if args.device != "auto" else "cpu"))
    providers = ["packed", "float32"] + (["bf16"] if dev.type == "cuda" else [])
    batches = [1, 8, 256] if args.quick else [1, 8, 32, 128, 256]
    conv_batches = [1, 32] if args.quick else [1, 32, 256]
    reps = 3 if args.quick else args.repeats
    rows = []
    torch.manual_seed(0)
    bench_gemm(dev, batches, reps, rows, providers)
    bench_conv(dev, conv_batches, reps, rows, providers)
    if args.crossover and dev.type == "cpu":
        bench_crossover(reps, rows)
    if args.no_write:
        return
    env = env_info(dev)
    command = "python benchmarks/bench_binary.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jl = out_dir / "binary.jsonl"
    new = "".join(json.dumps(dict(r, env=env, device=dev.type, run=env["date"], command=command.strip())) + "\n"
                  for r in rows)
    atomic_append_text(jl, new)
    atomic_write_text(out_dir / "binary.md", render_md(jl))
    print(f"appended {len(rows)} rows to {jl}; wrote {out_dir / 'binary.md'}")


if __name__ == "__main__":
    main()
