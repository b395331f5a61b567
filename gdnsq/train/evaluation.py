"""Evaluation of a student in eval mode: top-1, cross-entropy and the realised activation bits,
summed over the ranks of a sharded loader (the Trainer's validation, probe and test passes)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as gdist
from ..stats import quantized_layers


def split_batch(batch):
    """(inputs, labels or None) from a loader batch: a tensor, or a tuple/list (x, y, ...), or a
    dict with ``"input"`` (and ``"label"``)."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"], batch.get("label")
    raise TypeError("Trainer: a batch must be a tensor, a (inputs, labels) tuple/list or a dict with "
                    f"'input' (and 'label'), got {type(batch).__name__}")


def is_sharded(loader) -> bool:
    """True when ``loader`` draws from a DistributedSampler (each rank sees its own shard)."""
    from torch.utils.data.distributed import DistributedSampler
    return any(isinstance(s, DistributedSampler) for s in (
        getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)))


@torch.no_grad()
def evaluate(student: nn.Module, loader, *, device: torch.device, prepare_input: Callable,
             max_batches: Optional[int] = None) -> dict:
    """Evaluate ``student`` in eval mode (its mode is restored afterwards).

    Args:
        prepare_input: maps a batch's input tensor to the student's input (device, memory format).
        max_batches: stop after this many batches (None: the whole loader).
    Returns ``{"top1": percent or None, "n": images, "loss": mean cross-entropy or None,
    "act_bits_max": {layer: max over batches of the activation quantizer's realised bits}}``
    (top1 and loss None without labels). Under DDP the counts are summed over ranks when
    ``loader`` is sharded by a DistributedSampler (which pads the last round with repeats), and
    ``act_bits_max`` is max-reduced, so every rank returns the same numbers.
    """
    was_training = student.training
    student.eval()
    layers = [(n, l) for n, l in quantized_layers(student)
              if getattr(l, "act_quantizer", None) is not None and l.act_quantizer.enabled]
    act_max = {n: torch.full((), -math.inf, device=device) for n, _ in layers}
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_seen = 0
    n_labelled = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            x = prepare_input(x)
            logits = student(x)
            n_seen += x.shape[0]
            if y is not None:
                y = y.to(device, non_blocking=True)
                correct += (logits.argmax(dim=1) == y).sum().double()
                loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                n_labelled += y.numel()
            for n, l in layers:
                ob = l.act_quantizer.observed_bits.to(device)
                act_max[n] = torch.maximum(act_max[n], ob.float())
    finally:
        student.train(was_training)
    counts = torch.tensor([float(n_seen), float(n_labelled)], dtype=torch.float64, device=device)
    if gdist.is_distributed():
        if is_sharded(loader):
            counts = gdist.all_reduce_sum(counts)
            correct = gdist.all_reduce_sum(correct)
            loss_sum = gdist.all_reduce_sum(loss_sum)
        for n in act_max:
            act_max[n] = gdist.all_reduce_max(act_max[n])
    n_seen, n_labelled = int(counts[0].item()), int(counts[1].item())
    top1 = 100.0 * correct.item() / n_labelled if n_labelled else None
    loss = loss_sum.item() / n_labelled if n_labelled else None
    return {"top1": top1, "n": n_seen, "loss": loss,
            "act_bits_max": {n: float(v) for n, v in act_max.items()}}
