"""Plain-PyTorch oracle of the GDNSQ quantizers: the documented semantics every backend matches.

Activation quantizer (per-tensor parameters, GDNSQ's own parametrisation):

    s  = 2**log2_step          step (the "noise scale")
    Q  = 2**log2_range         range width including one step
    lo = offset,  hi = offset + Q - s
    v  = (clamp(x, lo, hi) - lo) / s
    y  = lo + s * round(v)                      round half to even
    bits = log2_range - log2_step

Weight quantizer (per-output-channel or per-tensor step, per-channel zero point, no clamp):

    z_c = min_i w[c, i]   (recomputed every call)
    y   = z_c + s_c * round((w - z_c) / s_c)

Backward (METHOD.md Part B §2.2; STE for the input, closed form for the parameters), with
``g`` the upstream gradient, ``e = round(v) - v`` at the clamped ``v`` and ``r`` the dither
(``gdnsq_kernels.quantize.dither``; ``r = 0`` when ``dither=False``):

* activation: ``dx = g`` where ``lo <= x <= hi`` else 0;
  ``d offset = sum g`` over ``x < lo`` or ``x > hi``;
  ``d log2_range = ln2 * Q * sum_{x > hi} g``;
  ``d log2_step = ln2 * s * sum g * (e - [x > hi] + s * r)`` (``e = 0`` below the clamp).
* weight: ``dw = g``; ``d log2_step_c = ln2 * s_c * sum_{i in c} g_i * (e_i + s_c * r_i)``
  (a one-element step gets the sum over all channels).

Arithmetic runs in float32 (float64 for float64 inputs, which the finite-difference tests
use); outputs have the input's dtype. NaN inputs: ``y`` is NaN there, ``dx`` is 0 there, they
add nothing to ``d offset``/``d log2_range`` but make ``d log2_step`` NaN (``e`` is NaN). A NaN
weight makes its channel's zero point, outputs and step gradient NaN.
"""
from __future__ import annotations

import math

import torch

from . import _checks
from .dither import dither as _dither

LN2 = math.log(2.0)


def _act_params(x, log2_step, log2_range, offset):
    ct = _checks.compute_dtype(x.dtype)
    s = torch.exp2(log2_step.detach().to(ct).reshape(()))
    q = torch.exp2(log2_range.detach().to(ct).reshape(()))
    lo = offset.detach().to(ct).reshape(())
    hi = lo + q - s
    return ct, s, q, lo, hi


def _seed_int(seed) -> int:
    """The seed as a Python int: a one-element int64/int32 tensor (``check_seed`` accepts one)
    is read on the host, an int is itself."""
    return int(seed.reshape(-1)[0].item()) if isinstance(seed, torch.Tensor) else seed


def activation_forward(x, log2_step, log2_range, offset):
    """Quantized activation ``y`` (x's shape and dtype). No autograd, no dither."""
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    ct, s, _, lo, hi = _act_params(x, log2_step, log2_range, offset)
    xc = torch.clamp(x.detach().to(ct), lo, hi)
    v = (xc - lo) / s
    return (lo + s * torch.round(v)).to(x.dtype)


def activation_codes(x, log2_step, log2_range, offset):
    """Integer codes ``j = round((clamp(x) - lo) / s)`` as int32 (x's shape); NaN -> undefined."""
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    ct, s, _, lo, hi = _act_params(x, log2_step, log2_range, offset)
    v = (torch.clamp(x.detach().to(ct), lo, hi) - lo) / s
    return torch.round(v).to(torch.int32)


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither,
                        *, need_grad_x=True, need_grad_params=True):
    """Closed-form backward. Returns (grad_x, grad_log2_step, grad_log2_range, grad_offset).

    grad_x has x's shape and dtype; the parameter gradients are 0-d in the compute dtype
    (float32, or float64 for float64 inputs). Entries not requested are None.
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    _checks.check_grad(grad_y, x, "grad_y")
    _checks.check_seed(seed)
    ct, s, q, lo, hi = _act_params(x, log2_step, log2_range, offset)
    xf = x.detach().to(ct)
    g = grad_y.detach().to(ct)
    below = xf < lo
    above = xf > hi
    inside = (xf >= lo) & (xf <= hi)
    grad_x = torch.where(inside, g, torch.zeros_like(g)).to(x.dtype) if need_grad_x else None
    if not need_grad_params:
        return grad_x, None, None, None
    v = (torch.clamp(xf, lo, hi) - lo) / s
    e = torch.round(v) - v
    t = e - above.to(ct)
    if dither:
        t = t + s * _dither(x.shape, _seed_int(seed), dtype=ct, device=x.device)
    zero = torch.zeros_like(g)
    grad_step = LN2 * s * (g * t).sum()
    grad_range = LN2 * q * torch.where(above, g, zero).sum()
    grad_offset = torch.where(below | above, g, zero).sum()
    return grad_x, grad_step, grad_range, grad_offset


def is_per_channel(log2_step, c_out: int) -> bool:
    """True for a (C_out,) step (a (1,) step with C_out == 1 counts as either; same result)."""
    return log2_step.dim() == 1 and log2_step.shape[0] == c_out


def _weight_params(w, log2_step):
    ct = _checks.compute_dtype(w.dtype)
    s = torch.exp2(log2_step.detach().to(ct).reshape(-1, 1))  # (C_out, 1) or (1, 1)
    return ct, s


def _zero_point(w2):
    """Per-row minimum of a (C, K) tensor, NaN-propagating; 0 for rows with no elements."""
    if w2.shape[1] == 0:
        return torch.zeros(w2.shape[0], dtype=w2.dtype, device=w2.device)
    return w2.amin(dim=1)


def weight_forward(w, log2_step):
    """Returns (w_hat with w's shape and dtype, zero_point (C_out,) float32). No autograd."""
    _checks.check_weight_args(w, log2_step)
    ct, s = _weight_params(w, log2_step)
    w2 = w.detach().to(ct).reshape(w.shape[0], _checks.row_len(w))
    z = _zero_point(w2)
    v = (w2 - z[:, None]) / s
    y = z[:, None] + s * torch.round(v)
    return y.reshape(w.shape).to(w.dtype), z


def weight_codes(w, log2_step):
    """Returns (int32 codes k with w's shape, zero_point (C_out,)): ``w_hat = z + s * k``."""
    _checks.check_weight_args(w, log2_step)
    ct, s = _weight_params(w, log2_step)
    w2 = w.detach().to(ct).reshape(w.shape[0], _checks.row_len(w))
    z = _zero_point(w2)
    k = torch.round((w2 - z[:, None]) / s)
    return k.reshape(w.shape).to(torch.int32), z


def weight_backward(grad_w_hat, w, log2_step, zero_point, seed, dither,
                    *, need_grad_w=True, need_grad_step=True):
    """Closed-form backward. Returns (grad_w, grad_log2_step shaped like log2_step)."""
    _checks.check_weight_args(w, log2_step)
    _checks.check_grad(grad_w_hat, w, "grad_w_hat")
    _checks.check_zero_point(zero_point, w)
    _checks.check_seed(seed)
    grad_w = grad_w_hat.to(w.dtype) if need_grad_w else None  # STE: exactly g
    if not need_grad_step:
        return grad_w, None
    ct, s = _weight_params(w, log2_step)
    c_out = w.shape[0]
    w2 = w.detach().to(ct).reshape(c_out, _checks.row_len(w))
    g = grad_w_hat.detach().to(ct).reshape(c_out, _checks.row_len(w))
    v = (w2 - zero_point.to(ct)[:, None]) / s
    t = torch.round(v) - v
    if dither:
        t = t + s * _dither(w.shape, _seed_int(seed), dtype=ct, device=w.device).reshape(c_out, _checks.row_len(w))
    per_channel = (g * t).sum(dim=1)  # (C_out,)
    if is_per_channel(log2_step, c_out):
        grad = LN2 * s.reshape(-1) * per_channel
    else:
        grad = LN2 * s.reshape(()) * per_channel.sum()
    return grad_w, grad.reshape(log2_step.shape)


def quantize_activation(x, log2_step, log2_range, offset, *, seed=None, dither=True):
    """``gdnsq_kernels.quantize_activation`` on the reference backend (autograd included)."""
    from . import quantize_activation as _qa

    return _qa(x, log2_step, log2_range, offset, seed=seed, dither=dither, backend="reference")


def quantize_weight(w, log2_step, *, seed=None, dither=True):
    """``gdnsq_kernels.quantize_weight`` on the reference backend (autograd included)."""
    from . import quantize_weight as _qw

    return _qw(w, log2_step, seed=seed, dither=dither, backend="reference")
