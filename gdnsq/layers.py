"""Quantized layers: ``QConv2d`` and ``QLinear`` (weights and inputs fake-quantized by GDNSQ).

In training each layer runs one fused custom op (``gdnsq::qconv2d`` / ``gdnsq::qlinear``, with
its backward registered through ``torch.library.register_autograd``) that saves only
the FP input ``x`` (which the preceding ReLU keeps alive anyway), the quantized weight (small),
the weight zero points and two dither seeds. The backward recomputes the quantized input
``activation_forward(x)``, runs the conv/linear backward, then the activation and weight
quantizer backwards. The plain composition ``conv(quantize_activation(x), quantize_weight(w))``
would keep the quantized input alive as a second activation-sized tensor; the fused path keeps
activation memory near the FP network's.

Gradients are identical to that composition for the same seeds (tests/test_layers.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from gdnsq_kernels import quantize as _kq
from gdnsq_kernels.quantize import reference as _kref
from gdnsq_kernels._launch import memory_format_of
from gdnsq_kernels.backend import resolve_backend

from .quantizers import ActivationQuantizer, WeightQuantizer, _check_bits, aewgs_grads


@dataclass
class _Cfg:
    """Non-tensor arguments of the fused layer op."""
    kind: str            # "conv" or "linear"
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    groups: int = 1
    estimator: str = "ste"
    w_dither: bool = True
    a_dither: bool = True


def _op_forward(cfg: _Cfg, x, w, b):
    if cfg.kind == "conv":
        return F.conv2d(x, w, b, cfg.stride, cfg.padding, cfg.dilation, cfg.groups)
    return F.linear(x, w, b)


def _op_backward(cfg: _Cfg, grad_out, x, w, has_bias: bool, mask):
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
# ``op(quantize_activation(x), quantize_weight(w), b)`` as one ``gdnsq::`` custom op with its
# own backward (register_autograd) that recomputes the quantized input instead of saving it.
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


def _fused_forward(cfg: _Cfg, x, weight, bias, a_step, a_range, a_off, w_step, cast, backend):
    has_act = a_step is not None
    xq = torch.ops.gdnsq.act_forward(x, a_step, a_range, a_off, backend) if has_act else x
    w_hat, zero_point = torch.ops.gdnsq.w_forward(weight, w_step, backend)
    # Under autocast the quantizers still run in float32 (METHOD Part A item 8); only the
    # conv/linear runs in the autocast dtype, cast here explicitly so that the backward, which
    # runs outside autocast, sees the same dtypes.
    with torch.autocast(x.device.type, enabled=False):
        if cast is not None:
            out = _op_forward(cfg, xq.to(cast), w_hat.to(cast), None if bias is None else bias.to(cast))
        else:
            out = _op_forward(cfg, xq, w_hat, bias)
    return out, w_hat, zero_point


def _fused_fake(cfg: _Cfg, x, weight, bias, a_step, cast):
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
    out = _op_forward(cfg, xq, w_op, b)
    return out, w_hat, weight.new_empty((weight.shape[0],), dtype=ct)


def _fused_setup(ctx, cfg: _Cfg, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed,
                 cast, backend, output):
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
    # Recompute the quantized input instead of having stored it (the memory saving).
    xq = torch.ops.gdnsq.act_forward(x, a_step, a_range, a_off, backend) if has_act else x
    # dense; a channels_last gradient (what a channels_last conv output gets) is kept as it is
    grad_out = grad_out.contiguous(memory_format=memory_format_of(grad_out))
    if ctx.cast is not None:
        xq, w_op = xq.to(ctx.cast), w_hat.to(ctx.cast)
        grad_out = grad_out.to(ctx.cast)
    else:
        w_op = w_hat
    g_xq, g_w_hat, g_b = _op_backward(cfg, grad_out, xq, w_op, ctx.has_bias, (need_in, need_w, nb))
    del xq, w_op
    if ctx.cast is not None:  # back to the dtypes of x, the weight and the bias
        g_xq = None if g_xq is None else g_xq.to(x.dtype)
        g_w_hat = None if g_w_hat is None else g_w_hat.to(weight.dtype)
        g_b = None if g_b is None else g_b.to(weight.dtype)
    gx = gas = gar = gao = gw = gws = None
    if need_in:
        if has_act:
            gx, gas, gar, gao = torch.ops.gdnsq.act_backward(
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
            gws = torch.ops.gdnsq.w_step_grad(g_w_hat, weight, w_step, zero_point, w_seed,
                                              cfg.w_dither, backend)
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
    cfg = _Cfg("conv", tuple(stride), tuple(padding), tuple(dilation), groups)
    return _fused_forward(cfg, x, weight, bias, a_step, a_range, a_off, w_step, cast, backend)


@_qconv2d.register_fake
def _(x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, stride, padding, dilation,
      groups, estimator, a_dither, w_dither, cast, backend):
    return _fused_fake(_Cfg("conv", tuple(stride), tuple(padding), tuple(dilation), groups), x, weight,
                       bias, a_step, cast)


def _qconv2d_setup(ctx, inputs, output):
    (x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, stride, padding, dilation,
     groups, estimator, a_dither, w_dither, cast, backend) = inputs
    cfg = _Cfg("conv", tuple(stride), tuple(padding), tuple(dilation), groups, estimator, w_dither, a_dither)
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
    return _fused_forward(_Cfg("linear"), x, weight, bias, a_step, a_range, a_off, w_step, cast, backend)


@_qlinear.register_fake
def _(x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, estimator, a_dither, w_dither,
      cast, backend):
    return _fused_fake(_Cfg("linear"), x, weight, bias, a_step, cast)


def _qlinear_setup(ctx, inputs, output):
    (x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, estimator, a_dither, w_dither,
     cast, backend) = inputs
    cfg = _Cfg("linear", estimator=estimator, w_dither=w_dither, a_dither=a_dither)
    _fused_setup(ctx, cfg, x, weight, bias, a_step, a_range, a_off, w_step, a_seed, w_seed, cast,
                 backend, output)


def _qlinear_backward(ctx, grad_out, _g_w_hat, _g_zero_point):
    return _fused_backward(ctx, grad_out) + (None,) * 7


_qlinear.register_autograd(_qlinear_backward, setup_context=_qlinear_setup)


def _fused_layer(cfg: _Cfg, x, weight, bias, a_step, a_range, a_off, w_step):
    """Run the fused op of ``cfg.kind``: draws the two dither seeds on x's device and calls it."""
    has_act = a_step is not None
    dev = x.device
    backend = resolve_backend(x)
    # Seed order (activation first, then weight) mirrors the composition's call order.
    a_seed = _kq.new_seed_tensor(dev) if (has_act and cfg.a_dither) else torch.zeros(1, dtype=torch.int64, device=dev)
    w_seed = _kq.new_seed_tensor(dev) if cfg.w_dither else torch.zeros(1, dtype=torch.int64, device=dev)
    cast = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None
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


class _QuantMixin:
    """Shared logic of QConv2d and QLinear (set up by ``_init_quant``)."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActivationQuantizer | None

    def _init_quant(self, weight_bits, act_bits, signed, estimator, per_channel, dither):
        weight_bits = _check_bits(weight_bits, "weight_bits")
        act_bits = None if act_bits is None else _check_bits(act_bits, "act_bits")
        self.weight_quantizer = WeightQuantizer(self.weight.shape[0], per_channel=per_channel,
                                                estimator=estimator, target_bits=weight_bits,
                                                dither=dither)
        self.act_quantizer = (None if act_bits is None else
                              ActivationQuantizer(signed=signed, target_bits=act_bits, dither=dither))
        # fused=False runs the plain composition (reference for tests, or for debugging).
        self.fused = True
        # Set by gdnsq.calibrate to run the layer in full precision during statistics passes.
        self._fp_passthrough = False
        # exact_inference: without autograd, run the conv/linear of the quantized operands in
        # float64 and round the result once to the input dtype (see set_exact_inference).
        self.exact_inference = False
        self._quant_kwargs = dict(weight_bits=weight_bits, act_bits=act_bits, signed=signed,
                                  estimator=estimator, per_channel=per_channel, dither=dither)
        self.weight_quantizer.to(device=self.weight.device)
        if self.act_quantizer is not None:
            self.act_quantizer.to(device=self.weight.device)

    @classmethod
    def _from_float_layer(cls, layer, ctor_args, kwargs):
        # Build on the meta device (no weight allocation), adopt the float layer's Parameter
        # objects, then create the quantizers on the real device.
        q = cls(*ctor_args, device="meta", **kwargs)
        q.weight = layer.weight
        q.bias = layer.bias
        q._init_quant(**q._quant_kwargs)
        q.train(layer.training)
        return q

    def _act_active(self) -> bool:
        return self.act_quantizer is not None and self.act_quantizer.enabled

    def _quant_forward(self, x: torch.Tensor, cfg: _Cfg) -> torch.Tensor:
        if self._fp_passthrough:
            return _op_forward(cfg, x, self.weight, self.bias)
        aq, wq = self.act_quantizer, self.weight_quantizer
        act = self._act_active()
        params = [self.weight, wq.log2_step] + (list(aq.params()) if act else [])
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if not needs_grad:
            # Inference / statistics: no autograd; eval mode records the observed act bits.
            if act:
                xq = _kq.activation_forward(x, *[p.detach() for p in aq.params()])
                if not aq.training:
                    aq.observe_output(xq)
            else:
                xq = x
            bias = None if self.bias is None else self.bias.detach()
            if self.exact_inference and x.dtype != torch.float64:
                return self._exact_forward(x, xq, cfg, act, bias)
            w_hat, _ = _kq.weight_forward(self.weight.detach(), wq.log2_step.detach())
            return _op_forward(cfg, xq, w_hat, bias)
        if not self.fused:
            xq = aq(x) if act else x
            return _op_forward(cfg, xq, wq(self.weight), self.bias)
        cfg.estimator, cfg.w_dither = wq.estimator, wq.dither
        cfg.a_dither = aq.dither if act else False
        a = aq.params() if act else (None, None, None)
        out = _fused_layer(cfg, x, self.weight, self.bias, a[0], a[1], a[2], wq.log2_step)
        if act and not aq.training:
            with torch.no_grad():
                aq.observe_output(_kq.activation_forward(x.detach(), *[p.detach() for p in aq.params()]))
        return out

    def _exact_forward(self, x, xq, cfg: _Cfg, act: bool, bias):
        """The layer's exact value on the integer codes, rounded once to x's dtype.

        Same codes as the float32 path; the grid values ``z + s*k`` and ``lo + s_a*j`` are formed
        in float64 (steps are the float32 ``2**log2_step``, as everywhere) instead of being
        rounded to float32, and the conv/linear runs in float64. This is the value the integer
        kernels of ``gdnsq.deploy`` compute; see :func:`set_exact_inference`.
        """
        wq, aq = self.weight_quantizer, self.act_quantizer
        k, z = _kref.weight_codes(self.weight.detach(), wq.log2_step.detach())
        s_w = torch.exp2(wq.log2_step.detach().float()).double()
        shape = (-1,) + (1,) * (k.dim() - 1)
        w64 = z.double().view(shape) + (s_w.view(shape) if s_w.numel() > 1 else s_w) * k.double()
        if act:
            a_step, a_range, a_off = [p.detach() for p in aq.params()]
            j = _kref.activation_codes(x, a_step, a_range, a_off)
            x64 = a_off.double() + torch.exp2(a_step.float()).double() * j.double()
        else:
            x64 = xq.double()
        out = _op_forward(cfg, x64, w64, None if bias is None else bias.double())
        return out.to(x.dtype)

    # -- bit-widths ------------------------------------------------------------------------
    def continuous_weight_bits(self) -> torch.Tensor:
        """(C_out,) differentiable weight bit-widths."""
        return self.weight_quantizer.continuous_bits(self.weight)

    def realised_weight_bits(self) -> float:
        """Max over output channels of log2(k_max - k_min + 1)."""
        return self.weight_quantizer.realised_bits(self.weight)


def set_exact_inference(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every QConv2d/QLinear of ``model`` to exact inference (or back); returns ``model``.

    A fake-quant layer normally accumulates its float32 conv of the quantized operands in
    float32, whose summation order depends on the backend. With ``enabled=True`` the layers run
    that conv in float64 outside autograd and round once: the exact value of the quantized
    layer, which is what the integer kernels of ``gdnsq.deploy`` produce. Use it to compare a
    frozen model with its fake-quant model bit for bit; it is about 10x slower on CPU.
    Training (autograd) is unaffected.
    """
    for module in model.modules():
        if isinstance(module, _QuantMixin):
            module.exact_inference = bool(enabled)
    return model


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight (per output channel) and input (per tensor) are quantized.

    Extra args: ``weight_bits`` / ``act_bits`` (targets in bits; ``act_bits=None`` leaves the
    input FP), ``signed`` (activation offset: False, True or "auto"), ``estimator``
    ("ste" | "aewgs"), ``per_channel``, ``dither``.
    Shapes as ``nn.Conv2d``: (N, C_in, H, W) -> (N, C_out, H', W').
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 weight_bits=32.0, act_bits=32.0, signed="auto", estimator="ste",
                 per_channel=True, dither=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._init_quant(weight_bits, act_bits, signed, estimator, per_channel, dither)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **kwargs) -> "QConv2d":
        """A QConv2d sharing ``conv``'s weight and bias Parameter objects (kwargs as __init__)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        return cls._from_float_layer(conv, args, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fusable = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        if not fusable and not self._fp_passthrough:
            # Reflect/replicate/circular and "same" padding: quantize first, then pad and conv
            # through nn.Conv2d (quantization is element-wise, so it commutes with padding).
            xq = self.act_quantizer(x) if self._act_active() else x
            return self._conv_forward(xq, self.weight_quantizer(self.weight), self.bias)
        cfg = _Cfg("conv", self.stride, self.padding, self.dilation, self.groups)
        return self._quant_forward(x, cfg)


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight (per output row) and input (per tensor) are quantized.

    Extra args as :class:`QConv2d`. Shapes as ``nn.Linear``: (..., in) -> (..., out).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 weight_bits=32.0, act_bits=32.0, signed="auto", estimator="ste",
                 per_channel=True, dither=True):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(weight_bits, act_bits, signed, estimator, per_channel, dither)

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs) -> "QLinear":
        """A QLinear sharing ``linear``'s weight and bias Parameter objects (kwargs as __init__)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        args = (linear.in_features, linear.out_features, linear.bias is not None)
        return cls._from_float_layer(linear, args, kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_forward(x, _Cfg("linear"))
