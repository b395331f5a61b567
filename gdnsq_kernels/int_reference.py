"""Plain-PyTorch oracle of ``gdnsq_kernels.int_ops`` (exact integer conv / GEMM / popcount GEMM).

Written from the definitions, sharing no code with the kernels: the convolution is
``F.conv2d`` in float64 on the codes (every product and partial sum is an integer below 2^53,
so float64 is exact in any summation order), the GEMMs are int64 matmuls, the popcount GEMM
and conv unpack the bits (the conv is then ``F.conv2d`` in float64 of 0/1 values with zero
padding). Slow; for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _to_int32(sums: Tensor) -> Tensor:
    if sums.numel() and int(sums.abs().max()) >= 2**31:
        raise OverflowError("the exact sums do not fit int32")
    return sums.to(torch.int32)


def int_conv2d(x: Tensor, w: Tensor, stride=1, padding=0, dilation=1, groups: int = 1, pad_code: int = 0) -> Tensor:
    """``x`` uint8 NHWC ``(N, H, W, C_in)``, ``w`` int8 ``(C_out, kh, kw, C_in/groups)``; padded
    taps hold ``pad_code``. Returns int32 NHWC ``(N, Ho, Wo, C_out)``."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    x_nchw = x.permute(0, 3, 1, 2).to(torch.float64)
    x_nchw = F.pad(x_nchw, (pw, pw, ph, ph), value=float(pad_code))
    w_oihw = w.permute(0, 3, 1, 2).to(torch.float64)
    y = F.conv2d(x_nchw, w_oihw, stride=stride, dilation=dilation, groups=groups)
    return _to_int32(y.round().to(torch.int64)).permute(0, 2, 3, 1).contiguous()


def int_linear(x: Tensor, w: Tensor) -> Tensor:
    """``x`` uint8 ``(..., K)`` x ``w`` int8 ``(N, K)`` -> int32 ``(..., N)``, in int64."""
    return _to_int32(x.to(torch.int64) @ w.to(torch.int64).t())


def unpack_words(words: Tensor, k: int) -> Tensor:
    """int64 ``(R, W)`` words -> int64 0/1 ``(R, k)``: bit b of word i is element ``64 i + b``."""
    shifts = torch.arange(64, dtype=torch.int64)
    bits = (words.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: bit 63 still lands in bit 0
    return bits.reshape(words.shape[0], 64 * words.shape[1])[:, :k]


def popcount_linear(x_bits: Tensor, w_bits: Tensor, k: int, xnor: bool = False) -> Tensor:
    """``sum_b x_b w_b`` (or ``sum_b (2 x_b - 1)(2 w_b - 1)`` with ``xnor``) over the first ``k``
    bits of each row of ``x_bits`` ``(M, W)`` and ``w_bits`` ``(N, W)``. Returns int32 ``(M, N)``."""
    a, b = unpack_words(x_bits, k), unpack_words(w_bits, k)
    if xnor:
        a, b = 2 * a - 1, 2 * b - 1
    return _to_int32(a @ b.t())


def pack_channel_bits(codes: Tensor) -> Tensor:
    """uint8 ``(..., C)`` -> int64 ``(..., ceil(C/64))``: bit ``c % 64`` of word ``c // 64`` is
    ``codes[..., c] != 0``, bits past C are 0 (built one bit position at a time with OR)."""
    C = codes.shape[-1]
    nw = -(-C // 64)
    bits = torch.zeros(codes.shape[:-1] + (nw * 64,), dtype=torch.int64)
    bits[..., :C] = (codes != 0).to(torch.int64)
    bits = bits.reshape(codes.shape[:-1] + (nw, 64))
    words = torch.zeros(codes.shape[:-1] + (nw,), dtype=torch.int64)
    for b in range(64):
        words = words | (bits[..., b] << b)
    return words


def popcount_conv2d(x_bits: Tensor, w01: Tensor, stride=1, padding=0, dilation=1):
    """``x_bits`` int64 ``(N, H, W, ceil(C/64))`` (bits past C ignored), ``w01`` 0/1 ``(O, kh, kw,
    C)``; zero padding. Returns (int32 ``(N, Ho, Wo, O)`` sums of x AND w over the taps, int32
    ``(N, Ho, Wo)`` set input bits under each window)."""
    N, H, W, nw = x_bits.shape
    C = w01.shape[3]
    x = unpack_words(x_bits.reshape(-1, nw), C).reshape(N, H, W, C).permute(0, 3, 1, 2).to(torch.float64)
    w = (w01 != 0).to(torch.float64).permute(0, 3, 1, 2)
    y = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    s = F.conv2d(x, torch.ones_like(w[:1]), stride=stride, padding=padding, dilation=dilation)
    return (_to_int32(y.round().to(torch.int64)).permute(0, 2, 3, 1).contiguous(),
            _to_int32(s.round().to(torch.int64))[:, 0].contiguous())
