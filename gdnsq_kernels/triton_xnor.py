"""Triton packed-bit GEMM: ``C = k - 2*popcount(A XOR B)`` (XNOR form) or ``popcount(A AND B)``.

One program computes a (BLOCK_M, BLOCK_N) tile of C and loops over the packed words BLOCK_W at a
time; each step forms the (BLOCK_M, BLOCK_N, BLOCK_W) tile of XOR/AND words, popcounts it and
sums over the words. The last word is masked to its ``k % 32`` valid bits, so bits past ``k``
never count even if the caller's padding is not zero.

Popcount: compiled for an NVIDIA GPU the kernel uses the hardware ``popc.b32`` instruction
through inline PTX; under ``TRITON_INTERPRET=1`` (and on non-NVIDIA targets) it uses an integer
SWAR bit trick, since the interpreter has no popcount intrinsic.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from .backend import triton_interpreter_enabled
from .bitpack import tail_mask


@triton.jit
def _popcount32(x, HW_POPC: tl.constexpr):
    """Per-element popcount of int32 bit patterns (result 0..32, int32)."""
    if HW_POPC:
        return tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        # SWAR: 2-bit, 4-bit, 8-bit partial counts. Each arithmetic right shift is masked, so
        # the sign bit of int32 never leaks in; the wrapped subtraction is exact mod 2**32.
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F  # non-negative from here on
        x = x + (x >> 8)
        x = x + (x >> 16)
        return x & 0x3F


@triton.jit
def _packed_gemm_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, W, k, TAIL,
    stride_am, stride_bn, stride_cm,
    XNOR: tl.constexpr,
    HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for w0 in range(0, W, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        mask_w = rw < W
        a = tl.load(
            a_ptr + rm[:, None].to(tl.int64) * stride_am + rw[None, :],
            mask=mask_m[:, None] & mask_w[None, :], other=0,
        )
        b = tl.load(
            b_ptr + rn[:, None].to(tl.int64) * stride_bn + rw[None, :],
            mask=mask_n[:, None] & mask_w[None, :], other=0,
        )
        # Only the last word has bits past k; masking both operands makes XOR and AND ignore them.
        wmask = tl.where(rw == W - 1, TAIL, -1)
        a = a & wmask[None, :]
        b = b & wmask[None, :]
        if XNOR:
            x = a[:, None, :] ^ b[None, :, :]
        else:
            x = a[:, None, :] & b[None, :, :]
        acc += tl.sum(_popcount32(x, HW_POPC), axis=2).to(tl.int32)
    if XNOR:
        out = k - 2 * acc
    else:
        out = acc
    tl.store(
        c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :],
        out,
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _blocks(M: int, N: int, W: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_W, num_warps) picked from the problem size.

    Small M (batch-1 inference) is memory-bound on the packed weight: a thin M tile and a wide
    N x W tile stream the weight once. Large M reuses each loaded tile across a square M x N
    tile. The 3-D word tile stays at <= 64 int32 values per thread to bound register use.
    Under the interpreter each program is a Python loop step, so tiles are simply large.
    """
    if interpret:
        bm = min(triton.next_power_of_2(max(M, 1)), 32)
        bn = min(triton.next_power_of_2(max(N, 1)), 32)
        bw = min(triton.next_power_of_2(max(W, 1)), 32)
        return bm, bn, bw, 4
    if M <= 4:
        # A narrow N tile keeps enough programs in flight to saturate memory bandwidth.
        bm = triton.next_power_of_2(max(M, 1))
        return bm, 32, 32 // bm, 4
    if M <= 32:
        return 16, 64, 4, 4
    return 64, 64, 4, 8


_HW_POPC_BROKEN = False


def _hw_popcount_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and not triton_interpreter_enabled()
        and torch.version.hip is None
        and not _HW_POPC_BROKEN
    )


def packed_gemm_triton(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, xnor: bool,
                       blocks=None) -> torch.Tensor:
    """Launch the packed GEMM. Inputs are validated int32 (M, W), (N, W); returns int32 (M, N).

    ``blocks=(BLOCK_M, BLOCK_N, BLOCK_W)`` overrides the size-based choice (tests use it to force
    several tiles and word-loop steps on small shapes).
    """
    global _HW_POPC_BROKEN
    a = a_packed.contiguous()
    b = b_packed.contiguous()
    M, W = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    if M == 0 or N == 0:
        return c
    interpret = not a.is_cuda
    bm, bn, bw, warps = _blocks(M, N, W, interpret)
    if blocks is not None:
        bm, bn, bw = blocks
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    # W == 0 (k == 0): the word loop is empty and the kernel stores k - 0 = 0.
    args = (a, b, c, M, N, W, int(k), tail_mask(int(k)), a.stride(0), b.stride(0), c.stride(0))
    hw = _hw_popcount_available(a.device)
    try:
        _packed_gemm_kernel[grid](*args, XNOR=bool(xnor), HW_POPC=hw,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, num_warps=warps)
    except Exception as exc:  # pragma: no cover - depends on the GPU toolchain
        if not hw:
            raise
        # Inline PTX is the one toolchain-specific piece; fall back to the portable bit trick
        # rather than failing inference.
        _HW_POPC_BROKEN = True
        warnings.warn(f"hardware popcount failed to compile ({exc!r:.200}); using the SWAR popcount")
        _packed_gemm_kernel[grid](*args, XNOR=bool(xnor), HW_POPC=False,
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, num_warps=warps)
    return c
