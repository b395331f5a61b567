"""Backend dispatch of the packed GEMM that every binary op runs (``backend`` already resolved).

:func:`packed_gemm` picks the implementation of one backend name: the plain-torch oracle, the
Triton kernel, the SWAR torch GEMM, or on ``cpu`` the C++ popcount GEMM, else NumPy popcount or
an exact float GEMM of the unpacked codes (see :mod:`gdnsq_kernels.binary.numpy_gemm`).
"""
from __future__ import annotations

import torch

from . import reference as _ref
from ..backend import resolve_backend
from ._torch_gemm import gemm_torch_swar
from .bitpack import masked_tail
from .numpy_gemm import gemm_cpu_float, gemm_cpu_popcount, use_float_gemm

__all__ = ["packed_gemm", "cpp_gemm_available"]


def packed_gemm(a, b, k, xnor, backend):
    """int32 (M, N) XNOR (``xnor=True``) or AND popcount GEMM of packed rows a (M, W), b (N, W)."""
    name = resolve_backend(a, backend)
    M, N = a.shape[0], b.shape[0]
    if k == 0 or M == 0 or N == 0:
        return torch.zeros((M, N), dtype=torch.int32, device=a.device)
    if name == "reference":
        return (_ref.xnor_gemm_reference if xnor else _ref.and_gemm_reference)(a, b, k)
    if name == "triton":
        from .triton_xnor import packed_gemm_triton

        return packed_gemm_triton(a, b, k, xnor)
    if name == "torch":
        return gemm_torch_swar(a, b, k, xnor)
    # cpu
    if cpp_gemm_available():
        from .cpu_xnor import packed_gemm_cpp

        return packed_gemm_cpp(masked_tail(a, k), masked_tail(b, k), k, xnor)
    if use_float_gemm(M, N):
        return gemm_cpu_float(a, b, k, xnor)
    return gemm_cpu_popcount(a, b, k, xnor)


def cpp_gemm_available() -> bool:
    """Whether the C++ popcount GEMM is built (tests patch this to run the fallbacks)."""
    from . import cpu_xnor

    return cpu_xnor.available()
