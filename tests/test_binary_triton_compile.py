"""The packed GEMM kernel compiles for an NVIDIA GPU (sm_90) even on a machine without one.

The interpreter tests check the kernel's arithmetic; this checks the code path only a GPU
would take (inline-PTX popcount, the block sizes picked for small and large M) through
Triton's real compiler down to a cubin. It runs in a subprocess because the kernel must be
defined with TRITON_INTERPRET unset.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gdnsq_kernels.triton_xnor import _blocks, _packed_gemm_kernel

sig = {name: "*i32" for name in ("a_ptr", "b_ptr", "c_ptr")}
sig.update({name: "i32" for name in ("M", "N", "W", "k", "TAIL", "stride_am", "stride_bn", "stride_cm")})
sig.update({name: "constexpr" for name in ("XNOR", "HW_POPC", "BLOCK_M", "BLOCK_N", "BLOCK_W")})
out = []
for M, xnor in ((1, True), (8, False), (256, True)):
    bm, bn, bw, warps = _blocks(M, 4096, 128, interpret=False)
    cst = {"XNOR": xnor, "HW_POPC": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_W": bw}
    kern = triton.compile(ASTSource(_packed_gemm_kernel, sig, constexprs=cst),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    out.append({"M": M, "blocks": [bm, bn, bw, warps], "popc": kern.asm["ptx"].count("popc.b32"),
                "cubin": len(kern.asm.get("cubin", b""))})
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["M"] for r in res] == [1, 8, 256]
    for r in res:
        assert r["popc"] > 0, r  # the hardware popcount made it into the PTX
        assert r["cubin"] > 0, r  # ptxas accepted it
    assert res[0]["blocks"][0] == 1 and res[2]["blocks"][0] == 64
