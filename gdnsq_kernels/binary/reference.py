"""Plain-PyTorch oracle of the packed-bit ops (exact, slow; the semantics every backend must match).

The GEMMs unpack the words (so bits past ``k`` never count) and multiply in float64, which is
exact for integer sums below 2**53. The binary conv/linear dequantize the codes and run the
float64 ``F.conv2d`` / ``F.linear``, then round once to float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bitpack import unpack_bits


def _as_f64(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def xnor_gemm_reference(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int) -> torch.Tensor:
    """(M, W), (N, W) int32 words of K = k bits -> int32 (M, N): ``sum_i (2a-1)(2b-1)``."""
    a = unpack_bits(a_packed, k, dim=1).to(torch.float64) * 2 - 1
    b = unpack_bits(b_packed, k, dim=1).to(torch.float64) * 2 - 1
    return torch.round(a @ b.T).to(torch.int32)


def and_gemm_reference(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int) -> torch.Tensor:
    """(M, W), (N, W) int32 words of K = k bits -> int32 (M, N): ``sum_i a*b``."""
    a = unpack_bits(a_packed, k, dim=1).to(torch.float64)
    b = unpack_bits(b_packed, k, dim=1).to(torch.float64)
    return torch.round(a @ b.T).to(torch.int32)


def dequantize_weight(weight_codes, weight_step, weight_min) -> torch.Tensor:
    """``w = m_c + s_c*k`` in float64; codes (O, ...) with per-output-channel step/min (O,)."""
    dev = weight_codes.device
    k = weight_codes.to(torch.float64)
    shape = (-1,) + (1,) * (k.dim() - 1)
    s = _as_f64(weight_step, dev).reshape(-1).reshape(shape)
    m = _as_f64(weight_min, dev).reshape(-1).reshape(shape)
    return m + s * k


def dequantize_activation(act_codes, act_step, act_offset) -> torch.Tensor:
    """``a = beta + s_a*j`` in float64 (per-tensor step and offset)."""
    dev = act_codes.device
    return _as_f64(act_offset, dev) + _as_f64(act_step, dev) * act_codes.to(torch.float64)


def binary_conv2d_reference(
    act_codes, act_step, act_offset, weight_codes, weight_step, weight_min,
    bias=None, stride=1, padding=0, dilation=1,
) -> torch.Tensor:
    """float32 ``F.conv2d(dequant(a), dequant(w), bias, ...)`` computed in float64.

    Zero padding pads the dequantized activation with the value 0 (not with code 0).
    """
    a = dequantize_activation(act_codes, act_step, act_offset)
    w = dequantize_weight(weight_codes, weight_step, weight_min)
    b = None if bias is None else _as_f64(bias, a.device)
    return F.conv2d(a, w, b, stride=stride, padding=padding, dilation=dilation).to(torch.float32)


def binary_linear_reference(
    act_codes, act_step, act_offset, weight_codes, weight_step, weight_min, bias=None,
) -> torch.Tensor:
    """float32 ``F.linear(dequant(a), dequant(w), bias)`` computed in float64."""
    a = dequantize_activation(act_codes, act_step, act_offset)
    w = dequantize_weight(weight_codes, weight_step, weight_min)
    b = None if bias is None else _as_f64(bias, a.device)
    return F.linear(a, w, b).to(torch.float32)
