"""The GDNSQ pieces of docs/method.md wired for a framework's training loop.

:class:`GDNSQLoop` holds the student, its teacher, a :class:`gdnsq.GDNSQObjective`, a
:class:`gdnsq.GDNSQSchedule` and a :class:`gdnsq.ConvergenceTracker`, and offers the three
things a framework hook needs: the loss of one training step, the convergence step at an epoch
end, and one state (``state_dict`` / ``save``) for the framework's checkpoints. The Hugging Face
and Lightning integrations are thin adapters over it; a hand-written loop can use it too.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Optional, Union

import torch
from torch import nn

from .._sealed import read_sealed, write_sealed
from ..batches import ForwardFn, check_forward_fn
from ..convergence import ConvergenceStatus, ConvergenceTracker
from ..convert import teacher_of
from ..losses import GDNSQObjective
from ..schedule import GDNSQSchedule

#: ``format`` tag of :meth:`GDNSQLoop.state_dict` (and of the state file it saves).
STATE_FORMAT = "gdnsq.integrations.state"
STATE_VERSION = 1


def output_logits(outputs) -> torch.Tensor:
    """The logits in a model's outputs: a tensor itself, ``outputs.logits`` (a Hugging Face
    ``ModelOutput``), ``outputs["logits"]``, or the first element of a tuple."""
    if torch.is_tensor(outputs):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not torch.is_tensor(logits):
        raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}; give "
                        "logits_fn(outputs) -> tensor")
    return logits


class GDNSQLoop:
    """Student, teacher, objective, schedule and convergence step, for one framework loop.

    Args:
        student: the GDNSQ student (from :func:`gdnsq.quantize_model`, calibrated).
        schedule: its :class:`gdnsq.GDNSQSchedule` (built on the optimizer the framework steps).
        teacher: True (default): the student's own frozen FP copy (:func:`gdnsq.teacher_of`),
            distillation with the Jeffreys divergence; an ``nn.Module``: that teacher (put in
            eval mode); False: no teacher, the base loss is the task loss (labels).
        objective: a :class:`gdnsq.GDNSQObjective` of the student (default: a new one).
        forward_fn: ``forward_fn(model, batch)`` runs a model on one loader batch (the teacher
            in :meth:`training_loss`, the student in the convergence probe); default
            :func:`gdnsq.batches.default_forward` (tensors, ``(inputs, labels)``, dicts,
            ``model(**batch)`` for a Hugging Face batch).
        logits_fn: ``logits_fn(outputs)`` -> logits tensor; default :func:`output_logits`.

    State (:meth:`state_dict`): the objective's ``mu`` buffers and the schedule's step count,
    ``rho`` and hold, i.e. ``t``, the LRs and the hold follow from it after loading.
    """

    def __init__(self, student: nn.Module, schedule: GDNSQSchedule, *,
                 teacher: Union[bool, nn.Module] = True, objective: Optional[GDNSQObjective] = None,
                 forward_fn: Optional[ForwardFn] = None, logits_fn: Optional[Callable] = None):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(schedule, GDNSQSchedule):
            raise TypeError(f"schedule must be a gdnsq.GDNSQSchedule, got {type(schedule).__name__}")
        if teacher is True:
            teacher = teacher_of(student)
        elif teacher is False:
            teacher = None
        elif isinstance(teacher, nn.Module):
            teacher.eval()
        else:
            raise TypeError(f"teacher must be True, False or an nn.Module, got {type(teacher).__name__}")
        if objective is None:
            objective = GDNSQObjective(student)
        elif not isinstance(objective, GDNSQObjective):
            raise TypeError(f"objective must be a gdnsq.GDNSQObjective, got {type(objective).__name__}")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"logits_fn must be a callable (outputs) -> tensor, got {type(logits_fn).__name__}")
        self.student = student
        self.teacher = teacher
        self.objective = objective
        self.schedule = schedule
        self.forward_fn = check_forward_fn(forward_fn)
        self.logits_fn = logits_fn or output_logits
        self.tracker = ConvergenceTracker(student, schedule, forward_fn=self.forward_fn)
        #: the last training batch seen by :meth:`training_loss` (the default convergence probe)
        self.last_batch = None
        #: ``parts`` of the last :meth:`training_loss` (detached tensors; :func:`gdnsq.read_parts`)
        self.last_parts: Optional[dict] = None

    def training_loss(self, student_outputs, batch, *, labels: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, task_loss: Optional[torch.Tensor] = None):
        """``(loss, parts)`` of one step at the schedule's current ``t``.

        ``student_outputs``: what the student returned on ``batch`` (logits, or outputs holding
        them). With a teacher, the base loss is the Jeffreys divergence to the teacher's logits
        on ``batch`` (run under ``no_grad``; ``mask`` (B, T) for token-level (B, T, V) logits).
        Without one, it is ``task_loss`` when given (a 0-d tensor, e.g. ``outputs.loss``), else
        the cross-entropy with ``labels``. Calls in training mode record ``batch`` as the
        convergence probe and feed ``mu``.
        """
        t = self.schedule.t
        if self.student.training:
            self.last_batch = batch
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.logits_fn(self.forward_fn(self.teacher, batch))
            loss, parts = self.objective(self.logits_fn(student_outputs), teacher_logits, t, mask=mask)
        elif task_loss is not None:
            loss, parts = self.objective.add_penalty(task_loss, t)
        elif labels is not None:
            loss, parts = self.objective(self.logits_fn(student_outputs), None, t, labels=labels, mask=mask)
        else:
            raise ValueError("training_loss: without a teacher, give task_loss or labels")
        self.last_parts = parts
        return loss, parts

    def epoch_end(self, batch=None) -> ConvergenceStatus:
        """The convergence step (:meth:`gdnsq.ConvergenceTracker.step`): probe on ``batch``
        (default: the last training batch), DDP max-sync, test, hold, anneal."""
        if batch is None:
            batch = self.last_batch
        return self.tracker.step(batch)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"format", "version", "objective": {loss_sum, count}, "schedule": {...}}``: CPU
        tensors and plain Python values (loads with ``torch.load(weights_only=True)``)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "objective": {k: v.detach().cpu().clone() for k, v in self.objective.state_dict().items()},
                "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the schedule also writes its LRs into the optimizer)."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state is not a gdnsq integration state (format {STATE_FORMAT!r} expected)")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state has version {state.get('version')!r}; this gdnsq reads version {STATE_VERSION}")
        self.objective.load_state_dict(state["objective"])
        self.schedule.load_state_dict(state["schedule"])

    def save(self, path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically, checksummed (a damaged file is refused)."""
        write_sealed(self.state_dict(), os.fspath(path))

    def load(self, path) -> None:
        """Load a file written by :meth:`save` (``weights_only``; refused when damaged)."""
        self.load_state_dict(read_sealed(os.fspath(path)))
