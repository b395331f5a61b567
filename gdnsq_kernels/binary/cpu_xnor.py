"""C++ popcount GEMM and fused epilogues for the ``cpu`` backend (``csrc/xnor_cpu.cpp``).

Built with ``torch.utils.cpp_extension.load`` (ninja, -O3, OpenMP through ``at::parallel_for``)
into torch's extension cache; with AVX-512 VPOPCNTDQ (read from /proc/cpuinfo) the word loop
is compiled to vector popcounts, else to scalar ``popcnt``. When the build is impossible (no
compiler or ninja) ``available()`` is False and the caller uses the NumPy popcount instead.
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings

import torch

from .._build import cpu_flags as _cpu_flags

_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "xnor_cpu.cpp")
_lock = threading.Lock()
_ext = None
_failed = None



def load_extension():
    """Build (first call) or load the extension; raises on failure."""
    global _ext
    with _lock:
        if _ext is not None:
            return _ext
        from torch.utils.cpp_extension import load

        from .._build import clear_stale_build_lock, extension_build_dir

        flags = ["-O3", "-fopenmp"]
        name = "gdnsq_xnor_cpu"
        cpu = _cpu_flags()
        if {"avx512f", "avx512_vpopcntdq"} <= cpu:
            flags += ["-mavx512f", "-mavx512vpopcntdq", "-mpopcnt"]
            name += "_vpopcnt"
        elif "popcnt" in cpu:
            flags.append("-mpopcnt")
            name += "_popcnt"
        # Key the build folder by a hash of source and flags: torch's extension cache is shared
        # by every checkout on the machine, and one fixed name lets an old build be loaded.
        with open(_SOURCE, "rb") as f:
            digest = hashlib.sha1(f.read() + " ".join(flags).encode()).hexdigest()[:12]
        name = f"{name}_{digest}"
        clear_stale_build_lock(extension_build_dir(name))
        _ext = load(name=name, sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                    verbose=False)
        return _ext


def available() -> bool:
    """True when the extension is built or builds now; warns once and returns False otherwise."""
    global _failed
    if _ext is not None:
        return True
    if _failed is not None or os.environ.get("GDNSQ_NO_CPP_XNOR", "0") == "1":
        return False
    try:
        load_extension()
        return True
    except Exception as exc:  # compiler / ninja / build failure: degrade to NumPy, do not crash
        from .._build import require_cpp

        if require_cpp():  # tests and CI: a failed build must fail, not test NumPy twice
            raise
        msg = str(exc).strip().splitlines()
        _failed = f"{type(exc).__name__}: {msg[-1] if msg else ''}"
        warnings.warn(f"gdnsq_kernels: the C++ popcount GEMM could not be built ({_failed}); "
                      "using NumPy popcount instead", RuntimeWarning, stacklevel=3)
        return False


def packed_gemm_cpp(a: torch.Tensor, b: torch.Tensor, k: int, xnor: bool) -> torch.Tensor:
    """(M, W), (N, W) int32 words with bits past k cleared -> int32 (M, N)."""
    return _ext.packed_gemm(a.contiguous(), b.contiguous(), int(k), bool(xnor))


def conv_epilogue(kj: torch.Tensor, const: torch.Tensor, ss: torch.Tensor, msa: torch.Tensor) -> torch.Tensor:
    """int32 (N, L, O+1) GEMM, float64 (O, L) const, (O,) scales -> float32 (N, O, L), one pass."""
    return _ext.conv_epilogue(kj.contiguous(), const.contiguous(), ss.contiguous(), msa.contiguous())


def linear_epilogue(kj, jsum, ss, msa, const) -> torch.Tensor:
    """int32 (M, O) GEMM, int32 (M,) sum(j), float64 (O,) ss/msa/const -> float32 (M, O)."""
    return _ext.linear_epilogue(kj.contiguous(), jsum.contiguous(), ss, msa, const)
