"""GPU benchmark of the gdnsq kernels with ``triton.testing.do_bench`` (CUDA only).

Run by ``benchmarks/gpu_check.sh``; standalone: ``python benchmarks/bench_gpu.py --out-dir DIR``.

* Copy bandwidth: ``y.copy_(x)`` on 256 MB float32, the yardstick for the memory-bound ops.
* Quantizers, forward and backward, on a 256 MB tensor (64M float32; a 16384 x 4096 weight)
  and at ResNet-20 sizes (activations 128x16x32x32, weight 64x64x3x3): ``fused`` (the Triton
  kernels), ``eager`` (the plain-PyTorch reference, ``gdnsq_kernels.quantize.reference``) and
  ``compiled`` (``torch.compile`` of that reference). GB/s counts the minimum traffic (each
  input read once, each output written once) against the measured copy bandwidth.
* Binary GEMM (4096 x 4096, 1-bit weight and activation codes) at batch 1 / 16 / 256: the
  Triton kernel (popcount path for small M, int8 tensor-core path for M >= 16) against bf16
  ``torch.mm`` of the same shape, plus a ResNet-20-sized ``binary_conv2d`` against bf16
  ``F.conv2d``. Each GEMM result is checked equal to the reference first.
* Kernel launches per QAT step (ResNet-20 W2A2 vs FP, and the W2A2 student in channels_last,
  torch.profiler), with the copy kernels among them: the channels_last step should launch no
  more copies than the contiguous one (the quantizers read channels_last in place).

do_bench flushes L2 between repetitions and reports the median in ms. Every measurement is
independent: one that fails is recorded with its error and the rest still run. Results:
``DIR/bench_gpu.json`` and ``DIR/bench_gpu.md`` (with ``os.getloadavg()``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gdnsq._atomic import atomic_write_text  # noqa: E402
from gdnsq_kernels import quantize as Q  # noqa: E402
from gdnsq_kernels.quantize import reference as R  # noqa: E402

MB = 1 << 20
GEMM_NK = 4096  # N = K of the binary GEMM (a 4096 x 4096 layer)
CONV_BATCH = 128


def bench(fn, rep_ms):
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms))


def quantizer_rows(dev, rep_ms, big_elems, rows=None):
    rows = [] if rows is None else rows
    a, gm, b = (torch.tensor(v, device=dev) for v in (-3.0, 1.0, -1.0))
    cases = [("act", "resnet20 128x16x32x32", (128, 16, 32, 32)),
             ("act", f"{big_elems * 4 // MB} MB", (big_elems,)),
             ("w", "resnet20 64x64x3x3", (64, 64, 3, 3)),
             ("w", f"{big_elems * 4 // MB} MB 16384x{big_elems // 16384}", (16384, big_elems // 16384))]
    compiled = {}

    def compiled_fn(name, fn):
        if name not in compiled:
            compiled[name] = torch.compile(fn, dynamic=False)
        return compiled[name]

    for kind, label, shape in cases:
        x = torch.randn(shape, device=dev)
        g = torch.randn_like(x)
        n = x.numel()
        if kind == "act":
            ops = {
                "fwd": (8 * n, {
                    "fused": lambda: Q.activation_forward(x, a, gm, b),
                    "eager": lambda: R.activation_forward(x, a, gm, b),
                    "compiled": lambda: compiled_fn("af", R.activation_forward)(x, a, gm, b)}),
                "bwd": (12 * n, {
                    "fused": lambda: Q.activation_backward(g, x, a, gm, b, 7, True),
                    "eager": lambda: R.activation_backward(g, x, a, gm, b, 7, True),
                    "compiled": lambda: compiled_fn("ab", R.activation_backward)(g, x, a, gm, b, 7, True)}),
            }
        else:
            step = torch.full((shape[0],), -4.0, device=dev)
            _, z = Q.weight_forward(x, step)
            ops = {
                "fwd": (8 * n, {
                    "fused": lambda: Q.weight_forward(x, step),
                    "eager": lambda: R.weight_forward(x, step),
                    "compiled": lambda: compiled_fn("wf", R.weight_forward)(x, step)}),
                "bwd": (8 * n, {
                    "fused": lambda: Q.weight_backward(g, x, step, z, 7, True),
                    "eager": lambda: R.weight_backward(g, x, step, z, 7, True),
                    "compiled": lambda: compiled_fn("wb", R.weight_backward)(g, x, step, z, 7, True)}),
            }
        for op, (nbytes, providers) in ops.items():
            for prov, fn in providers.items():
                row = {"group": "quantizer", "kind": kind, "op": op, "shape": label,
                       "provider": prov, "bytes": nbytes}
                try:
                    ms = bench(fn, rep_ms)
                    row.update(ms=ms, gbps=nbytes / ms / 1e6)
                except Exception as exc:  # noqa: BLE001 - recorded, the others still run
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rows.append(row)
                print(json.dumps(row), flush=True)
        del x, g
        torch.cuda.empty_cache()
    return rows


def gemm_rows(dev, rep_ms, rows=None):
    from gdnsq_kernels import pack_bits, xnor_gemm
    from gdnsq_kernels.binary import reference as binary_reference
    from gdnsq_kernels.binary.triton_xnor import _config

    rows = [] if rows is None else rows
    n = k = GEMM_NK
    wbits = torch.randint(0, 2, (n, k), device=dev)
    wpacked = pack_bits(wbits)
    wbf = (2 * wbits - 1).to(torch.bfloat16)
    for m in (1, 16, 256):
        abits = torch.randint(0, 2, (m, k), device=dev)
        apacked = pack_bits(abits)
        abf = (2 * abits - 1).to(torch.bfloat16)
        cfg = _config(m, n, k // 32, interpret=False)
        base = {"group": "gemm", "M": m, "N": n, "K": k, "path": cfg.path}
        try:
            got = xnor_gemm(apacked, wpacked, k, backend="triton")
            exact = bool(torch.equal(got, binary_reference.xnor_gemm_reference(apacked, wpacked, k)))
            ms_bin = bench(lambda: xnor_gemm(apacked, wpacked, k, backend="triton"), rep_ms)
            ms_bf16 = bench(lambda: torch.mm(abf, wbf.t()), rep_ms)
            row = dict(base, exact=exact, ms_binary=ms_bin, ms_bf16=ms_bf16,
                       speedup_vs_bf16=ms_bf16 / ms_bin, tmacs_binary=m * n * k / ms_bin / 1e9)
        except Exception as exc:  # noqa: BLE001
            row = dict(base, error=f"{type(exc).__name__}: {exc}"[:400], trace=traceback.format_exc()[-800:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    # A ResNet-20 stage-3 conv at batch 128: 64 -> 64 channels, 3x3, 8x8 maps.
    try:
        import torch.nn.functional as F

        from gdnsq_kernels.binary import binary_conv2d, pack_conv_weight

        j = torch.randint(0, 2, (CONV_BATCH, 64, 8, 8), device=dev)
        kc = torch.randint(0, 2, (64, 64, 3, 3), device=dev)
        pw = pack_conv_weight(kc, torch.full((64,), 0.05, device=dev), torch.full((64,), -0.02, device=dev))
        got = binary_conv2d(j, 0.5, 0.0, pw, padding=1, backend="triton")
        ref = binary_conv2d(j, 0.5, 0.0, pw, padding=1, backend="reference")
        xb = (0.5 * j).to(torch.bfloat16)
        wb = (0.05 * kc - 0.02).to(torch.bfloat16)
        row = {"group": "conv", "shape": f"{CONV_BATCH}x64x8x8 * 64x64x3x3",
               "max_abs_err_vs_reference": float((got - ref).abs().max()),
               "ms_binary": bench(lambda: binary_conv2d(j, 0.5, 0.0, pw, padding=1, backend="triton"), rep_ms),
               "ms_bf16": bench(lambda: F.conv2d(xb, wb, padding=1), rep_ms)}
        row["speedup_vs_bf16"] = row["ms_bf16"] / row["ms_binary"]
    except Exception as exc:  # noqa: BLE001
        row = {"group": "conv", "error": f"{type(exc).__name__}: {exc}"[:400]}
    rows.append(row)
    print(json.dumps(row), flush=True)
    return rows


def qat_launch_rows(dev, rows=None):
    """Kernel launches in one QAT step of ResNet-20 W2A2 (batch 128): FP vs gdnsq student vs the
    student and its input in channels_last, counted with torch.profiler (CUDA kernel events;
    on a CPU device, operator calls), how many are gdnsq's Triton kernels and how many copy
    (kernel names containing "copy"; ``aten::copy_`` calls on CPU)."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    from gdnsq import calibrate, jeffreys_divergence, quantize_model
    from gdnsq.models.resnet_cifar import resnet20

    rows = [] if rows is None else rows
    try:
        torch.manual_seed(0)
        fp = resnet20(10).to(dev)
        teacher = copy.deepcopy(fp).eval().requires_grad_(False)
        x = torch.randn(128, 3, 32, 32, device=dev)
        student = quantize_model(copy.deepcopy(fp), 2, 2)
        calibrate(student, [x])
        student_cl = copy.deepcopy(student).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        for name, model, inp in (("fp", copy.deepcopy(fp), x), ("gdnsq_w2a2", student, x),
                                 ("gdnsq_w2a2_channels_last", student_cl, x_cl)):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    t_logits = teacher(inp)
                jeffreys_divergence(model(inp), t_logits).backward()
                opt.step()

            for _ in range(3):  # compile / warm up (and autotune) outside the profile
                step()
            sync()
            activity = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
            with profile(activities=[activity]) as prof:
                step()
                sync()
            if dev.type == "cuda":
                kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            else:
                kernels = list(prof.events())
            gd = [e for e in kernels if e.name.startswith(("_act_", "_w_", "_packed_gemm", "_bits_dot"))]
            copies = [e for e in kernels if ("copy" in e.name.lower() if dev.type == "cuda"
                                             else e.name == "aten::copy_")]
            row = {"group": "qat_launches", "model": name, "kernels_per_step": len(kernels),
                   "gdnsq_triton_kernels_per_step": len(gd), "copy_kernels_per_step": len(copies)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    except Exception as exc:  # noqa: BLE001
        row = {"group": "qat_launches", "error": f"{type(exc).__name__}: {exc}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results", "gpu"))
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench time per measurement")
    ap.add_argument("--big-mb", type=int, default=256, help="size of the large tensors")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device; nothing to measure")
        return 2
    dev = torch.device("cuda")
    os.makedirs(args.out_dir, exist_ok=True)
    import triton

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "loadavg": os.getloadavg(),
            "commit": os.environ.get("GDNSQ_COMMIT", "unknown")}
    big = args.big_mb * MB // 4
    x = torch.empty(big, device=dev)
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x), args.rep_ms)
    meta["copy_gbps"] = 2 * big * 4 / copy_ms / 1e6
    del x, y
    print(json.dumps(meta), flush=True)
    rows = []
    try:  # fastest groups first; a SIGINT (the check's timeout) still writes what was measured
        gemm_rows(dev, args.rep_ms, rows)  # each appends to rows as it measures
        qat_launch_rows(dev, rows)
        quantizer_rows(dev, args.rep_ms, big, rows)
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print("interrupted: writing the rows measured so far", flush=True)
    atomic_write_text(os.path.join(args.out_dir, "bench_gpu.json"), json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# GPU benchmark ({meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']}, load {meta['loadavg']})", "",
             f"copy bandwidth: {meta['copy_gbps']:.0f} GB/s", "",
             "| op | shape | provider | ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["group"] == "quantizer":
            if "ms" in r:
                lines.append(f"| {r['kind']} {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.4f} | "
                             f"{r['gbps']:.0f} | {100 * r['gbps'] / meta['copy_gbps']:.0f} |")
            else:
                lines.append(f"| {r['kind']} {r['op']} | {r['shape']} | {r['provider']} | error: {r['error'][:80]} | | |")
    lines += ["", "| GEMM / conv | path | exact | binary ms | bf16 ms | binary speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["group"] in ("gemm", "conv"):
            if "error" in r:
                lines.append(f"| {r.get('M', r.get('shape', ''))} | | | error: {r['error'][:80]} | | |")
            elif r["group"] == "gemm":
                lines.append(f"| M={r['M']} N={r['N']} K={r['K']} | {r['path']} | {r['exact']} | "
                             f"{r['ms_binary']:.4f} | {r['ms_bf16']:.4f} | {r['speedup_vs_bf16']:.2f} |")
            else:
                lines.append(f"| conv {r['shape']} | | err {r['max_abs_err_vs_reference']:.2e} | "
                             f"{r['ms_binary']:.4f} | {r['ms_bf16']:.4f} | {r['speedup_vs_bf16']:.2f} |")
    lines += ["", "| QAT step (ResNet-20, batch 128) | kernels per step | of which gdnsq Triton | copies |",
              "|---|---|---|---|"]
    for r in rows:
        if r["group"] == "qat_launches":
            if "error" in r:
                lines.append(f"| error: {r['error'][:80]} | | | |")
            else:
                lines.append(f"| {r['model']} | {r['kernels_per_step']} | {r['gdnsq_triton_kernels_per_step']} | "
                             f"{r['copy_kernels_per_step']} |")
    atomic_write_text(os.path.join(args.out_dir, "bench_gpu.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
