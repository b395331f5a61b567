"""Exact integer sums in float arithmetic: the GEMMs of the deployed ``int`` path.

The ``int`` path computes ``S[o,p] = sum over the taps of k * j`` for non-negative integer codes
``k`` (weight) and ``j`` (activation) with a float conv or matmul. The result is exact when two
things hold:

* **magnitude**: every partial sum is an integer the float type holds exactly. The codes are
  non-negative, so every partial sum, in any summation order, lies between 0 and the total,
  which is at most ``taps * k_max * j_max`` (:func:`sum_bound`): float32 is exact below 2**24,
  float64 below 2**53. The layer checks this once, from its shape and bit-widths.
* **algorithm**: the library forms the plain sum of products of full-precision inputs (a direct
  or im2col + GEMM convolution, a GEMM). Winograd and FFT convolutions transform the inputs with
  fractional coefficients and round: NNPACK, which torch picks for float32 3x3 convolutions of
  a batch of 16 or more when oneDNN is off, errs by 0.02 on sums of a few thousand (W4A4,
  16 channels); cuDNN may choose such algorithms too. TF32 and bf16 modes for float32
  (``torch.set_float32_matmul_precision``, ``torch.backends.*.fp32_precision``,
  ``torch.backends.cudnn.allow_tf32``) round a code above 2**11 (2**8) before multiplying it.

Which algorithm runs depends on the input's shape and device and on global switches, so
:func:`conv2d_sums` / :func:`linear_sums` check it at every call (a few microseconds): a float32
convolution runs only on a backend that sums directly (oneDNN, which torch always asks for its
direct algorithm, or torch's own im2col + GEMM kernels) with float32 at full precision. Otherwise
the sums run in float64, as ``F.conv2d`` when torch picks a direct backend for float64 (on a
CPU always: neither oneDNN nor NNPACK handles float64) and as an explicit im2col + GEMM
otherwise (BLAS computes a GEMM as plain sums of products).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

FP32_EXACT_BELOW = 2**24  # float32 represents every integer up to 2**24
FP64_EXACT_BELOW = 2**53

# torch's convolution backends that form the plain sum of products: oneDNN (torch passes
# algorithm::convolution_direct), torch's im2col + GEMM kernels, CUDA's depthwise kernel, and
# the empty-input shortcuts. NnpackSpatial (Winograd / FFT), Cudnn and Miopen (which may choose
# Winograd or FFT) and the mobile backends are not in the set.
_DIRECT_CONV_BACKEND_NAMES = ("Mkldnn", "MkldnnEmpty", "Empty", "Slow2d", "SlowDilated2d", "CudaDepthwise2d")


def sum_bound(taps: int, weight_bits: int, act_bits: int) -> int:
    """Largest possible ``sum k*j`` of one output: ``taps * (2**weight_bits - 1) * (2**act_bits - 1)``."""
    return taps * (2**weight_bits - 1) * (2**act_bits - 1)


def conv_output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> tuple:
    """(H_out, W_out) of a 2-d convolution, as ``F.conv2d`` computes them."""
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))


def fp32_at_full_precision(device: torch.device, op: str) -> bool:
    """Whether float32 ``op`` (``"conv"`` or ``"matmul"``) on ``device`` multiplies full float32
    inputs, i.e. no TF32 or bf16 mode is set for it.

    torch >= 2.9 resolves a precision per (backend, op), falling back to the backend's ``"all"``
    and then to the generic setting; ``"none"`` everywhere means full precision. Older torch has
    only ``torch.get_float32_matmul_precision()`` and ``torch.backends.cudnn.allow_tf32``.
    """
    backend = {"cpu": "mkldnn", "cuda": "cuda"}.get(device.type)
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        if device.type == "cuda" and op == "conv":
            return not torch.backends.cudnn.allow_tf32
        return torch.get_float32_matmul_precision() == "highest"
    chain = ([(backend, op), (backend, "all")] if backend else []) + [("generic", "all")]
    for name, scope in chain:
        precision = getter(name, scope)
        if precision != "none":
            return precision == "ieee"
    return True


def conv_backend_sums_directly(j: torch.Tensor, k: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether ``F.conv2d(j, k, None, stride, padding, dilation, groups)`` would run on a backend
    that forms the plain sum of products (see ``_DIRECT_CONV_BACKEND_NAMES``)."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:  # cannot tell which algorithm torch would use: treat it as inexact
        return False
    backend = select(j, k, None, list(stride), list(padding), list(dilation), False, [0, 0], groups)
    return any(backend == getattr(torch._C._ConvBackend, name, None) for name in _DIRECT_CONV_BACKEND_NAMES)


def _im2col_conv2d(j: torch.Tensor, k: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``F.conv2d(j, k, None, ...)`` as im2col + one batched GEMM per group (plain sums).

    ``j`` (N, C, H, W), ``k`` (O, C/groups, kh, kw), same float dtype; returns (N, O, H_out, W_out).
    """
    n, _, h, w = j.shape
    out_ch, cin_per_group, kh, kw = k.shape
    ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
    cols = F.unfold(j, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, C*kh*kw, L)
    # unfold orders the rows channel-major, so each group's taps are one contiguous block
    cols = cols.view(n, groups, cin_per_group * kh * kw, ho * wo)
    sums = torch.matmul(k.reshape(groups, out_ch // groups, cin_per_group * kh * kw), cols)
    return sums.view(n, out_ch, ho, wo)


def conv2d_sums(j: torch.Tensor, k: torch.Tensor, stride, padding, dilation, groups: int,
                fp32_exact: bool) -> torch.Tensor:
    """``S = conv2d(j, k)`` (no bias, zero padding) of integer-valued ``j`` and ``k``, exactly.

    ``j`` (N, C, H, W) and ``k`` (O, C/groups, kh, kw): non-negative integer values in any float
    dtype. ``fp32_exact``: the caller's bound (:func:`sum_bound`) is below 2**24. Returns
    (N, O, H_out, W_out) float32 when float32 is exact for this call, else float64 (the caller
    guarantees the bound is below 2**53).
    """
    device = j.device
    if fp32_exact and fp32_at_full_precision(device, "matmul"):
        dtype = torch.float32
        algorithm_ok = fp32_at_full_precision(device, "conv")
    else:
        dtype, algorithm_ok = torch.float64, True
    j, k = j.to(dtype), k.to(dtype)
    if algorithm_ok and conv_backend_sums_directly(j, k, stride, padding, dilation, groups):
        return F.conv2d(j, k, None, stride, padding, dilation, groups)
    return _im2col_conv2d(j, k, stride, padding, dilation, groups)


def linear_sums(j: torch.Tensor, k: torch.Tensor, fp32_exact: bool) -> torch.Tensor:
    """``S = j @ k.T`` of integer-valued ``j`` (N, in) and ``k`` (out, in), exactly: a GEMM in
    float32 when ``fp32_exact`` (bound below 2**24) and float32 matmul is at full precision,
    else in float64. Returns (N, out)."""
    dtype = torch.float32 if fp32_exact and fp32_at_full_precision(j.device, "matmul") else torch.float64
    return j.to(dtype) @ k.to(dtype).t()

