"""Bit-width statistics of a GDNSQ student: per-layer continuous and realised bits, convergence.

* Continuous bits (what the penalty sees): weights ``log2((max_c - min_c)/s_c + 1)`` per channel,
  activations ``log2_range - log2_step``.
* Realised bits (what the convergence test uses, METHOD Part B §4.5): weights
  ``max_c log2(k_max - k_min + 1)`` from the integer codes of the current weights; activations
  the code range of the last eval-mode batch (``observed_bits``; +inf before any eval batch).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import QConv2d, QLinear

#: Slack for comparing log2 level counts with targets (log2 of an integer count is exact).
_TOL = 1e-6


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(name, layer)] of every QConv2d / QLinear in ``named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]


def _act(layer):
    aq = layer.act_quantizer
    return aq if (aq is not None and aq.enabled) else None


@torch.no_grad()
def realised_bits(model: nn.Module) -> dict[str, dict[str, float | None]]:
    """{name: {"weight": bits, "act": bits or None}} (act None when the input is not quantized)."""
    out = {}
    for name, layer in quantized_layers(model):
        aq = _act(layer)
        out[name] = {"weight": layer.realised_weight_bits(),
                     "act": None if aq is None else float(aq.observed_bits)}
    return out


@torch.no_grad()
def continuous_bits(model: nn.Module) -> dict[str, dict[str, float | None]]:
    """{name: {"weight": mean over channels, "weight_max": max over channels, "act": bits or None}}."""
    out = {}
    for name, layer in quantized_layers(model):
        wb = layer.continuous_weight_bits()
        aq = _act(layer)
        out[name] = {"weight": float(wb.mean()), "weight_max": float(wb.max()),
                     "act": None if aq is None else float(aq.continuous_bits())}
    return out


@torch.no_grad()
def mean_bits(model: nn.Module) -> dict[str, float]:
    """{"weight": mean over layers of the channel-mean continuous bits, "act": mean over the
    (non-pruned) activation quantizers of ``log2_range - log2_step``} (NaN when there are none)."""
    w, a = [], []
    for _, layer in quantized_layers(model):
        w.append(float(layer.continuous_weight_bits().mean()))
        aq = _act(layer)
        if aq is not None and not bool(aq.pruned):
            a.append(float(aq.continuous_bits()))
    return {"weight": sum(w) / len(w) if w else math.nan, "act": sum(a) / len(a) if a else math.nan}


@torch.no_grad()
def is_converged(model: nn.Module) -> bool:
    """True when every layer's realised weight bits <= its weight target and every non-pruned
    activation quantizer's observed bits (last eval batch) <= its target.

    Targets are the quantizers' ``target_bits`` buffers. Needs an eval-mode forward pass after
    the last change (observed bits start at +inf, so an unobserved model is not converged).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no QConv2d/QLinear layers")
    for _, layer in layers:
        if layer.realised_weight_bits() > float(layer.weight_quantizer.target_bits) + _TOL:
            return False
        aq = _act(layer)
        if aq is not None and not bool(aq.pruned):
            if float(aq.observed_bits) > float(aq.target_bits) + _TOL:
                return False
    return True
