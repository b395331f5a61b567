"""The authors' eager composition of the GDNSQ quantizer, with autograd through every op.

This is how the authors' code builds the quantizer (METHOD.md Part B §1.1, §2.1): clamp,
shift, divide, a rounding autograd Function ``N`` whose forward is ``round(v) - v`` (STE:
no gradient to ``v``; gradient ``G * r`` to the step), add, multiply, shift back. Autograd of
this graph *is* the GDNSQ gradient, so it serves two purposes:

* an independent oracle in the tests for the closed-form backward of ``reference.py``
  (pass the dither ``r`` explicitly so both use the same values);
* the baseline in ``benchmarks/bench_quantize.py`` (``r=None``: the backward draws a fresh
  Bernoulli +-1/(2*sqrt(3)) tensor with ``torch.randint``, as the authors do).
"""
from __future__ import annotations

import torch

from ._checks import row_len
from .dither import DITHER_MAGNITUDE


class RoundNoise(torch.autograd.Function):
    """``n = round(v) - v``; backward: 0 to ``v`` (STE), ``sum G*r`` to the step ``s``."""

    @staticmethod
    def forward(ctx, v, s, r):
        ctx.s_shape = s.shape
        ctx.save_for_backward(r if r is not None else torch.empty(0))
        ctx.has_r = r is not None
        return torch.round(v) - v

    @staticmethod
    def backward(ctx, grad_n):
        (r,) = ctx.saved_tensors
        if not ctx.has_r:
            bits = torch.randint(0, 2, grad_n.shape, device=grad_n.device, dtype=torch.int8)
            r = (bits.to(grad_n.dtype) * 2 - 1) * DITHER_MAGNITUDE
        gs = grad_n * r
        # reduce to the step's (broadcast) shape
        dims = [i for i, n in enumerate(ctx.s_shape) if n == 1 and gs.shape[i] != 1]
        if len(ctx.s_shape) == 0:
            gs = gs.sum()
        elif dims:
            gs = gs.sum(dim=dims, keepdim=True)
        return None, gs, None


def composite_activation(x, log2_step, log2_range, offset, r=None):
    """Authors' activation quantizer graph. r: dither tensor of x's shape, 0, or None (random)."""
    s = torch.exp2(log2_step)
    q = torch.exp2(log2_range)
    lo = offset
    hi = lo + q - s
    xc = torch.clamp(x, lo, hi)
    v = (xc - lo) / s
    n = RoundNoise.apply(v, s, r)
    return (v + n) * s + lo


def composite_weight(w, log2_step, r=None):
    """Authors' weight quantizer graph: z = per-channel min (with autograd), no clamp."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    z = w.reshape(w.shape[0], row_len(w)).amin(dim=1).reshape(shape)
    s = torch.exp2(log2_step.reshape(shape))
    v = (w - z) / s
    n = RoundNoise.apply(v, s, r)
    return (v + n) * s + z
