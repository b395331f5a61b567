"""The ``cpu`` backend's packed GEMM when the C++ popcount GEMM (``cpu_xnor``) cannot be built (or
``GDNSQ_NO_CPP_XNOR=1``): NumPy ``bitwise_count`` over uint64 views of the words for small M, an
unpack to float32 +-1 / 0-1 matrices and one sgemm for many rows against few columns
(:func:`use_float_gemm`). Both are exact (see :func:`gemm_cpu_float` for when float32 is)."""
from __future__ import annotations

import numpy as np
import torch

from .bitpack import masked_tail

__all__ = ["use_float_gemm", "FLOAT32_EXACT_K", "gemm_cpu_popcount", "gemm_cpu_float",
           "full_precision_float32_matmul"]


def use_float_gemm(M: int, N: int) -> bool:
    """Whether the CPU backend should unpack to float and use sgemm instead of NumPy popcount.

    Measured on a 2-core x86 CPU (benchmarks/bench_binary.py --crossover): NumPy popcount costs
    ~1 ns per uint64 word pair (more when rows are only a few words long); the float path pays
    ~1.3 ns per unpacked code of both operands, then ~11 ps per multiply-add. So popcount wins
    for batch-size inference against a wide weight (N=4096: every M up to 256 measured), the
    float path wins for conv-shaped GEMMs (many rows, N <= a few hundred output channels).
    """
    return (M >= 64 and N < 1024) or min(M, N) >= 1024


# Largest k for which float32 sums of +-1 / 0-1 products are exact.
FLOAT32_EXACT_K = 1 << 24


def _u64_view(x: torch.Tensor) -> np.ndarray:
    """(R, W) int32 tensor -> (R, ceil(W/2)) uint64 NumPy view (an extra zero word if W is odd)."""
    arr = np.ascontiguousarray(x.numpy())
    if arr.shape[1] % 2:
        arr = np.concatenate([arr, np.zeros((arr.shape[0], 1), np.int32)], axis=1)
    return arr.view(np.uint64)


if hasattr(np, "bitwise_count"):  # NumPy >= 2.0
    def _np_popcount_sum(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)
else:  # pragma: no cover - older NumPy
    _BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _np_popcount_sum(x: np.ndarray) -> np.ndarray:
        by = np.ascontiguousarray(x).view(np.uint8)
        return _BYTE_POPCOUNT[by].sum(axis=-1, dtype=np.int32)


def gemm_cpu_popcount(a, b, k, xnor):
    a64 = _u64_view(masked_tail(a, k))
    b64 = _u64_view(masked_tail(b, k))
    M, N, W64 = a64.shape[0], b64.shape[0], b64.shape[1]
    out = np.empty((M, N), dtype=np.int32)
    rows = max(1, (1 << 20) // max(1, N * W64))  # ~8 MB of uint64 per chunk (stays in cache)
    op = np.bitwise_xor if xnor else np.bitwise_and
    for i in range(0, M, rows):
        out[i:i + rows] = _np_popcount_sum(op(a64[i:i + rows, None, :], b64[None, :, :]))
    res = torch.from_numpy(out)
    return k - 2 * res if xnor else res


def full_precision_float32_matmul() -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    prec = getattr(mk, "fp32_precision", "none")
    return prec in ("none", "ieee")


def _unpack_cpu(x: torch.Tensor, k: int) -> np.ndarray:
    """(R, W) int32 CPU tensor -> (R, k) uint8 0/1 (NumPy unpackbits, LSB first)."""
    by = np.ascontiguousarray(x.numpy()).view(np.uint8)
    return np.unpackbits(by, axis=1, count=k, bitorder="little")


def gemm_cpu_float(a, b, k, xnor):
    dtype = torch.float32 if (k <= FLOAT32_EXACT_K and full_precision_float32_matmul()) else torch.float64
    A = torch.from_numpy(_unpack_cpu(a, k)).to(dtype)
    B = torch.from_numpy(_unpack_cpu(b, k)).to(dtype)
    if xnor:
        A = A.mul_(2).sub_(1)
        B = B.mul_(2).sub_(1)
    # Every partial sum is an integer of magnitude <= k, exactly representable: the product is exact.
    return (A @ B.T).to(torch.int32)
