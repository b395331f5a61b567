"""GDNSQ quantizer modules: a per-output-channel weight quantizer and a per-tensor activation
quantizer (METHOD Part A items 1-5, Part B §1-§2).

Both hold their parameters in log2 units and call the ``gdnsq_kernels`` ops, which implement the
forward (deterministic round-half-to-even) and the exact GDNSQ backward (STE on the input, a
dithered ``e + s*r`` gradient on the step, out-of-range sums on the clamp bounds).

* Weights: ``w_hat = z_c + s_c * round((w - z_c) / s_c)`` with ``s_c = 2**log2_step[c]`` and the
  zero point ``z_c = min(w[c])`` recomputed every call; no clamp. Continuous bit-width
  ``log2((max_c - min_c)/s_c + 1)``.
* Activations: ``y = lo + s * round((clamp(x, lo, hi) - lo) / s)`` with ``lo = offset``,
  ``hi = offset + 2**log2_range - s``. Continuous bit-width ``log2_range - log2_step``.

The low-level ops are looked up on the module ``gdnsq_kernels.quantize`` at call time (not bound
at import), so a backend chosen later (``GDNSQ_BACKEND``) is honoured everywhere.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from gdnsq_kernels import quantize as _kq
from gdnsq_kernels.quantize.aewgs import aewgs_grads

ESTIMATORS = ("ste", "aewgs")
#: Initial parameters before calibration (METHOD Part B §8): weight step 2**-12, activation step
#: 2**-10 and range 2**10 (20 bits).
WEIGHT_LOG2_STEP_INIT = -12.0
ACT_LOG2_STEP_INIT = -10.0
ACT_LOG2_RANGE_INIT = 10.0


def _check_bits(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number of bits, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 32.0):
        raise ValueError(f"{name} must be in (0, 32] bits, got {value}")
    return value


def _log2_bits_from_codes(code_min: torch.Tensor, code_max: torch.Tensor) -> torch.Tensor:
    """log2 of the number of integer levels spanned: ``log2(k_max - k_min + 1)``."""
    return torch.log2((code_max - code_min).float() + 1.0)


class _AEWGSWeight(torch.autograd.Function):
    """Weight fake-quant whose input gradient follows AEWGS (the step gradient stays GDNSQ's)."""

    @staticmethod
    def forward(ctx, w, log2_step, dither):
        # The seed is a tensor drawn on w's device (no host int: no graph break under compile).
        seed = (_kq.new_seed_tensor(w.device) if dither
                else torch.zeros(1, dtype=torch.int64, device=w.device))
        w_hat, zero_point = _kq.weight_forward(w, log2_step)
        ctx.save_for_backward(w, log2_step, zero_point, seed)
        ctx.dither = dither
        return w_hat

    @staticmethod
    def backward(ctx, grad):
        w, log2_step, zero_point, seed = ctx.saved_tensors
        need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        grad_w, extra = aewgs_grads(grad, w, log2_step, zero_point)
        grad_step = None
        if need_s:
            _, grad_step = _kq.weight_backward(grad, w, log2_step, zero_point, seed,
                                               ctx.dither, need_grad_w=False, need_grad_step=True)
            grad_step = (grad_step.reshape(log2_step.shape).float() + extra).to(log2_step.dtype)
        return (grad_w if need_w else None), grad_step, None


class WeightQuantizer(nn.Module):
    """Per-output-channel (or per-tensor) weight quantizer with a learnable log2 step.

    Args:
        out_channels: C_out of the weight it quantizes.
        per_channel: one step per output channel (default) or one for the whole tensor.
        estimator: "ste" (default; ``dw = g``) or "aewgs" (METHOD Part B §2.1).
        target_bits: target bit-width (penalty threshold and convergence test), in bits.

    Parameters / buffers:
        log2_step: (C_out,) or (1,), log2 of the step, initialised to -12.
        target_bits: 0-d float32 buffer.
    """

    def __init__(self, out_channels: int, per_channel: bool = True, estimator: str = "ste",
                 target_bits: float = 32.0, dither: bool = True):
        super().__init__()
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.out_channels = out_channels
        self.per_channel = bool(per_channel)
        self.estimator = estimator
        self.dither = bool(dither)
        n = out_channels if per_channel else 1
        self.log2_step = nn.Parameter(torch.full((n,), WEIGHT_LOG2_STEP_INIT))
        self.register_buffer("target_bits", torch.tensor(_check_bits(target_bits, "target_bits")))

    def extra_repr(self) -> str:
        return (f"{self.out_channels}, per_channel={self.per_channel}, estimator={self.estimator!r}, "
                f"target_bits={float(self.target_bits):g}")

    def _check(self, w: torch.Tensor) -> None:
        if w.dim() < 1 or w.shape[0] != self.out_channels:
            raise ValueError(f"w must have shape (C_out={self.out_channels}, ...), got {tuple(w.shape)}")

    def step(self) -> torch.Tensor:
        """(C_out,) or (1,) step ``s = 2**log2_step`` (differentiable)."""
        return torch.exp2(self.log2_step)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """(C_out, ...) weights -> quantized weights of the same shape and dtype."""
        self._check(w)
        if self.estimator == "aewgs":
            return _AEWGSWeight.apply(w, self.log2_step, self.dither)
        return _kq.quantize_weight(w, self.log2_step, dither=self.dither)

    def continuous_bits(self, w: torch.Tensor) -> torch.Tensor:
        """(C_out,) differentiable bit-widths ``log2((max_c - min_c)/s_c + 1)``.

        Differentiable in ``w`` (through max and min, not detached) and in ``log2_step``.
        """
        self._check(w)
        ct = torch.promote_types(w.dtype, torch.float32)  # float32, or float64 for checks
        flat = w.reshape(w.shape[0], -1).to(ct)
        span = flat.amax(1) - flat.amin(1)
        return torch.log2(span / self.step().to(ct) + 1.0)

    @torch.no_grad()
    def codes(self, w: torch.Tensor):
        """Integer codes the forward produces: ((C_out, ...) int32 ``k >= 0``, (C_out,) zero point)."""
        self._check(w)
        w_hat, zero_point = _kq.weight_forward(w.detach(), self.log2_step.detach())
        c = w.shape[0]
        s = torch.exp2(self.log2_step.detach().float()).reshape(-1, 1)
        k = torch.round((w_hat.float().reshape(c, -1) - zero_point.float().reshape(-1, 1)) / s)
        return k.to(torch.int32).reshape(w.shape), zero_point

    @torch.no_grad()
    def channel_realised_bits(self, w: torch.Tensor) -> torch.Tensor:
        """(C_out,) ``log2(k_max - k_min + 1)`` per channel, from the codes actually produced."""
        k, _ = self.codes(w)
        k = k.reshape(k.shape[0], -1)
        if k.shape[1] == 0:
            return torch.zeros(k.shape[0])
        return _log2_bits_from_codes(k.amin(1), k.amax(1))

    def realised_bits(self, w: torch.Tensor) -> float:
        """Max over channels of ``log2(k_max - k_min + 1)`` (the convergence test's weight bits)."""
        return float(self.channel_realised_bits(w).max())


_SIGNED_CODES = {"auto": -1, False: 0, True: 1}


class ActivationQuantizer(nn.Module):
    """Per-tensor activation quantizer with learnable log2 step, log2 range and offset.

    Args:
        signed: False (default): offset fixed at 0 (for non-negative inputs, e.g. after a ReLU;
            keeps zero padding on the grid); True: learnable offset; "auto": decided by
            :func:`gdnsq.calibrate` from the data (unsigned when the calibration minimum is
            >= 0, signed otherwise). Until then an "auto" quantizer behaves as signed.
        target_bits: target bit-width in bits.

    Parameters (0-d): ``log2_step`` (init -10), ``log2_range`` (init 10), ``offset`` (init 0
    when unsigned, -2**(log2_range-1) = -512 otherwise; ``offset.requires_grad == signed``).
    Buffers (0-d): ``target_bits``; ``observed_bits`` (log2 of the code range used by the last
    eval-mode batch + 1 level; +inf until a batch has been seen); ``pruned`` (zero observed range
    at calibration: frozen and out of the penalty); ``signed_state`` (-1 auto, 0 no, 1 yes).
    Attribute ``enabled=False`` makes the module the identity (A32).
    """

    def __init__(self, signed=False, target_bits: float = 32.0, dither: bool = True):
        super().__init__()
        if not (signed is True or signed is False or (isinstance(signed, str) and signed == "auto")):
            raise ValueError(f"signed must be True, False or 'auto', got {signed!r}")
        code = _SIGNED_CODES[signed]
        self.enabled = True
        self.dither = bool(dither)
        self.log2_step = nn.Parameter(torch.tensor(ACT_LOG2_STEP_INIT))
        self.log2_range = nn.Parameter(torch.tensor(ACT_LOG2_RANGE_INIT))
        self.offset = nn.Parameter(torch.tensor(0.0 if code == 0 else -(2.0 ** (ACT_LOG2_RANGE_INIT - 1))))
        self.register_buffer("target_bits", torch.tensor(_check_bits(target_bits, "target_bits")))
        self.register_buffer("observed_bits", torch.tensor(math.inf))
        self.register_buffer("pruned", torch.tensor(False))
        self.register_buffer("signed_state", torch.tensor(code, dtype=torch.int8))
        self._apply_flags()

    # -- signedness / freezing -------------------------------------------------------------
    @property
    def signed(self):
        """True, False, or "auto" (not yet decided by calibration)."""
        return {-1: "auto", 0: False, 1: True}[int(self.signed_state)]

    def set_signed(self, signed: bool) -> None:
        """Fix the signedness (before the optimizer is built). Unsigned sets the offset to 0."""
        if signed not in (True, False):
            raise ValueError(f"signed must be True or False, got {signed!r}")
        self.signed_state.fill_(1 if signed else 0)
        if not signed:
            with torch.no_grad():
                self.offset.zero_()
        self._apply_flags()

    def _apply_flags(self) -> None:
        # requires_grad is not part of a state_dict, so it is re-derived from the buffers.
        frozen = bool(self.pruned)
        self.log2_step.requires_grad_(not frozen)
        self.log2_range.requires_grad_(not frozen)
        self.offset.requires_grad_(not frozen and int(self.signed_state) != 0)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._apply_flags()

    def extra_repr(self) -> str:
        return (f"signed={self.signed!r}, target_bits={float(self.target_bits):g}, "
                f"enabled={self.enabled}, pruned={bool(self.pruned)}")

    # -- math ------------------------------------------------------------------------------
    def params(self):
        """(log2_step, log2_range, offset) as passed to the ops."""
        return self.log2_step, self.log2_range, self.offset

    def continuous_bits(self) -> torch.Tensor:
        """0-d differentiable bit-width ``log2_range - log2_step``."""
        return self.log2_range - self.log2_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any-shape tensor -> quantized tensor (same shape/dtype). In eval mode also records
        ``observed_bits`` of this batch."""
        if not self.enabled:
            return x
        y = _kq.quantize_activation(x, self.log2_step, self.log2_range, self.offset, dither=self.dither)
        if not self.training:
            self.observe_output(y)
        return y

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """int32 codes ``j = round((clamp(x) - lo)/s)`` of the forward, same shape as ``x``."""
        y = _kq.activation_forward(x.detach(), self.log2_step.detach(), self.log2_range.detach(),
                                   self.offset.detach())
        return self._codes_of_output(y)

    def _codes_of_output(self, y: torch.Tensor) -> torch.Tensor:
        s = torch.exp2(self.log2_step.detach().float())
        return torch.round((y.detach().float() - self.offset.detach().float()) / s).to(torch.int32)

    @torch.no_grad()
    def observe_output(self, y: torch.Tensor) -> None:
        """Set ``observed_bits`` from the quantized output ``y`` of one batch."""
        if y.numel() == 0:
            return
        j = self._codes_of_output(y)
        # copy_ (not fill_(float(...))): no device synchronisation per layer and batch.
        self.observed_bits.copy_(_log2_bits_from_codes(j.min(), j.max()))
