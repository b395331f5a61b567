"""How the method's helpers run a model on one batch of a loader (``calibrate``, the
convergence probe): a ``forward_fn(model, batch)`` of the caller's, or :func:`default_forward`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import nn

#: ``forward_fn(model, batch)``: run ``model`` on one loader batch (on the model's device).
ForwardFn = Callable[[nn.Module, object], object]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(batch, device):
    """``batch`` with every tensor in it (nested in tuples, lists and mappings; a mapping comes
    back as a dict) moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch):
    """Run ``model`` on one batch, moved to the model's device:

    * a tensor: ``model(batch)``;
    * a tuple or list ``(inputs, labels, ...)``: ``model(inputs)``;
    * a dict with an ``"input"`` key (gdnsq's loaders): ``model(batch["input"])``;
    * any other dict or mapping (a Hugging Face batch): ``model(**batch)``.
    """
    device = model_device(model)
    if torch.is_tensor(batch):
        return model(batch.to(device, non_blocking=True))
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return model(batch[0].to(device, non_blocking=True))
    if isinstance(batch, Mapping):
        if "input" in batch:
            return model(to_device(batch["input"], device))
        return model(**to_device(batch, device))
    raise TypeError("a loader batch must be a tensor, a tuple/list (inputs, labels, ...) or a dict; give a "
                    f"forward_fn(model, batch) for other batches, got {type(batch).__name__}")


def check_forward_fn(forward_fn: Optional[ForwardFn]) -> ForwardFn:
    """``forward_fn`` itself, or :func:`default_forward` for None; TypeError for a non-callable."""
    if forward_fn is None:
        return default_forward
    if not callable(forward_fn):
        raise TypeError(f"forward_fn must be a callable (model, batch) -> outputs, got {type(forward_fn).__name__}")
    return forward_fn
