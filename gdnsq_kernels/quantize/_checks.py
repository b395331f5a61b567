"""Argument validation shared by the public quantizer ops and every backend.

Bad input raises one-line ValueError/TypeError naming the argument and what was expected.
Checks look only at metadata (shape, dtype, device), never at values, so they cost no device
synchronisation.
"""
from __future__ import annotations

import torch

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for an input dtype: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_grad_dtype(grad_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel reads an upstream gradient in: ``x_dtype`` when the gradient has it,
    else the compute dtype, where the reference takes it (a float32 gradient of a bfloat16 input
    is not rounded to bfloat16 before the parameter sums)."""
    return x_dtype if grad_dtype == x_dtype else compute_dtype(x_dtype)


def check_input(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def check_scalar_param(p, name: str, like: torch.Tensor) -> None:
    """A per-tensor parameter: floating tensor, 0-d or shape (1,), on ``like``'s device."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (0-d or shape (1,)), got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    if p.dim() > 1 or p.numel() != 1:
        raise ValueError(f"{name} must be a 0-d or shape (1,) tensor, got shape {tuple(p.shape)}")
    if p.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the input, got {p.device}")


def check_activation_args(x, log2_step, log2_range, offset) -> None:
    check_input(x, "x")
    check_scalar_param(log2_step, "log2_step", x)
    check_scalar_param(log2_range, "log2_range", x)
    check_scalar_param(offset, "offset", x)


def check_weight_args(w, log2_step) -> None:
    check_input(w, "w")
    if w.dim() < 1:
        raise ValueError("w must have at least one dimension (C_out, ...), got a 0-d tensor")
    if not isinstance(log2_step, torch.Tensor):
        raise TypeError(f"log2_step must be a torch.Tensor, got {type(log2_step).__name__}")
    if not log2_step.is_floating_point():
        raise TypeError(f"log2_step must be a floating-point tensor, got {log2_step.dtype}")
    c_out = w.shape[0]
    per_tensor = log2_step.dim() <= 1 and log2_step.numel() == 1
    per_channel = log2_step.dim() == 1 and log2_step.shape[0] == c_out
    if not (per_tensor or per_channel):
        raise ValueError(
            f"log2_step must have shape (C_out,)=({c_out},) or be one element, "
            f"got shape {tuple(log2_step.shape)}"
        )
    if log2_step.device != w.device:
        raise ValueError(f"log2_step must be on {w.device} like w, got {log2_step.device}")


def check_grad(grad, like: torch.Tensor, name: str) -> None:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != like.shape:
        raise ValueError(f"{name} must have the input's shape {tuple(like.shape)}, got {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {grad.dtype}")


def check_seed(seed) -> None:
    """An int, or a one-element int64/int32 tensor (its value is not read: no sync). Every
    backend, the reference included, takes each of them (only the low 32 bits matter)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int64, torch.int32) or seed.numel() != 1:
            raise TypeError(f"seed must be an int or a one-element int64 tensor, got a {seed.dtype} "
                            f"tensor of shape {tuple(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a one-element int64 tensor, got {type(seed).__name__}")


def check_zero_point(zero_point, w: torch.Tensor) -> None:
    if not isinstance(zero_point, torch.Tensor):
        raise TypeError(f"zero_point must be a torch.Tensor, got {type(zero_point).__name__}")
    if zero_point.shape != (w.shape[0],):
        raise ValueError(
            f"zero_point must have shape (C_out,)=({w.shape[0]},), got {tuple(zero_point.shape)}"
        )


def row_len(w: torch.Tensor) -> int:
    """Elements per output channel of a (C_out, ...) tensor (works when C_out == 0)."""
    n = 1
    for d in w.shape[1:]:
        n *= d
    return n
