"""The ``torch`` backend of the packed GEMM: a SWAR popcount of the XOR / AND words with plain
torch ops, chunked (CPU or CUDA, no compiler). Its own implementation, not an alias of
``reference`` or ``cpu``: the fallback for a CUDA machine without a working Triton."""
from __future__ import annotations

import torch

from .bitpack import masked_tail

__all__ = ["gemm_torch_swar"]


def _swar_popcount_torch(x: torch.Tensor) -> torch.Tensor:
    """Elementwise popcount of int32 words with torch ops (masks after each arithmetic shift)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


def gemm_torch_swar(a, b, k, xnor):
    a = masked_tail(a.contiguous(), k)
    b = masked_tail(b.contiguous(), k)
    M, W = a.shape
    N = b.shape[0]
    out = torch.zeros((M, N), dtype=torch.int32, device=a.device)
    rows = max(1, (1 << 22) // max(1, N * W))  # ~16 MB of int32 per chunk
    for i in range(0, M, rows):
        ai = a[i:i + rows, None, :]
        x = (ai ^ b[None]) if xnor else (ai & b[None])
        out[i:i + rows] = _swar_popcount_torch(x).sum(dim=-1, dtype=torch.int32)
    return k - 2 * out if xnor else out
