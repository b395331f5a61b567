"""The convergence step at an epoch end (METHOD Part B §4.5): probe, DDP sync, test, hold, anneal.

A student is converged when every layer's realised weight bits (from its integer codes) and
every activation quantizer's observed bits (the code range of its last eval-mode batch) are at
most their targets (:func:`gdnsq.stats.is_converged`). The activation half needs an eval-mode
forward after the last update, and under DDP each rank has seen different batches, so the
observed bits are max-reduced over ranks first: every rank then takes the same decision and
their LRs stay equal.

Example (any loop; ``schedule`` a :class:`gdnsq.GDNSQSchedule`)::

    tracker = gdnsq.ConvergenceTracker(student, schedule)
    for epoch in range(epochs):
        ...train one epoch...
        status = tracker.step(next(iter(val_loader)))   # or tracker.step() after a validation pass
        print(status.converged, status.annealing)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ._dist import all_reduce
from .batches import ForwardFn, check_forward_fn
from .stats import is_converged, quantized_layers


@torch.no_grad()
def sync_observed_bits(student: nn.Module) -> None:
    """Max-reduce every enabled activation quantizer's ``observed_bits`` over the ranks, in
    place (one collective; nothing happens without a process group)."""
    quantizers = [layer.act_quantizer for _, layer in quantized_layers(student)
                  if layer.act_quantizer is not None and layer.act_quantizer.enabled]
    if not quantizers:
        return
    observed = torch.stack([aq.observed_bits.reshape(()).float() for aq in quantizers])
    observed = all_reduce(observed, "max")
    for aq, bits in zip(quantizers, observed):
        aq.observed_bits.copy_(bits)


@dataclass(frozen=True)
class ConvergenceStatus:
    """Result of one :meth:`ConvergenceTracker.step`.

    converged: realised bits <= targets now (every rank agrees).
    held: the schedule's hold after the first convergence is over (False without a schedule).
    annealing: the schedule anneals the LR from the next step on (False without a schedule).
    first_converged: 1-based index of the first check that passed (None before it, and
        without a schedule).
    """

    converged: bool
    held: bool
    annealing: bool
    first_converged: Optional[int]


class ConvergenceTracker:
    """The convergence step users call once per epoch end.

    Args:
        student: the GDNSQ student itself (not a DDP wrapper).
        schedule: the :class:`gdnsq.GDNSQSchedule` to tell (it applies the hold and anneals);
            None only tests.
        forward_fn: ``forward_fn(model, batch)`` runs the student on one batch of the caller's
            loader (default :func:`gdnsq.batches.default_forward`: tensors, ``(inputs, labels)``
            and dict batches, ``model(**batch)`` for a Hugging Face batch).
    """

    def __init__(self, student: nn.Module, schedule=None, *, forward_fn: Optional[ForwardFn] = None):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if isinstance(student, nn.parallel.DistributedDataParallel):
            raise TypeError("student: pass the module inside the DistributedDataParallel wrapper (.module)")
        if schedule is not None and not hasattr(schedule, "set_converged"):
            raise TypeError(f"schedule must be a gdnsq.GDNSQSchedule or None, got {type(schedule).__name__}")
        self.student = student
        self.schedule = schedule
        self.forward_fn = check_forward_fn(forward_fn)

    @torch.no_grad()
    def probe(self, batch) -> None:
        """One eval-mode forward of the student on ``batch`` (records the observed bits); the
        student's train/eval mode is restored."""
        was_training = self.student.training
        self.student.eval()
        try:
            self.forward_fn(self.student, batch)
        finally:
            self.student.train(was_training)

    def step(self, batch=None) -> ConvergenceStatus:
        """Probe on ``batch`` (skip it with None when an eval pass just ran, e.g. a
        validation), max-sync the observed bits over ranks, test convergence and tell the
        schedule. Reads a few values from the device (once per epoch)."""
        if batch is not None:
            self.probe(batch)
        sync_observed_bits(self.student)
        converged = bool(is_converged(self.student))
        if self.schedule is None:
            return ConvergenceStatus(converged, False, False, None)
        self.schedule.set_converged(converged)
        return ConvergenceStatus(converged, self.schedule.held, self.schedule.annealing,
                                 self.schedule.first_converged)
