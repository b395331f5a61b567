"""Benchmark the exact integer kernels (gdnsq_kernels.int_ops) against FP32 on the same shapes.

Side by side in one run, on the threads ``torch.set_num_threads`` is given (default 1):

* ``int_conv2d`` (uint8 NHWC codes x pre-packed int8 weights -> int32 NHWC sums) and, for the
  dense (groups=1) shapes, ``popcount_conv2d`` (channel-packed 1-bit codes x pre-packed 1-bit
  weights, W1A1) vs ``F.conv2d`` in FP32, NCHW (PyTorch's default) and channels_last, on the conv
  shapes of a ResNet-18 at 224x224 (stem, every 3x3 shape, the 1x1 stride-2 shortcuts) and of a
  MobileNetV2 at 224x224 (pointwise expand/project 1x1 convs, depthwise 3x3 convs), batch 1
  (``--batch``), and of a CIFAR ResNet-20 (3x3 convs at 16/32/64 channels) at batch 1 and 16
  (``--cifar-batches``);
* ``int_linear`` (uint8 (M, K) x pre-packed int8 (N, K) -> int32) and ``popcount_linear``
  (1-bit, pre-packed) vs the FP32 matmul ``x @ W.T`` on BERT-base shapes (768x768 projections,
  768->3072 and 3072->768 MLP) at M = 128 tokens, and at M = 1 and 16 (small-batch GEMMs).

The integer kernels get 4-bit activation codes and 4-bit weights (their speed does not depend
on the values on VNNI; the AVX2 build needs codes <= 127 for its fast path). Weights are packed
once, outside the timing, as a deploy plan does. Timing: the providers of a shape run
interleaved, one call each per round, and the minimum over rounds is kept (the estimate least
disturbed by other jobs on a shared core; the median is recorded too).

``--scaling`` measures instead the 2-thread speedup of each provider on a few batch-16 shapes
(1 and 2 threads interleaved in the same rounds; needs two cores: ``taskset -c 0,1``).

Every result is appended to ``<out-dir>/int_ops.jsonl`` with the CPU flags, the ISA build, the
thread count, the load average before and after, and the commit; ``<out-dir>/int_ops.md`` is
rewritten with the newest run of each kind. Usage (one thread, pinned)::

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_int_ops.py
    python benchmarks/bench_int_ops.py --quick --isa avx2
    taskset -c 0,1 python benchmarks/bench_int_ops.py --scaling
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from gdnsq._atomic import atomic_append_text  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_binary import time_group  # noqa: E402
from gdnsq._atomic import atomic_open  # noqa: E402
from gdnsq_kernels import cpu_deploy  # noqa: E402
from gdnsq_kernels import int_ops as I  # noqa: E402
from gdnsq_kernels._build import cpu_flags  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
# (name, C_in, C_out, H=W of the input, kernel, stride, groups); padding = kernel // 2
RESNET18 = [
    ("resnet18 conv1 7x7/2", 3, 64, 224, 7, 2, 1),
    ("resnet18 layer1 3x3", 64, 64, 56, 3, 1, 1),
    ("resnet18 layer2 3x3/2", 64, 128, 56, 3, 2, 1),
    ("resnet18 layer2 3x3", 128, 128, 28, 3, 1, 1),
    ("resnet18 layer2 1x1/2 shortcut", 64, 128, 56, 1, 2, 1),
    ("resnet18 layer3 3x3/2", 128, 256, 28, 3, 2, 1),
    ("resnet18 layer3 3x3", 256, 256, 14, 3, 1, 1),
    ("resnet18 layer3 1x1/2 shortcut", 128, 256, 28, 1, 2, 1),
    ("resnet18 layer4 3x3/2", 256, 512, 14, 3, 2, 1),
    ("resnet18 layer4 3x3", 512, 512, 7, 3, 1, 1),
    ("resnet18 layer4 1x1/2 shortcut", 256, 512, 14, 1, 2, 1),
]
MOBILENETV2 = [
    ("mobilenetv2 expand 1x1", 16, 96, 112, 1, 1, 1),
    ("mobilenetv2 expand 1x1", 24, 144, 56, 1, 1, 1),
    ("mobilenetv2 expand 1x1", 64, 384, 14, 1, 1, 1),
    ("mobilenetv2 expand 1x1", 160, 960, 7, 1, 1, 1),
    ("mobilenetv2 project 1x1", 96, 24, 56, 1, 1, 1),
    ("mobilenetv2 project 1x1", 144, 32, 28, 1, 1, 1),
    ("mobilenetv2 project 1x1", 384, 96, 14, 1, 1, 1),
    ("mobilenetv2 project 1x1", 960, 320, 7, 1, 1, 1),
    ("mobilenetv2 depthwise 3x3", 32, 32, 112, 3, 1, 32),
    ("mobilenetv2 depthwise 3x3/2", 96, 96, 112, 3, 2, 96),
    ("mobilenetv2 depthwise 3x3", 144, 144, 56, 3, 1, 144),
    ("mobilenetv2 depthwise 3x3", 192, 192, 28, 3, 1, 192),
    ("mobilenetv2 depthwise 3x3", 384, 384, 14, 3, 1, 384),
    ("mobilenetv2 depthwise 3x3/2", 576, 576, 14, 3, 2, 576),
    ("mobilenetv2 depthwise 3x3", 960, 960, 7, 3, 1, 960),
]
CIFAR_RESNET20 = [
    ("cifar resnet20 3x3", 16, 16, 32, 3, 1, 1),
    ("cifar resnet20 3x3/2", 16, 32, 32, 3, 2, 1),
    ("cifar resnet20 3x3", 32, 32, 16, 3, 1, 1),
    ("cifar resnet20 3x3/2", 32, 64, 16, 3, 2, 1),
    ("cifar resnet20 3x3", 64, 64, 8, 3, 1, 1),
]
# (name, M = sequence x batch, K, N)
BERT = [
    ("bert-base q/k/v/o 768x768", 128, 768, 768),
    ("bert-base mlp up 768->3072", 128, 768, 3072),
    ("bert-base mlp down 3072->768", 128, 3072, 768),
    ("bert-base q/k/v/o 768x768", 16, 768, 768),
    ("bert-base mlp up 768->3072", 16, 768, 3072),
    ("bert-base q/k/v/o 768x768", 1, 768, 768),
    ("bert-base mlp down 3072->768", 1, 3072, 768),
]
# --scaling: (conv shape, batch) and BERT rows measured at 1 and 2 threads
SCALING_CONVS = [(CIFAR_RESNET20[0], 16), (CIFAR_RESNET20[4], 16), (RESNET18[3], 16), (MOBILENETV2[10], 16)]
SCALING_LINEARS = [BERT[0]]
ISA_FLAGS = ("avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
             "avx512_vpopcntdq", "avx_vnni", "amx_int8")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def conv_cases(shapes, batch: int, isa: str, seed: int = 0):
    """(shape label, macs, {provider: callable}) per conv shape."""
    for name, cin, cout, hw, k, stride, groups in shapes:
        g = _gen(seed)
        x_codes = torch.randint(0, 16, (batch, hw, hw, cin), dtype=torch.uint8, generator=g)
        w_codes = torch.randint(-8, 8, (cout, k, k, cin // groups), dtype=torch.int8, generator=g)
        packed = I.pack_int_conv_weight(w_codes, groups)
        x_bits = I.pack_channel_bits(torch.randint(0, 2, (batch, hw, hw, cin), dtype=torch.uint8, generator=g), isa=isa)
        w_bits = I.pack_popcount_conv_weight(torch.randint(0, 2, (cout, k, k, cin), dtype=torch.uint8, generator=g))
        x32 = torch.randn(batch, cin, hw, hw, generator=g)
        w32 = torch.randn(cout, cin // groups, k, k, generator=g)
        x32_cl, w32_cl = x32.contiguous(memory_format=torch.channels_last), w32.contiguous(memory_format=torch.channels_last)
        pad = k // 2
        ho = (hw + 2 * pad - k) // stride + 1
        fns = {
            "int": lambda x=x_codes, w=packed, s=stride, p=pad, gr=groups: I.int_conv2d(x, w, s, p, 1, gr, 7, isa=isa),
            "fp32": lambda x=x32, w=w32, s=stride, p=pad, gr=groups: F.conv2d(x, w, stride=s, padding=p, groups=gr),
            "fp32 channels_last": lambda x=x32_cl, w=w32_cl, s=stride, p=pad, gr=groups: F.conv2d(
                x, w, stride=s, padding=p, groups=gr),
        }
        if groups == 1:
            fns["popcount 1-bit"] = lambda x=x_bits, w=w_bits, s=stride, p=pad: I.popcount_conv2d(x, w, s, p, isa=isa)
        label = f"{name} {cin}->{cout} @{hw}, batch {batch}"
        yield label, batch * ho * ho * cout * k * k * (cin // groups), fns


def linear_cases(shapes, isa: str, seed: int = 0):
    for name, m, kdim, n in shapes:
        g = _gen(seed)
        x_codes = torch.randint(0, 16, (m, kdim), dtype=torch.uint8, generator=g)
        packed = I.pack_int_linear_weight(torch.randint(-8, 8, (n, kdim), dtype=torch.int8, generator=g))
        words = -(-kdim // 64)
        x_bits = torch.randint(-2**63, 2**63 - 1, (m, words), dtype=torch.int64, generator=g)
        w_bits = I.pack_popcount_weight(torch.randint(-2**63, 2**63 - 1, (n, words), dtype=torch.int64, generator=g), kdim)
        x32, w32 = torch.randn(m, kdim, generator=g), torch.randn(n, kdim, generator=g)
        fns = {
            "int": lambda x=x_codes, w=packed: I.int_linear(x, w, isa=isa),
            "popcount 1-bit": lambda x=x_bits, w=w_bits, k=kdim: I.popcount_linear(x, w, k, xnor=True, isa=isa),
            "fp32": lambda x=x32, w=w32: x @ w.t(),
        }
        yield f"{name}, M={m}", m * kdim * n, fns


def env_info(isa: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    flags = cpu_flags()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(f for f in ISA_FLAGS if f in flags), "isa": isa,
        "isa_build": I.load_extension(isa).isa(), "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "commit": commit,
    }


def _fmt(v, spec=".3f", suffix=""):
    return "" if v is None else f"{v:{spec}}{suffix}"


def _header(env, loads, what: str) -> list:
    lines = [f"{what}: ISA build `{env['isa']}` ({env['isa_build']}), {env['threads']} thread(s), CPU affinity "
             f"{env['affinity']}, {env['processor'] or env['machine']} with {', '.join(env['cpu_flags'])}; "
             f"torch {env['torch']}, commit {env['commit']}. 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
             f"on {env['cpu_count']} cores.", ""]
    if max(loads) > 1.0:
        lines += ["(A load above 1 means other jobs shared the cores: absolute times are inflated and noisy; the "
                  "ratios compare providers measured interleaved in the same rounds.)", ""]
    return lines


def write_markdown(jsonl: pathlib.Path, md: pathlib.Path) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    lines = ["# Integer kernels vs FP32 (`benchmarks/bench_int_ops.py`)", "",
             "Written from `benchmarks/results/int_ops.jsonl` (the newest run of each kind). Integer kernels "
             "with pre-packed weights, 4-bit codes (uint8 x int8) or 1-bit codes (popcount, W1A1). Times: "
             "the minimum over interleaved rounds (ms). Ratios: FP32 time / integer time (> 1: the integer "
             "kernel is faster), against the faster of the two FP32 layouts (NCHW, channels_last) for convs.", ""]
    speed = [r for r in rows if r.get("kind", "speed") == "speed"]
    if speed:
        run = max(r["run"] for r in speed)
        sel = [r for r in speed if r["run"] == run]
        lines += _header(sel[0]["env"], [v for r in sel for v in (r["load_before"], r["load_after"])], f"run {run}")
        lines += ["FP32 GMAC/s shows where PyTorch's FP32 kernel itself is slow on this machine (a row far below "
                  "the others, e.g. a weight that does not stay in cache, or the 3-channel NCHW stem): such a "
                  "ratio measures that FP32 slow path. Depthwise and 1x1 rows with few channels are memory "
                  "bound (the int32 output is as large as FP32's).", "",
                  "| shape | GMAC | int (ms) | popcount 1-bit (ms) | FP32 NCHW (ms) | FP32 channels_last (ms) | "
                  "int GMAC/s | FP32 GMAC/s | int vs FP32 | popcount vs FP32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sel:
            t = r["ms"]
            integer, cl, pc = t["int"], t.get("fp32 channels_last"), t.get("popcount 1-bit")
            best = min(t["fp32"], cl or t["fp32"])
            lines.append(f"| {r['shape']} | {r['macs'] / 1e9:.4f} | {integer:.3f} | {_fmt(pc)} | {t['fp32']:.3f} | "
                         f"{_fmt(cl)} | {r['macs'] / integer / 1e6:.0f} | {r['macs'] / best / 1e6:.0f} | "
                         f"{best / integer:.2f}x | {_fmt(best / pc if pc else None, '.2f', 'x')} |")
        lines.append("")
    scaling = [r for r in rows if r.get("kind") == "scaling"]
    if scaling:
        run = max(r["run"] for r in scaling)
        sel = [r for r in scaling if r["run"] == run]
        lines += ["## Two threads vs one", ""]
        lines += _header(sel[0]["env"], [v for r in sel for v in (r["load_before"], r["load_after"])], f"run {run}")
        lines += ["Each provider at 1 and 2 threads (`torch.set_num_threads`), interleaved in the same rounds. "
                  "Where another job keeps a core busy (the development machine: core 0 runs training), the "
                  "second thread only gets time slices and every parallel loop's barrier waits for it: such a "
                  "run measures that contention (FP32 suffers alike), not the kernels' scaling.", "",
                  "| shape | provider | 1 thread (ms) | 2 threads (ms) | speedup |", "|---|---|---:|---:|---:|"]
        for r in sel:
            for prov, (one, two) in r["threads_ms"].items():
                lines.append(f"| {r['shape']} | {prov} | {one:.3f} | {two:.3f} | {one / two:.2f}x |")
        lines.append("")
    with atomic_open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _threaded(fn, n: int):
    def run():
        torch.set_num_threads(n)
        return fn()
    return run


def scaling_rows(isa: str, env: dict, run: str, repeats: int) -> list:
    """1 vs 2 threads of every provider on the SCALING_* shapes."""
    cases = [c for shape, batch in SCALING_CONVS for c in conv_cases([shape], batch, isa)]
    cases += list(linear_cases(SCALING_LINEARS, isa))
    rows = []
    for label, macs, fns in cases:
        fns.pop("fp32 channels_last", None)
        timed = {f"{name}|{n}": _threaded(fn, n) for name, fn in fns.items() for n in (1, 2)}
        load_before = os.getloadavg()[0]
        times = time_group(timed, torch.device("cpu"), repeats, budget_s=1.0)
        torch.set_num_threads(1)
        threads_ms = {name: (times[f"{name}|1"]["ms"], times[f"{name}|2"]["ms"]) for name in fns}
        rows.append({"run": run, "kind": "scaling", "shape": label, "macs": macs, "threads_ms": threads_ms,
                     "load_before": load_before, "load_after": os.getloadavg()[0], "env": env})
        print(label, {k: f"{a:.3f}/{b:.3f} ms = {a / b:.2f}x" for k, (a, b) in threads_ms.items()}, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--isa", default=None, help=f"ISA build of the integer kernels (default: best; {cpu_deploy.ISAS})")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--batch", type=int, default=1, help="ResNet-18 / MobileNetV2 conv batch (default 1)")
    p.add_argument("--cifar-batches", default="1,16", help="CIFAR ResNet-20 batches (default 1,16)")
    p.add_argument("--repeats", type=int, default=30, help="rounds per shape at most")
    p.add_argument("--filter", default="", help="only the shapes whose label contains this text")
    p.add_argument("--quick", action="store_true", help="three shapes, few rounds (smoke test)")
    p.add_argument("--scaling", action="store_true", help="1 vs 2 threads on a few batch-16 shapes instead")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    isa = args.isa or cpu_deploy.default_isa()
    env = env_info(isa)
    run = env["date"]
    if args.scaling:
        rows = scaling_rows(isa, env, run, 3 if args.quick else args.repeats)
    else:
        cases = list(conv_cases(RESNET18 + MOBILENETV2, args.batch, isa))
        for b in (int(v) for v in args.cifar_batches.split(",") if v.strip()):
            cases += list(conv_cases(CIFAR_RESNET20, b, isa))
        cases += list(linear_cases(BERT, isa))
        if args.quick:
            cases = [cases[1], cases[len(RESNET18) + len(MOBILENETV2) - 1], cases[-3]]
        cases = [c for c in cases if args.filter in c[0]]
        rows = []
        for label, macs, fns in cases:
            load_before = os.getloadavg()[0]
            times = time_group(fns, torch.device("cpu"), 3 if args.quick else args.repeats,
                               budget_s=0.5 if args.quick else 2.0)
            row = {"run": run, "kind": "speed", "shape": label, "macs": macs, "ms": {k: v["ms"] for k, v in times.items()},
                   "median_ms": {k: v["median"] for k, v in times.items()}, "load_before": load_before,
                   "load_after": os.getloadavg()[0], "env": env}
            rows.append(row)
            t = row["ms"]
            best = min(t["fp32"], t.get("fp32 channels_last", t["fp32"]))
            pc = t.get("popcount 1-bit")
            print(f"{label:58s} int {t['int']:8.3f} ms ({best / t['int']:5.2f}x)  "
                  + (f"popcount {pc:8.3f} ms ({best / pc:5.2f}x)  " if pc else "") + f"fp32 {best:8.3f} ms", flush=True)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "int_ops.jsonl"
    atomic_append_text(jsonl, "".join(json.dumps(row) + "\n" for row in rows))  # one line per shape
    write_markdown(jsonl, out_dir / "int_ops.md")
    print(f"appended {len(rows)} rows to {jsonl}; wrote {out_dir / 'int_ops.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
