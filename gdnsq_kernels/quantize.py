"""Public GDNSQ quantizer ops, their dispatch, and the autograd Functions.

``quantize_activation`` and ``quantize_weight`` are the two ops every GDNSQ layer calls. The
math (forward, closed-form backward, NaN behaviour) is documented in
``gdnsq_kernels.reference``, which is also the oracle every backend is tested against.

Backends (``backend=`` argument or ``GDNSQ_BACKEND``; see ``gdnsq_kernels.backend``):
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (fused C++ op built on first
use; falls back to ``torch`` with one warning if it cannot be built), ``torch`` (eager closed
form), ``reference``.

The low-level functions (``activation_forward`` ... ``weight_backward``) carry no autograd, so a
fused layer can save only its float input and recompute the quantized tensor in its backward.
The autograd Functions here do exactly that: they save the input, the O(1)/O(C_out) parameters
and zero point, and the integer seed of the dither, never a noise tensor or a mask.
"""
from __future__ import annotations

import torch

from . import _checks
from .backend import resolve_backend
from .dither import new_seed

__all__ = [
    "quantize_activation",
    "quantize_weight",
    "activation_forward",
    "activation_backward",
    "weight_forward",
    "weight_backward",
    "new_seed",
]


def _impl(name: str):
    """The module implementing backend ``name`` (cpu may degrade to torch, warning once)."""
    if name == "reference":
        from . import reference

        return reference
    if name == "torch":
        from . import _torch_quantize

        return _torch_quantize
    if name == "triton":
        from . import triton_quantize

        return triton_quantize
    if name == "cpu":
        from . import cpu_quantize

        return cpu_quantize.implementation()
    raise ValueError(f"backend must be one of triton, reference, cpu, torch, got {name!r}")


def _zero_scalar(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=_checks.compute_dtype(x.dtype), device=x.device)


# ----------------------------------------------------------------------------- activation


def activation_forward(x, log2_step, log2_range, offset, *, backend=None):
    """Quantized activation, no autograd, no dither.

    x: any shape, float16/bfloat16/float32/float64; log2_step, log2_range, offset: 0-d or (1,)
    float tensors on x's device (log2 units for the first two, x's units for offset).
    Returns y with x's shape and dtype (math in float32; float64 for float64 x).
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    name = resolve_backend(x, backend)
    if x.numel() == 0 and name in ("triton", "cpu"):
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return _impl(name).activation_forward(x, log2_step, log2_range, offset)


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither, *, backend=None,
                        need_grad_x=True, need_grad_params=True):
    """Closed-form GDNSQ backward of the activation quantizer (STE input, exact param grads).

    grad_y: upstream gradient, x's shape; seed: int (the dither is regenerated from it);
    dither: bool (False: r = 0). Returns (grad_x with x's shape and dtype, grad_log2_step,
    grad_log2_range, grad_offset as 0-d float32 tensors; float64 for float64 x). Entries
    switched off by ``need_grad_x`` / ``need_grad_params`` are None (their work is skipped).
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    _checks.check_grad(grad_y, x, "grad_y")
    _checks.check_seed(seed)
    name = resolve_backend(x, backend)
    if x.numel() == 0 and name in ("triton", "cpu"):
        gx = torch.zeros_like(x) if need_grad_x else None
        if not need_grad_params:
            return gx, None, None, None
        return gx, _zero_scalar(x), _zero_scalar(x), _zero_scalar(x)
    return _impl(name).activation_backward(
        grad_y, x, log2_step, log2_range, offset, seed, bool(dither),
        need_grad_x=need_grad_x, need_grad_params=need_grad_params,
    )


class _QuantizeActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, log2_step, log2_range, offset, seed, dither, backend):
        y = activation_forward(x, log2_step, log2_range, offset, backend=backend)
        # Only the input and the three scalars are kept; the dither comes back from the seed.
        ctx.save_for_backward(x, log2_step, log2_range, offset)
        ctx.seed, ctx.dither, ctx.backend = seed, dither, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, log2_step, log2_range, offset = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_params = need[1] or need[2] or need[3]
        if not (need[0] or need_params):
            return (None,) * 7
        gx, gs, gr, go = activation_backward(
            grad_y, x, log2_step, log2_range, offset, ctx.seed, ctx.dither,  # backends pick the layout
            backend=ctx.backend, need_grad_x=need[0], need_grad_params=need_params,
        )

        def like(grad, p, needed):
            return grad.to(p.dtype).reshape(p.shape) if needed else None

        return (gx if need[0] else None, like(gs, log2_step, need[1]), like(gr, log2_range, need[2]),
                like(go, offset, need[3]), None, None, None)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def quantize_activation(x, log2_step, log2_range, offset, *, seed=None, dither=True, backend=None):
    """GDNSQ activation fake-quantizer with exact GDNSQ gradients.

    With ``s = 2**log2_step``, ``Q = 2**log2_range``, ``lo = offset``, ``hi = offset + Q - s``:
    ``y = lo + s * round((clamp(x, lo, hi) - lo) / s)`` (round half to even); bit-width is
    ``log2_range - log2_step``.

    Args:
        x: input of any shape; float16, bfloat16, float32 (math in float32) or float64.
        log2_step, log2_range, offset: 0-d or shape (1,) float tensors on x's device.
        seed: int seeding the backward's dither; None draws one from torch's default generator
            (only when a gradient will be needed), so ``torch.manual_seed`` repeats a run.
        dither: False sets the dither ``r`` to 0 (deterministic step gradient).
        backend: None (use ``GDNSQ_BACKEND``), "auto", "triton", "cpu", "torch" or "reference".

    Returns y with x's shape and dtype. Gradients (``g`` upstream, ``e = round(v) - v``,
    ``r = +-1/(2*sqrt(3))``): ``dx = g`` on ``lo <= x <= hi``; ``d offset = sum g`` outside;
    ``d log2_range = ln2*Q*sum_{x>hi} g``; ``d log2_step = ln2*s*sum g*(e - [x>hi] + s*r)``.
    ±inf are clamped; NaN stays NaN in y, gets dx = 0, adds nothing to the offset and range
    gradients and makes the log2_step gradient NaN.

    Example::

        >>> x = torch.randn(8, 3, requires_grad=True)
        >>> a, g, b = (torch.tensor(v, requires_grad=True) for v in (-3.0, 1.0, -1.0))
        >>> y = quantize_activation(x, a, g, b, seed=0)   # 4-bit grid on [-1, 0.875]
        >>> y.sum().backward()
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    if seed is None:
        seed = new_seed() if (dither and _needs_grad(x, log2_step, log2_range, offset)) else 0
    _checks.check_seed(seed)
    return _QuantizeActivation.apply(x, log2_step, log2_range, offset, seed, bool(dither), backend)


# ----------------------------------------------------------------------------- weight


def weight_forward(w, log2_step, *, backend=None):
    """Quantized weight, no autograd, no dither.

    w: (C_out, ...) float tensor; log2_step: (C_out,) or one element (log2 units).
    Returns (w_hat with w's shape and dtype, zero_point (C_out,) float32 (float64 for float64 w))
    where zero_point is the per-channel minimum of w.
    """
    _checks.check_weight_args(w, log2_step)
    name = resolve_backend(w, backend)
    if w.numel() == 0 and name in ("triton", "cpu"):
        ct = _checks.compute_dtype(w.dtype)
        return (torch.empty_like(w, memory_format=torch.contiguous_format),
                torch.zeros(w.shape[0], dtype=ct, device=w.device))
    return _impl(name).weight_forward(w, log2_step)


def weight_backward(grad_w_hat, w, log2_step, zero_point, seed, dither, *, backend=None,
                    need_grad_w=True, need_grad_step=True):
    """Closed-form GDNSQ backward of the weight quantizer.

    Returns (grad_w = grad_w_hat (STE, no copy), grad_log2_step shaped like log2_step, in the
    compute dtype). ``d log2_step_c = ln2*s_c*sum_{i in c} g_i*(e_i + s_c*r_i)``. Entries
    switched off by ``need_grad_w`` / ``need_grad_step`` are None.
    """
    _checks.check_weight_args(w, log2_step)
    _checks.check_grad(grad_w_hat, w, "grad_w_hat")
    _checks.check_zero_point(zero_point, w)
    _checks.check_seed(seed)
    name = resolve_backend(w, backend)
    if w.numel() == 0 and name in ("triton", "cpu"):
        gw = grad_w_hat if need_grad_w else None
        if not need_grad_step:
            return gw, None
        return gw, torch.zeros(log2_step.shape, dtype=_checks.compute_dtype(w.dtype), device=w.device)
    return _impl(name).weight_backward(
        grad_w_hat, w, log2_step, zero_point, seed, bool(dither),
        need_grad_w=need_grad_w, need_grad_step=need_grad_step,
    )


class _QuantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, log2_step, seed, dither, backend):
        y, z = weight_forward(w, log2_step, backend=backend)
        ctx.save_for_backward(w, log2_step, z)  # input + O(C_out); no noise, no codes
        ctx.seed, ctx.dither, ctx.backend = seed, dither, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):
        w, log2_step, z = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not need_s:
            return (grad_y if need_w else None), None, None, None, None
        gw, gs = weight_backward(grad_y.contiguous(), w, log2_step, z, ctx.seed, ctx.dither,
                                 backend=ctx.backend, need_grad_w=need_w, need_grad_step=True)
        return (grad_y if need_w else None), gs.to(log2_step.dtype), None, None, None


def quantize_weight(w, log2_step, *, seed=None, dither=True, backend=None):
    """GDNSQ weight fake-quantizer with exact GDNSQ gradients.

    ``z_c = min(w[c])`` (recomputed every call), ``y = z + s * round((w - z) / s)`` with
    ``s = 2**log2_step``; no clamp.

    Args:
        w: (C_out, ...) float16/bfloat16/float32 (math in float32) or float64.
        log2_step: (C_out,) per-channel or one-element per-tensor float tensor on w's device.
        seed, dither, backend: as in ``quantize_activation``.

    Returns w_hat with w's shape and dtype. Gradients: ``dw = g`` exactly;
    ``d log2_step_c = ln2 * s_c * sum_{i in c} g_i * (e_i + s_c * r_i)`` (summed over channels
    for a one-element step). A channel whose values are all equal quantizes to itself (e = 0).
    A NaN weight makes its channel's output and step gradient NaN.

    Example::

        >>> w = torch.randn(16, 8, 3, 3, requires_grad=True)
        >>> a = torch.full((16,), -4.0, requires_grad=True)
        >>> quantize_weight(w, a, seed=1).square().sum().backward()
    """
    _checks.check_weight_args(w, log2_step)
    if seed is None:
        seed = new_seed() if (dither and _needs_grad(w, log2_step)) else 0
    _checks.check_seed(seed)
    return _QuantizeWeight.apply(w, log2_step, seed, bool(dither), backend)
