"""GDNSQ schedule: learning rate per batch and penalty weight t (METHOD Part B §3.3, §4.4), as a
``torch.optim.lr_scheduler.LRScheduler``, and the parameter groups it drives.

With ``n`` the number of optimizer steps taken so far (0 on the first batch) and ``base_g`` the
initial LR of parameter group ``g``:

* LR of group ``g``: ``0`` at n = 0 (the first step does nothing), ``base_g * n / warmup_steps``
  for ``n <= warmup_steps``, then ``base_g * rho``; ``rho`` starts at 1 and is multiplied by
  ``anneal`` on every step after warm-up while the schedule anneals. It anneals once a
  convergence check (``set_converged(True)``, one per epoch end) passes and ``hold_epochs``
  checks have passed since the first one that did. A failed check freezes rho; there is no
  re-warm. With ``shape="cosine"`` rho instead follows a half cosine from 1 at the first
  annealed step to 0 at ``total_steps`` (the planned end of training):
  ``rho = (1 + cos(pi * k / K)) / 2`` after ``k`` annealed steps, ``K = total_steps - n0`` and
  ``n0`` the step annealing started at; a failed check freezes ``k``.
* Penalty weight: ``t = 0`` during warm-up, then ``t = t_scale * lr0 * (n - warmup_steps)``
  (grows by ``t_scale * lr0`` per step, ``lr0`` the initial LR, not the current one).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .quantizers import ActivationQuantizer, WeightQuantizer


def _pos(value, name, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def param_groups(student: nn.Module, lr: float, quantizer_lr_scale: float = 1.0) -> list:
    """Optimizer parameter groups of a GDNSQ student: its own parameters at ``lr`` and the
    quantizer parameters (log2 steps, log2 ranges, offsets) at ``lr * quantizer_lr_scale``.

    Returns ``[{"params": [...], "lr": lr, "name": "model"}, {"params": [...], "lr": lr *
    quantizer_lr_scale, "name": "quantizer"}]`` without empty groups and without parameters
    that do not require grad (pruned quantizers, a frozen offset), for any torch optimizer:
    ``torch.optim.RAdam(gdnsq.param_groups(student, 2e-3, 4.0), weight_decay=0.0)``.

    The paper uses one LR (scale 1). RAdam moves each log2 parameter by about its LR per step
    once the penalty dominates, so the bit-widths fall at a rate set by the quantizer LR, while
    the weights of a pretrained model want a smaller LR; a scale > 1 separates the two.
    """
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    lr = float(_pos(lr, "lr"))
    scale = float(_pos(quantizer_lr_scale, "quantizer_lr_scale"))
    quantizer_ids = set()
    for module in student.modules():
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            quantizer_ids.update(id(p) for p in module.parameters())
    model_params, quantizer_params = [], []
    for p in student.parameters():
        if p.requires_grad:
            (quantizer_params if id(p) in quantizer_ids else model_params).append(p)
    groups = [{"params": model_params, "lr": lr, "name": "model"},
              {"params": quantizer_params, "lr": lr * scale, "name": "quantizer"}]
    return [g for g in groups if g["params"]]


ANNEAL_SHAPES = ("exponential", "cosine")


class GDNSQSchedule(LRScheduler):
    """LR warm-up / constant until converged (plus a hold) / per-batch annealing, and ``t``.

    Args:
        optimizer: any torch optimizer; each group keeps its own initial LR as its peak
            (:func:`param_groups` gives the quantizer group a larger one).
        warmup_steps: batches of linear warm-up (1000 CIFAR, 100 ImageNet); ``t = 0`` meanwhile.
        t_scale: t increment per batch after warm-up, in units of ``lr0`` (2.0).
        anneal: per-batch LR factor while annealing (0.9985 CIFAR, 0.9995 ImageNet).
        hold_epochs: convergence checks (:meth:`set_converged` calls, one per epoch) after the
            first passing one before annealing starts (0: anneal from it on, the paper's rule).
        lr0: the LR that ``t_scale`` is in units of; default the first group's initial LR
            (the model group of :func:`param_groups`).
        shape: "exponential" (rho x ``anneal`` per annealed step, the paper's) or "cosine"
            (rho falls from 1 to 0 along a half cosine between the step annealing starts at
            and ``total_steps``; ``anneal`` is unused). Cosine suits a fixed budget: the LR
            reaches 0 exactly when training ends, wherever convergence happened.
        total_steps: optimizer steps of the whole planned run (epochs x batches per epoch);
            required by ``shape="cosine"``. May be raised later (``set_total_steps``) when a
            run is extended; the cosine then stretches over the new remainder.

    Use: construct it after the optimizer (it sets every group's LR to 0 for the first
    batch), pass ``schedule.t`` to the objective, call ``schedule.step()`` after each
    ``optimizer.step()`` and ``set_converged(...)`` at epoch ends
    (:class:`gdnsq.ConvergenceTracker` does). ``state_dict()`` / ``load_state_dict()`` carry
    the step count, rho, t and the hold; loading also writes the current LRs into the groups.
    """

    def __init__(self, optimizer, warmup_steps: int, *, t_scale: float = 2.0, anneal: float = 0.9985,
                 hold_epochs: int = 0, lr0: Optional[float] = None, shape: str = "exponential",
                 total_steps: Optional[int] = None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.warmup_steps = _count(warmup_steps, "warmup_steps")
        self.t_scale = float(_pos(t_scale, "t_scale", allow_zero=True))
        anneal = _pos(anneal, "anneal")
        if anneal > 1:
            raise ValueError(f"anneal must be in (0, 1], got {anneal}")
        self.anneal = float(anneal)
        self.hold_epochs = _count(hold_epochs, "hold_epochs")
        if shape not in ANNEAL_SHAPES:
            raise ValueError(f"shape: expected one of {ANNEAL_SHAPES}, got {shape!r}")
        if shape == "cosine" and total_steps is None:
            raise ValueError("total_steps: shape='cosine' needs the planned number of optimizer steps")
        self.shape = shape
        self.total_steps = None if total_steps is None else _count(total_steps, "total_steps")
        self.anneal_start: Optional[int] = None  # step n at which annealing first ran (cosine)
        self.annealed_steps = 0        # steps taken while annealing (cosine)
        first = optimizer.param_groups[0]
        self.lr0 = float(_pos(first.get("initial_lr", first["lr"]) if lr0 is None else lr0, "lr0"))
        self.rho = 1.0
        self.checks = 0                # set_converged calls so far
        self.first_converged: Optional[int] = None  # 1-based index of the first passing check
        self.converged = False         # the last check's result
        self.annealing = False
        super().__init__(optimizer)    # takes the initial LRs, then steps to n = 0 (LR 0)

    # -- the schedule ----------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Optimizer steps taken so far (the batch about to run is step ``n``)."""
        return self.last_epoch

    def _factor(self) -> float:
        n = self.last_epoch
        if n <= 0:
            return 0.0
        if n <= self.warmup_steps:
            return n / self.warmup_steps
        return self.rho

    def get_lr(self) -> list:
        """The LR of every group for the current batch."""
        factor = self._factor()
        return [base * factor for base in self.base_lrs]

    @property
    def lr(self) -> float:
        """LR of the first group (the model group) for the current batch."""
        return float(self.base_lrs[0]) * self._factor()

    @property
    def t(self) -> float:
        """Penalty weight for the current batch."""
        return self.t_scale * self.lr0 * max(0, self.last_epoch - self.warmup_steps)

    @property
    def held(self) -> bool:
        """The hold after the first passing convergence check is over."""
        return self.first_converged is not None and self.checks - self.first_converged >= self.hold_epochs

    def step(self, epoch=None) -> None:
        """Advance by one optimizer step (batch); call it after ``optimizer.step()``."""
        if epoch is not None:
            raise TypeError("GDNSQSchedule.step() counts optimizer steps itself; it takes no epoch")
        if self.last_epoch >= 0 and self.last_epoch + 1 > self.warmup_steps and self.annealing:
            if self.shape == "cosine":
                if self.anneal_start is None:
                    self.anneal_start = self.last_epoch
                self.annealed_steps += 1
                self.rho = self._cosine_rho()
            else:
                self.rho *= self.anneal
        super().step()

    def _cosine_rho(self) -> float:
        span = max(1, self.total_steps - self.anneal_start)
        return 0.5 * (1.0 + math.cos(math.pi * min(self.annealed_steps, span) / span))

    def set_total_steps(self, total_steps: int) -> None:
        """Change the planned length (a resumed run with a raised epoch limit); a cosine
        already under way continues from its current step over the new remainder."""
        self.total_steps = _count(total_steps, "total_steps")
        if self.shape == "cosine" and self.anneal_start is not None:
            self.rho = self._cosine_rho()
            self._write_lrs()

    def _write_lrs(self) -> None:
        """Put the current batch's LRs into the optimizer groups (after a state change)."""
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def set_converged(self, flag: bool) -> None:
        """Record one convergence check (at an epoch end): annealing runs from the next step
        while ``flag`` is true and the hold is over."""
        self.checks += 1
        self.converged = bool(flag)
        if self.converged and self.first_converged is None:
            self.first_converged = self.checks
        self.annealing = self.converged and self.held

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain Python values (loads with ``torch.load(weights_only=True)``); ``t`` and
        ``lr`` are included for readers and recomputed on load."""
        return {**super().state_dict(), "t": self.t, "lr": self.lr}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (or the optimizer-less schedule state of gdnsq <= 0.1,
        whose hold the caller restores) and write the current LRs into the groups."""
        state = dict(state_dict)
        if "last_epoch" not in state:
            state = self._from_legacy(state)
        state.pop("t", None)
        state.pop("lr", None)
        # The shape and the planned length are configuration: the constructor's win (a run
        # resumed with a raised epoch limit stretches its cosine over the new remainder).
        state.pop("shape", None)
        state.pop("total_steps", None)
        self.__dict__.update(state)
        if self.shape == "cosine" and self.anneal_start is not None:
            self.rho = self._cosine_rho()
        self._write_lrs()

    def _from_legacy(self, state: dict) -> dict:
        missing = {"n", "rho", "converged"} - set(state)
        if missing:
            raise ValueError(f"schedule state is missing {sorted(missing)}")
        new = {"last_epoch": int(state["n"]), "_step_count": int(state["n"]) + 1, "rho": float(state["rho"]),
               "converged": bool(state["converged"]), "annealing": bool(state["converged"])}
        for key in ("lr0", "warmup_steps", "t_scale", "anneal"):
            if key in state:
                new[key] = type(getattr(self, key))(state[key])
        return new

    def __repr__(self) -> str:
        return (f"GDNSQSchedule(warmup_steps={self.warmup_steps}, t_scale={self.t_scale:g}, anneal={self.anneal:g}, "
                f"shape={self.shape}, total_steps={self.total_steps}, "
                f"hold_epochs={self.hold_epochs}, lr0={self.lr0:g}; n={self.n}, lr={self.lr:g}, t={self.t:g}, "
                f"converged={self.converged}, annealing={self.annealing})")
