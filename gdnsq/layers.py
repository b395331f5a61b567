"""Quantized layers: ``QConv2d`` and ``QLinear`` (weights and inputs fake-quantized by GDNSQ).

In training each layer runs one fused autograd Function (``_FusedQuantLayer``) that saves only
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

import torch
import torch.nn.functional as F
from torch import nn

from gdnsq_kernels import quantize as _kq
from gdnsq_kernels import reference as _kref

from .quantizers import ActivationQuantizer, WeightQuantizer, _check_bits, aewgs_grads


@dataclass
class _Cfg:
    """Non-tensor arguments of the fused Function."""
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


class _FusedQuantLayer(torch.autograd.Function):
    """``op(quantize_activation(x), quantize_weight(w), b)`` with recomputation in backward.

    Inputs: x, weight, bias (or None), activation log2_step / log2_range / offset (all None when
    inputs are not quantized), weight log2_step, cfg. Saved: x, weight (a parameter: no new
    bytes), quantized weight, zero points, parameters (0-d / (C_out,)), seeds.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_step, a_range, a_off, w_step, cfg):
        has_act = a_step is not None
        # Seed order (activation first, then weight) mirrors the composition's call order.
        a_seed = _kq.new_seed() if (has_act and cfg.a_dither) else 0
        w_seed = _kq.new_seed() if cfg.w_dither else 0
        xq = _kq.activation_forward(x, a_step, a_range, a_off) if has_act else x
        w_hat, zero_point = _kq.weight_forward(weight, w_step)
        # Under autocast the quantizers still run in float32 (METHOD Part A item 8); only the
        # conv/linear runs in the autocast dtype, cast here explicitly so that the backward,
        # which runs outside autocast, sees the same dtypes.
        dev = x.device.type
        cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if cast is not None:
            with torch.autocast(dev, enabled=False):
                out = _op_forward(cfg, xq.to(cast), w_hat.to(cast), None if bias is None else bias.to(cast))
        else:
            out = _op_forward(cfg, xq, w_hat, bias)
        ctx.save_for_backward(x, weight, w_hat, zero_point, a_step, a_range, a_off, w_step)
        ctx.cfg, ctx.has_act, ctx.has_bias = cfg, has_act, bias is not None
        ctx.seeds = (a_seed, w_seed)
        ctx.cast = cast
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, w_hat, zero_point, a_step, a_range, a_off, w_step = ctx.saved_tensors
        cfg, has_act = ctx.cfg, ctx.has_act
        a_seed, w_seed = ctx.seeds
        nx, nw, nb, nas, nar, nao, nws = ctx.needs_input_grad[:7]
        need_act_params = has_act and (nas or nar or nao)
        need_in = nx or need_act_params
        need_w = nw or nws
        # Recompute the quantized input instead of having stored it (the memory saving).
        xq = _kq.activation_forward(x, a_step, a_range, a_off) if has_act else x
        grad_out = grad_out.contiguous()
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
                gx, gas, gar, gao = _kq.activation_backward(
                    g_xq, x, a_step, a_range, a_off, a_seed, cfg.a_dither,
                    need_grad_x=nx, need_grad_params=need_act_params)
                gas = gas.reshape(a_step.shape).to(a_step.dtype) if nas else None
                gar = gar.reshape(a_range.shape).to(a_range.dtype) if nar else None
                gao = gao.reshape(a_off.shape).to(a_off.dtype) if nao else None
                gx = gx if nx else None
            else:
                gx = g_xq
        if need_w:
            aewgs = cfg.estimator == "aewgs"
            gw, gws = _kq.weight_backward(g_w_hat, weight, w_step, zero_point, w_seed, cfg.w_dither,
                                          need_grad_w=nw and not aewgs, need_grad_step=nws)
            if aewgs:
                gw, extra = aewgs_grads(g_w_hat, weight, w_step, zero_point)
                gw = gw if nw else None
                if nws:
                    gws = gws.reshape(w_step.shape).float() + extra
            gws = gws.reshape(w_step.shape).to(w_step.dtype) if nws else None
        return gx, gw, g_b, gas, gar, gao, gws, None


class _QuantMixin:
    """Shared logic of QConv2d and QLinear (set up by ``_init_quant``)."""

    weight_quantizer: WeightQuantizer
    act_quantizer: ActivationQuantizer | None

    def _init_quant(self, weight_bits, act_bits, signed, estimator, per_channel, dither):
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
        out = _FusedQuantLayer.apply(x, self.weight, self.bias, a[0], a[1], a[2], wq.log2_step, cfg)
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


def _check_bits_arg(value, name, allow_none):
    if value is None and allow_none:
        return None
    return _check_bits(value, name)


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
        weight_bits = _check_bits_arg(weight_bits, "weight_bits", False)
        act_bits = _check_bits_arg(act_bits, "act_bits", True)
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
        weight_bits = _check_bits_arg(weight_bits, "weight_bits", False)
        act_bits = _check_bits_arg(act_bits, "act_bits", True)
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
