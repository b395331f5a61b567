"""Fused quantized layer ops ``gdnsq::qconv2d`` / ``gdnsq::qlinear`` and their backward.

``op(quantize_activation(x), quantize_weight(w), b)`` as one ``gdnsq::`` custom op with its own
backward (``register_autograd``) that saves only the FP input ``x`` (which the preceding ReLU
keeps alive anyway), the quantized weight (small), the weight zero points and two dither seeds.
The backward recomputes the quantized input ``act_forward(x)``, runs the conv/linear backward
(``aten.convolution_backward`` / two matmuls), then the activation and weight quantizer
backwards. The plain composition would keep the quantized input alive as a second
activation-sized tensor; the fused op keeps activation memory near the FP network's.

Gradients are identical to that composition for the same seeds (tests/test_layers.py).
``gdnsq.layers.QConv2d`` / ``QLinear`` call :func:`fused_layer`; :func:`layer_forward` is the
plain conv/linear they also use outside training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _ops  # registers the quantizer ops called below
from .._launch import memory_format_of
from ..backend import resolve_backend
from .aewgs import aewgs_grads
from .dither import new_seed_tensor

__all__ = ["LayerConfig", "layer_forward", "fused_layer"]


@dataclass
class LayerConfig:
    """Non-tensor arguments of a fused layer op (the geometry of ``F.conv2d`` for "conv")."""
    kind: str            # "conv" or "linear"
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    estimator: str = "ste"
    w_dither: bool = True
    a_dither: bool = True


def layer_forward(cfg: LayerConfig, x, w, b):
    """Plain ``F.conv2d`` (x: (N, C_in, H, W)) or ``F.linear`` (x: (..., in)) of ``cfg.kind``."""
    if cfg.kind == "conv":
        return F.conv2d(x, w, b, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    return F.linear(x, w, b)


def _layer_backward(cfg: LayerConfig, grad_out, x, w, has_bias: bool, mask):
    """(grad_x, grad_w, grad_b) of conv2d/linear; entries not asked for in ``mask`` are None."""
    if cfg.kind == "conv":
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, x, w, [w.shape[0]] if has_bias else None, list(cfg.stride), list(cfg.padding),
            list(cfg.dilation), False, [0, 0], cfg.groups, [bool(m) for m in mask])
        return (gx if mask[0] else None), (gw if mask[1] else None), (gb if mask[2] else None)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    gx = (g2 @ w).reshape(x.shape) if mask[0] else None
    gw = g2.t() @ x.reshape(-1, x.shape[-1]) if mask[1] else None
    gb = g2.sum(0) if (mask[2] and has_bias) else None
    return gx, gw, gb


# ----------------------------------------------------------------------------- fused layer ops
#
#   gdnsq::qconv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? a_step, Tensor? a_range,
#       Tensor? a_off, Tensor w_step, Tensor a_seed, Tensor w_seed, SymInt[] stride,
#       SymInt[] padding, SymInt[] dilation, SymInt groups, str estimator, bool a_dither,
#       bool w_dither, ScalarType? cast, str backend) -> (Tensor out, Tensor w_hat, Tensor zero_point)
#   gdnsq::qlinear(Tensor x, Tensor weight, Tensor? bias, Tensor? a_step, Tensor? a_range,
#       Tensor? a_off, Tensor w_step, Tensor a_seed, Tensor w_seed, str estimator, bool a_dither,
#       bool w_dither, ScalarType? cast, str backend) -> (Tensor out, Tensor w_hat, Tensor zero_point)
#
# The activation parameters are all None when inputs are not quantized (A32). ``cast`` is the
# autocast dtype of the conv/linear (None: no autocast); it is read by the Python caller and
# passed in, because the backward runs outside autocast. ``w_hat`` and ``zero_point`` are
# returned so that the backward can save them (the layer uses only ``out``).


def _direct(*tensors) -> bool:
    """Whether the backward may call the quantizer kernels directly (``_ops.*_impl``) instead of
    through their ``gdnsq::`` ops: plain tensors and no dispatch mode (eager autograd). When
    AOTAutograd traces the backward (fake / functional tensors under its modes) or a user's
    ``TorchDispatchMode`` watches, the ops are called, so that they see one opaque op each."""
    return (torch._C._len_torch_dispatch_stack() == 0
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def _fused_forward(cfg: LayerConfig, x, weight, bias, a_step, a_range, a_off, w_step, cast, backend):
    # This runs only as the real implementation of the fused op (never traced: the fake
    # implementation is _fused_fake), so the quantizers are called without a nested dispatch.
    has_act = a_step is not None
    xq = _ops.act_forward_impl(x, a_step, a_range, a_off, backend) if has_act else x
    w_hat, zero_point = _ops.w_forward_impl(weight, w_step, backend)
    # Under autocast the quantizers still run in float32 (METHOD Part A item 8); only the
    # conv/linear runs in the autocast dtype, cast here explicitly so that the backward, which
    # runs outside autocast, sees the same dtypes.
    with torch.autocast(x.device.type, enabled=False):
        if cast is not None:
            out = layer_forward(cfg, xq.to(cast), w_hat.to(cast), None if bias is None else bias.to(cast))
        else:
            out = layer_forward(cfg, xq, w_hat, bias)
    return out, w_hat, zero_point


def _fused_fake(cfg: LayerConfig, x, weight, bias, a_step, cast):
    """Output metadata of the fused op: the conv/linear of fakes laid out as the real operands
    (the quantized input and weight keep the layouts of x and the weight, as the quantizer ops
    give them: channels_last stays channels_last)."""
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    xq = torch.empty_like(x, memory_format=memory_format_of(x)) if a_step is not None else x
    w_hat = torch.empty_like(weight, memory_format=memory_format_of(weight))
    if cast is not None:
        xq, w_op = xq.to(cast), w_hat.to(cast)
    else:
        w_op = w_hat
    b = None if bias is None else bias.to(w_op.dtype)
    out = layer_forward(cfg, xq, w_op, b)
    return out, w_hat, weight.new_empty((weight.shape[0],), dtype=ct)


def _fused_setup(ctx, cfg: LayerConfig, x, weight, bias, a_step, a_range, a_off, w_step, a_seed,
                 w_seed, cast, backend, output):
    _, w_hat, zero_point = output
    # x, the weight (a parameter: no new bytes), the quantized weight, zero points, the
    # O(1)/O(C_out) parameters and the two seed tensors; never the quantized input.
    ctx.save_for_backward(x, weight, w_hat, zero_point, a_step, a_range, a_off, w_step, a_seed, w_seed)
    ctx.cfg, ctx.has_act, ctx.has_bias = cfg, a_step is not None, bias is not None
    ctx.cast, ctx.backend = cast, backend


def _fused_backward(ctx, grad_out):
    """Gradients of x, weight, bias, the three activation parameters and the weight step."""
    x, weight, w_hat, zero_point, a_step, a_range, a_off, w_step, a_seed, w_seed = ctx.saved_tensors
    cfg, has_act, backend = ctx.cfg, ctx.has_act, ctx.backend
    nx, nw, nb, nas, nar, nao, nws = ctx.needs_input_grad[:7]
    need_act_params = has_act and (nas or nar or nao)
    need_in = nx or need_act_params
    need_w = nw or nws
    direct = _direct(x, grad_out)
    act_fwd = _ops.act_forward_impl if direct else torch.ops.gdnsq.act_forward
    act_bwd = _ops.act_backward_impl if direct else torch.ops.gdnsq.act_backward
    w_step_grad = _ops.w_step_grad_impl if direct else torch.ops.gdnsq.w_step_grad
    # Recompute the quantized input instead of having stored it (the memory saving).
    xq = act_fwd(x, a_step, a_range, a_off, backend) if has_act else x
    # dense; a channels_last gradient (what a channels_last conv output gets) is kept as it is
    grad_out = grad_out.contiguous(memory_format=memory_format_of(grad_out))
    if ctx.cast is not None:
        xq, w_op = xq.to(ctx.cast), w_hat.to(ctx.cast)
        grad_out = grad_out.to(ctx.cast)
    else:
        w_op = w_hat
    g_xq, g_w_hat, g_b = _layer_backward(cfg, grad_out, xq, w_op, ctx.has_bias, (need_in, need_w, nb))
    del xq, w_op
    if ctx.cast is not None:  # back to the dtypes of x, the weight and the bias
        g_xq = None if g_xq is None else g_xq.to(x.dtype)
        g_w_hat = None if g_w_hat is None else g_w_hat.to(weight.dtype)
        g_b = None if g_b is None else g_b.to(weight.dtype)
    gx = gas = gar = gao = gw = gws = None
    if need_in:
        if has_act:
            gx, gas, gar, gao = act_bwd(
                g_xq.contiguous(memory_format=memory_format_of(x)), x, a_step, a_range, a_off, a_seed, cfg.a_dither, backend,
                bool(nx), bool(need_act_params))
            gas = gas.reshape(a_step.shape).to(a_step.dtype) if nas else None
            gar = gar.reshape(a_range.shape).to(a_range.dtype) if nar else None
            gao = gao.reshape(a_off.shape).to(a_off.dtype) if nao else None
            gx = gx if nx else None
        else:
            gx = g_xq
    if need_w:
        g_w_hat = g_w_hat.contiguous(memory_format=memory_format_of(weight))
        if cfg.estimator == "aewgs":
            gw, extra = aewgs_grads(g_w_hat, weight, w_step, zero_point)
            gw = gw if nw else None
        else:
            gw = g_w_hat if nw else None  # STE
        if nws:
            gws = w_step_grad(g_w_hat, weight, w_step, zero_point, w_seed, cfg.w_dither, backend)
            if cfg.estimator == "aewgs":
                gws = gws.reshape(w_step.shape).float() + extra
            gws = gws.reshape(w_step.shape).to(w_step.dtype)
    return gx, gw, g_b, gas, gar, gao, gws


@torch.library.custom_op("gdnsq::qconv2d", mutates_args=())
def _qconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             a_step: Optional[torch.Tensor], a_range: Optional[torch.Tensor],
             a_off: Optional[torch.Tensor], w_step: torch.Tensor, a_seed: torch.Tensor,
             w_seed: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
             groups: int, estimator: str, a_dither: bool, w_dither: bool,
             cast: Optional[torch.dtype], backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = LayerConfig("conv", tuple(stride), tuple(padding), tuple(dilation), groups)
    return _fused_forward(cfg, x, weight, bias, a_step, a_range, a_off, w_step, cast, backend)


@_qconv2d.register_fake
def _(x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, stride, padding, dilation,
      groups, estimator, a_dither, w_dither, cast, backend):
    cfg = LayerConfig("conv", tuple(stride), tuple(padding), tuple(dilation), groups)
    return _fused_fake(cfg, x, weight, bias, a_step, cast)


def _qconv2d_setup(ctx, inputs, output):
    (x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, stride, padding, dilation,
     groups, estimator, a_dither, w_dither, cast, backend) = inputs
    cfg = LayerConfig("conv", tuple(stride), tuple(padding), tuple(dilation), groups, estimator, w_dither,
                      a_dither)
    _fused_setup(ctx, cfg, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cast,
                 backend, output)


def _qconv2d_backward(ctx, grad_out, _g_w_hat, _g_zero_point):
    return _fused_backward(ctx, grad_out) + (None,) * 11


_qconv2d.register_autograd(_qconv2d_backward, setup_context=_qconv2d_setup)


@torch.library.custom_op("gdnsq::qlinear", mutates_args=())
def _qlinear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             a_step: Optional[torch.Tensor], a_range: Optional[torch.Tensor],
             a_off: Optional[torch.Tensor], w_step: torch.Tensor, a_seed: torch.Tensor,
             w_seed: torch.Tensor, estimator: str, a_dither: bool, w_dither: bool,
             cast: Optional[torch.dtype], backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused_forward(LayerConfig("linear"), x, weight, bias, a_step, a_range, a_off, w_step, cast,
                          backend)


@_qlinear.register_fake
def _(x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, estimator, a_dither, w_dither,
      cast, backend):
    return _fused_fake(LayerConfig("linear"), x, weight, bias, a_step, cast)


def _qlinear_setup(ctx, inputs, output):
    (x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, estimator, a_dither, w_dither,
     cast, backend) = inputs
    cfg = LayerConfig("linear", estimator=estimator, w_dither=w_dither, a_dither=a_dither)
    _fused_setup(ctx, cfg, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cast,
                 backend, output)


def _qlinear_backward(ctx, grad_out, _g_w_hat, _g_zero_point):
    return _fused_backward(ctx, grad_out) + (None,) * 7


_qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


class _EagerFusedLayer(torch.autograd.Function):
    """The fused layer op's forward and backward as a plain autograd Function, for eager mode.

    Same functions as the ``gdnsq::`` op and its ``register_autograd`` (``_fused_forward``,
    ``_fused_setup``, ``_fused_backward``), so the same values, the same saved tensors and the
    same gradients; what it leaves out is the custom-op machinery around them (the dispatcher
    round trip, and ``register_autograd``'s rebuilding of the 18-argument schema defaults on
    every call), about 0.1 ms per layer and step, which on a small CPU model is several percent
    of the step. ``fused_layer`` takes it only in eager autograd (see ``_eager``); compiled,
    exported, traced or transformed code gets the op.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cfg, cast, backend):
        # the op's profiler event, so that a profile shows the fused layer as the op would
        with torch.profiler.record_function("gdnsq::q" + ("conv2d" if cfg.kind == "conv" else "linear")):
            output = _fused_forward(cfg, x, weight, bias, a_step, a_range, a_off, w_step, cast, backend)
        _fused_setup(ctx, cfg, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cast,
                     backend, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _fused_backward(ctx, grad_out) + (None,) * 5


def _eager(*tensors) -> bool:
    """Whether ``fused_layer`` may run ``_EagerFusedLayer``: plain eager autograd, no compiler,
    tracer, dispatch mode or functorch transform that must see the ``gdnsq::`` op."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active() and _direct(*tensors))


def fused_layer(cfg: LayerConfig, x, weight, bias, a_step, a_range, a_off, w_step):
    """``layer_forward(cfg, quantize_activation(x), quantize_weight(weight), bias)`` through the
    fused op of ``cfg.kind``, with autograd; draws the two dither seeds on x's device.

    a_step, a_range, a_off: the activation quantizer's 0-d parameters, or all None (input not
    quantized); w_step: (C_out,) or (1,) log2 weight step. Returns the layer output (x's dtype,
    or the autocast dtype under autocast).
    """
    has_act = a_step is not None
    dev = x.device
    backend = resolve_backend(x)
    # Seed order (activation first, then weight) mirrors the composition's call order.
    a_seed = new_seed_tensor(dev) if (has_act and cfg.a_dither) else torch.zeros(1, dtype=torch.int64, device=dev)
    w_seed = new_seed_tensor(dev) if cfg.w_dither else torch.zeros(1, dtype=torch.int64, device=dev)
    cast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
    if _eager(x, weight, bias):
        return _EagerFusedLayer.apply(x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed,
                                      cfg, cast, backend)
    if cfg.kind == "conv":
        out, _, _ = torch.ops.gdnsq.qconv2d(
            x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, list(cfg.stride),
            list(cfg.padding), list(cfg.dilation), cfg.groups, cfg.estimator, cfg.a_dither,
            cfg.w_dither, cast, backend)
    else:
        out, _, _ = torch.ops.gdnsq.qlinear(
            x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cfg.estimator,
            cfg.a_dither, cfg.w_dither, cast, backend)
    return out
