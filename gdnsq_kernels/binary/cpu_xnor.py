"""C++ popcount GEMM and fused epilogues for the ``cpu`` backend (``csrc/xnor_cpu.cpp``).

Built with ``torch.utils.cpp_extension.load`` (ninja, -O3, OpenMP through ``at::parallel_for``)
into torch's extension cache; with AVX-512 VPOPCNTDQ (read from /proc/cpuinfo) the word loop
is compiled to vector popcounts, else to scalar ``popcnt``. When the build fails (no compiler
or ninja, say) ``available()`` warns with the cause and is False, and the caller uses the NumPy
popcount instead (a transient failure is retried a minute later: ``gdnsq_kernels._build``).
"""
from __future__ import annotations

import os

import torch

from .._build import BuildSpec, Extension, build_spec
from .._build import cpu_flags as _cpu_flags

_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "xnor_cpu.cpp")


def _build_spec() -> BuildSpec:
    flags = ["-O3", "-fopenmp"]
    prefix = "gdnsq_xnor_cpu"
    cpu = _cpu_flags()
    if {"avx512f", "avx512_vpopcntdq"} <= cpu:
        flags += ["-mavx512f", "-mavx512vpopcntdq", "-mpopcnt"]
        prefix += "_vpopcnt"
    elif "popcnt" in cpu:
        flags.append("-mpopcnt")
        prefix += "_popcnt"
    return build_spec(prefix, _SOURCE, flags)


#: The extension of this backend; ``EXTENSION.module`` is the loaded module (None before).
EXTENSION = Extension("the C++ popcount GEMM", "NumPy popcount (or a float sgemm where faster)", _build_spec)


def disabled_by_environment() -> bool:
    """``GDNSQ_NO_CPP_XNOR=1``: the cpu backend skips this extension (benchmarks, tests)."""
    return os.environ.get("GDNSQ_NO_CPP_XNOR", "0") == "1"


def load_extension():
    """Build (first call) or load the extension; raises on failure."""
    return EXTENSION.load()


def available() -> bool:
    """True when the extension is loaded or builds now; False under ``GDNSQ_NO_CPP_XNOR=1`` or
    when the build fails (with a warning naming the cause; see ``gdnsq_kernels._build`` for
    when it is retried)."""
    return not disabled_by_environment() and EXTENSION.available()


def packed_gemm_cpp(a: torch.Tensor, b: torch.Tensor, k: int, xnor: bool) -> torch.Tensor:
    """(M, W), (N, W) int32 words with bits past k cleared -> int32 (M, N)."""
    return EXTENSION.module.packed_gemm(a.contiguous(), b.contiguous(), int(k), bool(xnor))


def conv_epilogue(kj: torch.Tensor, const: torch.Tensor, ss: torch.Tensor, msa: torch.Tensor) -> torch.Tensor:
    """int32 (N, L, O+1) GEMM, float64 (O, L) const, (O,) scales -> float32 (N, O, L), one pass."""
    return EXTENSION.module.conv_epilogue(kj.contiguous(), const.contiguous(), ss.contiguous(), msa.contiguous())


def linear_epilogue(kj, jsum, ss, msa, const) -> torch.Tensor:
    """int32 (M, O) GEMM, int32 (M,) sum(j), float64 (O,) ss/msa/const -> float32 (M, O)."""
    return EXTENSION.module.linear_epilogue(kj.contiguous(), jsum.contiguous(), ss, msa, const)
