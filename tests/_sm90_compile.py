"""Compile every Triton kernel of gdnsq_kernels for sm_90 exactly as the host code would launch
it on a GPU, on a machine without one; write each PTX and a JSON index.

Usage: python tests/_sm90_compile.py OUT_DIR [--arch 90] [--fusion-control]

Run with TRITON_INTERPRET unset (the kernels must be real ``@triton.jit`` functions). The host
wrappers run on small CPU tensors under ``gdnsq_kernels._launch.record_launches()``, which
records (kernel, argument types, constexprs, options such as ``enable_fp_fusion``) instead of
launching; each record is then compiled with ``triton.compile`` for ``GPUTarget("cuda", arch,
32)``; an autotuned kernel is compiled once per config (``config`` in the index; config 0
is the default). ``--fusion-control`` also compiles the activation forward with fp fusion *on*, so the
tests can show that their ``fma`` check would see a contraction if there were one.
"""
import json
import pathlib
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gdnsq_kernels import _launch
from gdnsq_kernels.quantize import triton_quantize as TQ
from gdnsq_kernels.binary.bitpack import pack_bits
from gdnsq_kernels.binary.triton_xnor import packed_gemm_triton


def scenarios():
    """(label, callable) pairs; each callable runs host code whose launches get recorded."""
    p = lambda v, dt=torch.float32: torch.tensor(v, dtype=dt)  # noqa: E731
    out = []
    for dt, tag in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.float64, "f64")):
        x = torch.randn(4, 8, 5, 5).to(dt)
        w = torch.randn(16, 8, 3, 3).to(dt)
        out.append((f"act_fwd_{tag}", lambda x=x: TQ.activation_forward(x, p(-3.0), p(1.0), p(-1.0))))
        out.append((f"act_bwd_{tag}", lambda x=x: TQ.activation_backward(
            torch.ones_like(x), x, p(-3.0), p(1.0), p(-1.0), 5, True)))
        xcl = x.to(memory_format=torch.channels_last)
        out.append((f"act_bwd_cl_{tag}", lambda x=xcl: TQ.activation_backward(
            torch.ones_like(x), x, p(-3.0), p(1.0), p(-1.0), 5, True)))
        out.append((f"w_fwd_{tag}", lambda w=w: TQ.weight_forward(w, torch.full((16,), -4.0))))
        out.append((f"w_bwd_{tag}", lambda w=w: TQ.weight_backward(
            torch.ones_like(w), w, torch.full((16,), -4.0), torch.zeros(16, dtype=TQ._checks.compute_dtype(dt)), 5, True)))
        wcl = w.to(memory_format=torch.channels_last)
        out.append((f"w_fwd_cl_{tag}", lambda w=wcl: TQ.weight_forward(w, torch.full((16,), -4.0))))
        out.append((f"w_bwd_cl_{tag}", lambda w=wcl: TQ.weight_backward(
            torch.ones_like(w), w, torch.full((16,), -4.0), torch.zeros(16, dtype=TQ._checks.compute_dtype(dt)), 5, True)))
    for M in (1, 8, 256):
        a = pack_bits(torch.randint(0, 2, (M, 1000)))
        b = pack_bits(torch.randint(0, 2, (512, 1000)))
        for xnor in (True, False):
            out.append((f"gemm_M{M}_{'xnor' if xnor else 'and'}",
                        lambda a=a, b=b, xnor=xnor: packed_gemm_triton(a, b, 1000, xnor)))
    return out


def compile_record(rec, arch, options=None, constexprs=None):
    constexprs = rec.constexprs if constexprs is None else constexprs
    src = ASTSource(rec.kernel, rec.signature, constexprs=constexprs)
    opts = dict(rec.options if options is None else options)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def main():
    out_dir = pathlib.Path(sys.argv[1])
    arch = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
    out_dir.mkdir(parents=True, exist_ok=True)
    try:  # can this triton install compile for CUDA at all (NVIDIA backend, ptxas)?
        triton.compile(ASTSource(_probe_kernel, {"x_ptr": "*i32"}), target=GPUTarget("cuda", arch, 32))
    except Exception as exc:  # noqa: BLE001 - any failure here means "cannot compile for CUDA"
        print(json.dumps({"cannot_compile": f"{exc!r:.300}"}))
        sys.exit(3)
    index = []
    for label, fn in scenarios():
        with _launch.record_launches() as recs:
            fn()
        for i, rec in enumerate(recs):
            name = rec.kernel.fn.__name__
            variants = rec.configs or [(rec.constexprs, rec.options)]
            for ci, (constexprs, options) in enumerate(variants):
                kern = compile_record(rec, arch, options, constexprs)
                ptx = kern.asm["ptx"]
                fname = f"{label}.{i}.{name}.c{ci}.ptx"
                (out_dir / fname).write_text(ptx)
                index.append({"label": label, "kernel": name, "file": fname, "config": ci,
                              "n_configs": len(rec.configs), "options": options,
                              "constexprs": {k: str(v) for k, v in constexprs.items()},
                              "grid": list(rec.grid), "cubin_bytes": len(kern.asm.get("cubin", b""))})
    if "--fusion-control" in sys.argv:
        with _launch.record_launches() as recs:
            TQ.activation_forward(torch.randn(64), torch.tensor(-3.0), torch.tensor(1.0), torch.tensor(-1.0))
        rec = recs[0]
        opts = dict(rec.options, enable_fp_fusion=True)
        ptx = compile_record(rec, arch, opts).asm["ptx"]
        (out_dir / "control_act_fwd_fused.ptx").write_text(ptx)
        index.append({"label": "control_act_fwd_fused", "kernel": rec.kernel.fn.__name__,
                      "file": "control_act_fwd_fused.ptx", "options": opts})
    (out_dir / "index.json").write_text(json.dumps(index, indent=1))
    print(json.dumps({"kernels": len(index), "triton": triton.__version__, "arch": arch}))


if __name__ == "__main__":
    main()
