"""``xnor_gemm`` / ``and_gemm``: popcount GEMMs of packed 0/1 rows, and the ``gdnsq::packed_gemm`` op.

    gdnsq::packed_gemm(Tensor a, Tensor b, int k, bool xnor, str backend) -> Tensor   int32 (M, N)
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from ..backend import resolve_backend
from .bitpack import MAX_GEMM_K, check_k, check_packed

__all__ = ["xnor_gemm", "and_gemm"]


def _check_gemm_inputs(a_packed, b_packed, k):
    check_packed(a_packed, "a_packed")
    check_packed(b_packed, "b_packed")
    if a_packed.dim() != 2:
        raise ValueError(f"a_packed must be 2-D (M, W), got shape {tuple(a_packed.shape)}")
    if b_packed.dim() != 2:
        raise ValueError(f"b_packed must be 2-D (N, W), got shape {tuple(b_packed.shape)}")
    if a_packed.shape[1] != b_packed.shape[1]:
        raise ValueError(
            f"b_packed has {b_packed.shape[1]} words per row but a_packed has {a_packed.shape[1]}; "
            f"both must be packed from K = k columns"
        )
    if a_packed.device != b_packed.device:
        raise ValueError(f"b_packed is on {b_packed.device} but a_packed is on {a_packed.device}")
    check_k(k, a_packed.shape[1], "k", "a_packed/b_packed")
    if k > MAX_GEMM_K:
        raise ValueError(f"k={k} exceeds {MAX_GEMM_K}, the int32 range of the GEMM result")


def xnor_gemm(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """XNOR-popcount GEMM of +-1 codes.

    Args:
        a_packed: int32 (M, W), ``pack_bits`` of an (M, k) 0/1 matrix along dim 1.
        b_packed: int32 (N, W), ``pack_bits`` of an (N, k) 0/1 matrix along dim 1.
        k: number of valid bits per row; ``W == ceil(k/32)``. Bits past k are ignored.
        backend: see :mod:`gdnsq_kernels.binary`.

    Returns:
        int32 (M, N): ``C[m, n] = sum_{i<k} (2a[m,i]-1)(2b[n,i]-1) = k - 2*popcount(a_m XOR b_n)``.
    """
    _check_gemm_inputs(a_packed, b_packed, k)
    return torch.ops.gdnsq.packed_gemm(a_packed, b_packed, int(k), True, resolve_backend(a_packed, backend))


def and_gemm(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """AND-popcount GEMM of 0/1 codes: int32 (M, N) ``C[m, n] = sum_{i<k} a[m,i]*b[n,i]``.

    Same arguments as :func:`xnor_gemm`.
    """
    _check_gemm_inputs(a_packed, b_packed, k)
    return torch.ops.gdnsq.packed_gemm(a_packed, b_packed, int(k), False, resolve_backend(a_packed, backend))


@torch.library.custom_op("gdnsq::packed_gemm", mutates_args=())
def _packed_gemm_op(a: torch.Tensor, b: torch.Tensor, k: int, xnor: bool, backend: str) -> torch.Tensor:
    out = _dispatch.packed_gemm(a, b, k, xnor, backend)
    return out.contiguous()


@_packed_gemm_op.register_fake
def _(a, b, k, xnor, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)
