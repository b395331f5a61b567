"""Quantized layers: ``QConv2d`` and ``QLinear`` (weights and inputs fake-quantized by GDNSQ).

In training each layer runs one fused custom op (``gdnsq::qconv2d`` / ``gdnsq::qlinear``,
registered with its backward in ``gdnsq_kernels.quantize.fused_layers``; in eager autograd the
same forward and backward run as an autograd Function, without the op's dispatch overhead) that
saves only the FP input and recomputes the quantized input in its backward, which keeps activation
memory near the FP network's. The plain composition ``conv(quantize_activation(x), quantize_weight(w))`` runs
with ``fused=False``; gradients are identical for the same seeds (tests/test_layers.py).
"""
from __future__ import annotations

import torch
from torch import nn

from gdnsq_kernels import quantize as _kq
from gdnsq_kernels.quantize import reference as _kref
from gdnsq_kernels.quantize.fused_layers import LayerConfig, fused_layer, layer_forward

from .quantizers import ActivationQuantizer, WeightQuantizer, _check_bits


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

    def _quant_forward(self, x: torch.Tensor, cfg: LayerConfig) -> torch.Tensor:
        if self._fp_passthrough:
            return layer_forward(cfg, x, self.weight, self.bias)
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
            return layer_forward(cfg, xq, w_hat, bias)
        if not self.fused:
            xq = aq(x) if act else x
            return layer_forward(cfg, xq, wq(self.weight), self.bias)
        cfg.estimator, cfg.w_dither = wq.estimator, wq.dither
        cfg.a_dither = aq.dither if act else False
        a = aq.params() if act else (None, None, None)
        out = fused_layer(cfg, x, self.weight, self.bias, a[0], a[1], a[2], wq.log2_step)
        if act and not aq.training:
            with torch.no_grad():
                aq.observe_output(_kq.activation_forward(x.detach(), *[p.detach() for p in aq.params()]))
        return out

    def _exact_forward(self, x, xq, cfg: LayerConfig, act: bool, bias):
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
        out = layer_forward(cfg, x64, w64, None if bias is None else bias.double())
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
        cfg = LayerConfig("conv", self.stride, self.padding, self.dilation, self.groups)
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
        return self._quant_forward(x, LayerConfig("linear"))
