"""The ``torch`` backend: eager closed-form PyTorch, few passes, in-place where possible.

Used when the fused C++ CPU op cannot be built (no compiler / ninja) and available on CUDA as a
debugging aid. Same math and same dither as ``gdnsq_kernels.quantize.reference``; the forward is one
clamp plus five in-place passes, the backward recomputes everything from the input, so the
autograd Functions save only the input. Arguments are validated by ``gdnsq_kernels.quantize``.
"""
from __future__ import annotations

import torch

from . import _checks
from .._launch import is_channels_last, nhwc_view
from .dither import dither as _dither
from .reference import LN2, is_per_channel


def _act_params(x, log2_step, log2_range, offset):
    ct = _checks.compute_dtype(x.dtype)
    s = torch.exp2(log2_step.detach().to(ct).reshape(()))
    q = torch.exp2(log2_range.detach().to(ct).reshape(()))
    lo = offset.detach().to(ct).reshape(())
    return ct, s, q, lo, lo + q - s


def _flat_pair(a, b):
    """``a`` and ``b`` (same shape) flattened for a dot product: in memory order when both are
    channels_last (a view; ``reshape(-1)`` of a channels_last tensor would copy it)."""
    if is_channels_last(a) and a.stride() == b.stride():
        return nhwc_view(a).reshape(-1), nhwc_view(b).reshape(-1)
    return a.reshape(-1), b.reshape(-1)


def activation_forward(x, log2_step, log2_range, offset):
    ct, s, _, lo, hi = _act_params(x, log2_step, log2_range, offset)
    t = torch.clamp(x.to(ct), lo, hi)  # the only allocation (two for half inputs)
    t.sub_(lo).div_(s).round_().mul_(s).add_(lo)
    return t.to(x.dtype)


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither,
                        need_grad_x=True, need_grad_params=True):
    ct, s, q, lo, hi = _act_params(x, log2_step, log2_range, offset)
    xf = x.to(ct)
    g = grad_y.to(ct)
    grad_x = None
    if need_grad_x:
        inside = (xf >= lo) & (xf <= hi)  # NaN x -> False -> gradient 0, as in torch.clamp
        grad_x = torch.where(inside, g, 0.0).to(x.dtype)
    if not need_grad_params:
        return grad_x, None, None, None
    above = xf > hi
    out = (xf < lo).logical_or_(above)
    t = torch.clamp(xf, lo, hi).sub_(lo).div_(s)  # v
    e = torch.round(t).sub_(t)  # e = round(v) - v
    e.sub_(above.to(ct))
    if dither:
        e.add_(_dither(x.shape, seed, dtype=ct, device=x.device).mul_(s))
    grad_step = LN2 * s * torch.dot(*_flat_pair(g, e))
    grad_range = LN2 * q * torch.where(above, g, 0.0).sum()
    grad_offset = torch.where(out, g, 0.0).sum()
    return grad_x, grad_step, grad_range, grad_offset


def weight_forward(w, log2_step):
    ct = _checks.compute_dtype(w.dtype)
    c_out = w.shape[0]
    s = torch.exp2(log2_step.detach().to(ct).reshape(-1, 1))
    t = w.to(ct).reshape(c_out, _checks.row_len(w))
    if t.data_ptr() == w.data_ptr():
        t = t.clone()  # float32 input: .to() aliased it, and the passes below are in place
    if t.shape[1] == 0:
        z = torch.zeros(c_out, dtype=ct, device=w.device)
    else:
        z = t.amin(dim=1)
    zc = z[:, None]
    t.sub_(zc).div_(s).round_().mul_(s).add_(zc)
    return t.reshape(w.shape).to(w.dtype), z


def weight_backward(grad_w_hat, w, log2_step, zero_point, seed, dither,
                    need_grad_w=True, need_grad_step=True):
    grad_w = grad_w_hat if need_grad_w else None
    if not need_grad_step:
        return grad_w, None
    ct = _checks.compute_dtype(w.dtype)
    c_out = w.shape[0]
    s = torch.exp2(log2_step.detach().to(ct).reshape(-1, 1))
    v = w.to(ct).reshape(c_out, _checks.row_len(w)).sub(zero_point.to(ct)[:, None]).div_(s)
    e = torch.round(v).sub_(v)
    if dither:
        e.add_(_dither(w.shape, seed, dtype=ct, device=w.device).reshape(c_out, _checks.row_len(w)).mul_(s))
    per_channel = (grad_w_hat.to(ct).reshape(c_out, _checks.row_len(w)) * e).sum(dim=1)
    if is_per_channel(log2_step, c_out):
        grad = LN2 * s.reshape(-1) * per_channel
    else:
        grad = LN2 * s.reshape(()) * per_channel.sum()
    return grad_w, grad.reshape(log2_step.shape)
