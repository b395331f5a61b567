"""Public GDNSQ quantizer ops: argument checks, backend dispatch, and the ``gdnsq::`` op calls.

``quantize_activation`` and ``quantize_weight`` are the two ops every GDNSQ layer calls. The
math (forward, closed-form backward, NaN behaviour) is documented in
``gdnsq_kernels.quantize.reference``, which is also the oracle every backend is tested against.

Backends (``backend=`` argument or ``GDNSQ_BACKEND``; see ``gdnsq_kernels.backend``):
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (fused C++ op built on first
use; falls back to ``torch`` with one warning if it cannot be built), ``torch`` (eager closed
form), ``reference``.

The low-level functions (``activation_forward`` ... ``weight_backward``) carry no autograd, so a
fused layer can save only its float input and recompute the quantized tensor in its backward.
Every function here validates its arguments, resolves the backend and calls a ``gdnsq::``
custom op (``gdnsq_kernels.quantize._ops``); the trainable ops' backwards (``register_autograd``) save
the input, the O(1)/O(C_out) parameters and zero point, and the seed tensor of the dither,
never a noise tensor or a mask. The seed is drawn on the input's device as a tensor
(``new_seed_tensor``), so ``torch.compile(fullgraph=True)`` traces a whole QAT step.
"""
from __future__ import annotations

import torch

from . import _checks
from ..backend import resolve_backend
from . import _ops  # noqa: F401  (registers the gdnsq:: ops)
from . import fused_layers  # noqa: F401  (registers gdnsq::qconv2d / gdnsq::qlinear)
from .dither import MASK32, new_seed_tensor

__all__ = [
    "quantize_activation",
    "quantize_weight",
    "activation_forward",
    "activation_backward",
    "weight_forward",
    "weight_backward",
    "new_seed_tensor",
]


def _seed_tensor(seed, device) -> torch.Tensor:
    """The seed as a one-element int64 tensor on ``device`` (an int: only its low 32 bits matter)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    return torch.tensor([seed & MASK32], dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- activation


def activation_forward(x, log2_step, log2_range, offset, *, backend=None):
    """Quantized activation, no autograd, no dither.

    x: any shape, float16/bfloat16/float32/float64; log2_step, log2_range, offset: 0-d or (1,)
    float tensors on x's device (log2 units for the first two, x's units for offset).
    Returns y with x's shape and dtype (math in float32; float64 for float64 x).
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    return torch.ops.gdnsq.act_forward(x, log2_step, log2_range, offset, resolve_backend(x, backend))


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither, *, backend=None,
                        need_grad_x=True, need_grad_params=True):
    """Closed-form GDNSQ backward of the activation quantizer (STE input, exact param grads).

    grad_y: upstream gradient, x's shape; seed: int or one-element int64 tensor (the dither is regenerated from it);
    dither: bool (False: r = 0). Returns (grad_x with x's shape and dtype, grad_log2_step,
    grad_log2_range, grad_offset as 0-d float32 tensors; float64 for float64 x). Entries
    switched off by ``need_grad_x`` / ``need_grad_params`` are None (their work is skipped).
    """
    _checks.check_activation_args(x, log2_step, log2_range, offset)
    _checks.check_grad(grad_y, x, "grad_y")
    _checks.check_seed(seed)
    gx, gs, gr, go = torch.ops.gdnsq.act_backward(
        grad_y, x, log2_step, log2_range, offset, _seed_tensor(seed, x.device), bool(dither),
        resolve_backend(x, backend), bool(need_grad_x), bool(need_grad_params))
    if not need_grad_params:
        gs = gr = go = None
    return (gx if need_grad_x else None), gs, gr, go


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
        seed: int (or one-element int64 tensor) seeding the backward's dither; None draws one
            on x's device from torch's generator
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
    name = resolve_backend(x, backend)
    if seed is None:
        drawn = dither and _needs_grad(x, log2_step, log2_range, offset)
        seed = new_seed_tensor(x.device) if drawn else torch.zeros(1, dtype=torch.int64, device=x.device)
    _checks.check_seed(seed)
    return torch.ops.gdnsq.quantize_activation(x, log2_step, log2_range, offset,
                                               _seed_tensor(seed, x.device), bool(dither), name)


# ----------------------------------------------------------------------------- weight


def weight_forward(w, log2_step, *, backend=None):
    """Quantized weight, no autograd, no dither.

    w: (C_out, ...) float tensor; log2_step: (C_out,) or one element (log2 units).
    Returns (w_hat with w's shape and dtype, zero_point (C_out,) float32 (float64 for float64 w))
    where zero_point is the per-channel minimum of w.
    """
    _checks.check_weight_args(w, log2_step)
    return torch.ops.gdnsq.w_forward(w, log2_step, resolve_backend(w, backend))


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
    grad_w = grad_w_hat if need_grad_w else None
    if not need_grad_step:
        return grad_w, None
    gs = torch.ops.gdnsq.w_step_grad(grad_w_hat, w, log2_step, zero_point, _seed_tensor(seed, w.device),
                                     bool(dither), resolve_backend(w, backend))
    return grad_w, gs


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
    name = resolve_backend(w, backend)
    if seed is None:
        drawn = dither and _needs_grad(w, log2_step)
        seed = new_seed_tensor(w.device) if drawn else torch.zeros(1, dtype=torch.int64, device=w.device)
    _checks.check_seed(seed)
    w_hat, _ = torch.ops.gdnsq.quantize_weight(w, log2_step, _seed_tensor(seed, w.device),
                                               bool(dither), name)
    return w_hat
