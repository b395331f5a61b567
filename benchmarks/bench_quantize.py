"""Benchmark the GDNSQ quantizer ops: fused path vs the authors' eager composite vs torch.compile.

Providers, on the same inputs in one run:

* ``fused``: ``gdnsq_kernels.quantize_activation`` / ``quantize_weight`` on the default backend
  (the C++ CPU op on CPU tensors, the Triton kernels on CUDA).
* ``eager_composite``: the authors' composition (clamp, shift, divide, rounding autograd
  Function with ``round(v) - v`` forward, add, multiply, shift back) with autograd through it;
  the dither is drawn with ``torch.randint`` in the backward, as the authors do.
* ``compiled_reference``: ``torch.compile`` of the reference semantics written as one
  differentiable function (the STE surrogate with the counter-based dither); skipped with a
  recorded reason if compilation fails or ``--no-compile`` is given.

Measured: forward (training mode: grad enabled, saving for backward), backward
(``torch.autograd.grad`` on a retained graph) and forward+backward wall time, medians of
``--repeats`` runs after warm-up; bytes saved for backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``). On CUDA also GB/s of the fused path against the
device's measured copy bandwidth.

Shapes: activations 128x16x32x32 (ResNet-20's widest stage at batch 128), weights 64x64x3x3
per-channel (ResNet-20's largest conv). Results are appended to ``<out-dir>/quantize.jsonl``
(one JSON object per provider and op, with device, versions and date) and the table of this
run is written to ``<out-dir>/quantize.md``.

Run: ``python benchmarks/bench_quantize.py`` (about 1-2 minutes on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gdnsq._atomic import atomic_append_text, atomic_write_text  # noqa: E402
from gdnsq_kernels import quantize_activation, quantize_weight  # noqa: E402
from gdnsq_kernels.quantize._composite import composite_activation, composite_weight  # noqa: E402
from gdnsq_kernels.quantize.dither import DITHER_MAGNITUDE, SEED_SALT, lowbias32_int, lowbias32_torch  # noqa: E402

ACT_SHAPE = (128, 16, 32, 32)
W_SHAPE = (64, 64, 3, 3)


# ------------------------------------------------------------------ compiled reference
def _dither_from_key(numel, key, dtype, device):
    """Counter-based dither with the key as a tensor (so torch.compile does not specialise)."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    h = lowbias32_torch(idx ^ key)
    return torch.where((h >> 31) == 1, DITHER_MAGNITUDE, -DITHER_MAGNITUDE).to(dtype)


def reference_surrogate_activation(x, log2_step, log2_range, offset, key):
    """Reference semantics as one differentiable graph: forward y, backward = GDNSQ gradient."""
    s = torch.exp2(log2_step)
    lo = offset
    hi = lo + torch.exp2(log2_range) - s
    v = (torch.clamp(x, lo, hi) - lo) / s
    e = (torch.round(v) - v).detach()
    r = _dither_from_key(x.numel(), key, x.dtype, x.device).reshape(x.shape)
    return (v + e + r * (s - s.detach())) * s + lo


def reference_surrogate_weight(w, log2_step, key):
    shape = (-1,) + (1,) * (w.dim() - 1)
    z = w.reshape(w.shape[0], -1).amin(dim=1).reshape(shape)
    s = torch.exp2(log2_step).reshape(shape)
    v = (w - z) / s
    e = (torch.round(v) - v).detach()
    r = _dither_from_key(w.numel(), key, w.dtype, w.device).reshape(w.shape)
    return (v + e + r * (s - s.detach())) * s + z


# ------------------------------------------------------------------ measurement helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def saved_bytes(fn):
    """Bytes of the unique storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def copy_bandwidth_gbps(device, nbytes=256 << 20, repeats=10):
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    ms = _median_ms(lambda: b.copy_(a), device, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _median_backward_ms(forward, inputs, grad_out, device, repeats, warmup=2):
    """Backward alone: a fresh graph per run (compiled graphs forbid retain_graph)."""
    times = []
    for k in range(warmup + repeats):
        y = forward()
        _sync(device)
        t0 = time.perf_counter()
        torch.autograd.grad(y, inputs, grad_out)
        _sync(device)
        if k >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_provider(name, forward, inputs, grad_out, device, repeats):
    """forward(): output tensor built from ``inputs`` (leaves requiring grad)."""
    fwd = _median_ms(forward, device, repeats)
    bwd = _median_backward_ms(forward, inputs, grad_out, device, repeats)
    both = _median_ms(lambda: torch.autograd.grad(forward(), inputs, grad_out), device, repeats)
    return {"provider": name, "fwd_ms": fwd, "bwd_ms": bwd, "fwd_bwd_ms": both,
            "saved_bytes": saved_bytes(forward)}


def run(device, repeats, compile_ok, log):
    results = []
    torch.manual_seed(0)
    x = (torch.randn(ACT_SHAPE, device=device) * 1.5).requires_grad_(True)
    act_params = [torch.tensor(v, device=device, requires_grad=True) for v in (-4.0, 1.0, -1.0)]
    gx = torch.randn(ACT_SHAPE, device=device)
    w = (torch.randn(W_SHAPE, device=device) * 0.05).requires_grad_(True)
    w_step = torch.full((W_SHAPE[0],), -7.0, device=device, requires_grad=True)
    gw = torch.randn(W_SHAPE, device=device)
    key = torch.tensor(lowbias32_int(12345 ^ SEED_SALT), dtype=torch.int64, device=device)
    ops = {
        "activation": dict(
            inputs=[x, *act_params], grad=gx, numel=x.numel(),
            fused=lambda: quantize_activation(x, *act_params),
            eager_composite=lambda: composite_activation(x, *act_params, r=None),
            compiled=lambda f: (lambda: f(x, *act_params, key)),
            surrogate=reference_surrogate_activation,
        ),
        "weight": dict(
            inputs=[w, w_step], grad=gw, numel=w.numel(),
            fused=lambda: quantize_weight(w, w_step),
            eager_composite=lambda: composite_weight(w, w_step, r=None),
            compiled=lambda f: (lambda: f(w, w_step, key)),
            surrogate=reference_surrogate_weight,
        ),
    }
    fused_name = "fused (triton)" if device.type == "cuda" else "fused (cpu C++)"
    for op, spec in ops.items():
        rows = []
        log(f"[{op}] {fused_name}")
        rows.append(bench_provider(fused_name, spec["fused"], spec["inputs"], spec["grad"], device, repeats))
        log(f"[{op}] eager_composite")
        rows.append(bench_provider("eager composite (authors)", spec["eager_composite"], spec["inputs"],
                                   spec["grad"], device, repeats))
        if compile_ok is True:
            log(f"[{op}] torch.compile(reference)")
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(spec["surrogate"], dynamic=False)
                fn = spec["compiled"](compiled)
                torch.autograd.grad(fn(), spec["inputs"], spec["grad"])  # compile fwd + bwd
                _sync(device)
                ctime = time.perf_counter() - t0
                row = bench_provider("torch.compile(reference)", fn, spec["inputs"], spec["grad"],
                                     device, repeats)
                row["compile_s"] = ctime
                rows.append(row)
            except Exception as exc:  # record why, keep the other providers' numbers
                rows.append({"provider": "torch.compile(reference)",
                             "skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        else:
            rows.append({"provider": "torch.compile(reference)", "skipped": compile_ok})
        for row in rows:
            row["op"] = op
            row["shape"] = list(spec["inputs"][0].shape)
            if "saved_bytes" in row:
                row["saved_bytes_per_element"] = row["saved_bytes"] / spec["numel"]
            if device.type == "cuda" and "fwd_ms" in row:
                esize = spec["inputs"][0].element_size()
                row["fwd_GBps"] = 2 * spec["numel"] * esize / (row["fwd_ms"] * 1e-3) / 1e9
                row["bwd_GBps"] = 3 * spec["numel"] * esize / (row["bwd_ms"] * 1e-3) / 1e9
        results.extend(rows)
    return results


def environment(device):
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1min"] = round(os.getloadavg()[0], 2)  # other jobs on a shared machine
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


def markdown(results, env, command):
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"{env['threads']} threads; {env['date']}"
        + (f"; 1-min load average at start {env['loadavg_1min']}" if "loadavg_1min" in env else "") + ".",
        f"Command: `{command}`",
        "",
        "| op | shape | threads | provider | fwd ms | bwd ms | fwd+bwd ms | saved for backward (bytes/element) |"
        + (" fwd GB/s | bwd GB/s |" if "copy_GBps" in env else ""),
        "|---|---|---:|---|---:|---:|---:|---:|" + ("---:|---:|" if "copy_GBps" in env else ""),
    ]
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        if "skipped" in r:
            lines.append(f"| {r['op']} | {shape} | {r['threads']} | {r['provider']} | skipped: {r['skipped']} | | | |"
                         + (" | |" if "copy_GBps" in env else ""))
            continue
        line = (f"| {r['op']} | {shape} | {r['threads']} | {r['provider']} | {fmt(r['fwd_ms'], '.2f')} | "
                f"{fmt(r['bwd_ms'], '.2f')} | {fmt(r['fwd_bwd_ms'], '.2f')} | "
                f"{r['saved_bytes'] / 2**20:.2f} MiB ({fmt(r['saved_bytes_per_element'], '.2f')}) |")
        if "copy_GBps" in env:
            line += f" {fmt(r.get('fwd_GBps'), '.0f')} | {fmt(r.get('bwd_GBps'), '.0f')} |"
        lines.append(line)
    if "copy_GBps" in env:
        lines.append("")
        lines.append(f"Measured device copy bandwidth (read + write): {env['copy_GBps']:.0f} GB/s.")
    compile_rows = [r for r in results if "compile_s" in r]
    if compile_rows:
        lines.append("")
        lines.append("torch.compile time (first fwd+bwd): "
                     + ", ".join(f"{r['op']} ({r['threads']} thr) {r['compile_s']:.0f} s" for r in compile_rows) + ".")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--threads", default=None,
                    help="comma-separated CPU thread counts to run, e.g. 1,2 (default: torch's)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    repeats = args.repeats or (30 if device.type == "cuda" else 7)
    compile_ok = "--no-compile given" if args.no_compile else True

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = environment(device)
    if device.type == "cuda":
        env["copy_GBps"] = copy_bandwidth_gbps(device)
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    results = []
    for nt in thread_counts:
        torch.set_num_threads(nt)
        log(f"-- {nt} thread(s)")
        for row in run(device, repeats, compile_ok, log):
            row["threads"] = nt
            results.append(row)
    env["threads"] = ",".join(map(str, thread_counts))
    command = "python benchmarks/bench_quantize.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    records = "".join(json.dumps({**env, "repeats": repeats, **r}) + "\n" for r in results)
    atomic_append_text(os.path.join(args.out_dir, "quantize.jsonl"), records)
    table = markdown(results, env, command)
    atomic_write_text(os.path.join(args.out_dir, "quantize.md"), table)
    print(table)


if __name__ == "__main__":
    main()
