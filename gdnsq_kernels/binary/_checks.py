"""Argument conversions shared by :func:`binary_linear` and :func:`binary_conv2d`."""
from __future__ import annotations

import torch

__all__ = ["scalar_param", "bias_param"]


def scalar_param(v, name: str, device) -> torch.Tensor:
    """0-d float64 tensor from a number or a 0-d / 1-element tensor (per-tensor parameter)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor (per-tensor), got shape {tuple(v.shape)}")
        return v.detach().reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((), float(v), dtype=torch.float64, device=device)  # a fill, no H2D copy
    raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(v).__name__}")


def bias_param(bias, out_channels, device):
    """float64 (O,) copy of an optional bias tensor on ``device`` (None stays None)."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor of shape ({out_channels},) or None, got {type(bias).__name__}")
    if bias.numel() != out_channels:
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return bias.detach().reshape(-1).to(device=device, dtype=torch.float64)
