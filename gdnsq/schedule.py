"""GDNSQ schedule: learning rate and penalty weight t per batch (METHOD Part B §3.3, §4.4).

With ``n`` the number of optimizer steps taken so far (0 on the first batch):

* LR: ``0`` at n = 0 (the first step does nothing), ``lr0 * n / warmup_steps`` for
  ``n <= warmup_steps``, then ``lr0 * rho``; ``rho`` starts at 1 and is multiplied by
  ``anneal`` on every step after warm-up once the model is converged (``set_converged(True)``,
  called at train-epoch ends). Losing convergence freezes rho; there is no re-warm.
* Penalty weight: ``t = 0`` during warm-up, then ``t += t_scale * lr0`` on every step after it
  (the initial LR, not the current one), so ``t = t_scale * lr0 * (n - warmup_steps)``.
"""
from __future__ import annotations

from numbers import Real


def _pos(value, name, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class GDNSQSchedule:
    """LR warm-up / constant-until-converged / per-batch exponential annealing, and t.

    Args:
        lr0: base learning rate (0.002 for CIFAR in the paper).
        warmup_steps: batches of linear warm-up (1000 CIFAR, 100 ImageNet).
        t_scale: t increment per batch after warm-up, in units of lr0 (2.0).
        anneal: per-batch LR factor once converged (0.9985 CIFAR, 0.9995 ImageNet).

    Use: before each optimizer step set the LR to ``schedule.lr`` (``apply(optimizer)``) and
    pass ``schedule.t`` to the objective; call ``schedule.step()`` after the step.
    """

    def __init__(self, lr0: float, warmup_steps: int, t_scale: float = 2.0, anneal: float = 0.9985):
        self.lr0 = float(_pos(lr0, "lr0"))
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.t_scale = float(_pos(t_scale, "t_scale", allow_zero=True))
        anneal = _pos(anneal, "anneal")
        if anneal > 1:
            raise ValueError(f"anneal must be in (0, 1], got {anneal}")
        self.anneal = float(anneal)
        self.n = 0
        self.t = 0.0
        self.rho = 1.0
        self.converged = False

    @property
    def lr(self) -> float:
        """Learning rate for the current batch."""
        if self.n == 0:
            return 0.0
        if self.n <= self.warmup_steps:
            return self.lr0 * self.n / self.warmup_steps
        return self.lr0 * self.rho

    def apply(self, optimizer) -> float:
        """Write ``lr`` into every param group of ``optimizer``; returns it."""
        lr = self.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Advance by one optimizer step (batch)."""
        self.n += 1
        if self.n > self.warmup_steps:
            self.t += self.t_scale * self.lr0
            if self.converged:
                self.rho *= self.anneal

    def set_converged(self, flag: bool) -> None:
        """Record the convergence test's result (at train-epoch ends)."""
        self.converged = bool(flag)

    def state_dict(self) -> dict:
        return {"n": self.n, "t": self.t, "rho": self.rho, "converged": self.converged,
                "lr0": self.lr0, "warmup_steps": self.warmup_steps, "t_scale": self.t_scale,
                "anneal": self.anneal}

    def load_state_dict(self, state: dict) -> None:
        missing = {"n", "t", "rho", "converged"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.n, self.t, self.rho = int(state["n"]), float(state["t"]), float(state["rho"])
        self.converged = bool(state["converged"])
        for key in ("lr0", "warmup_steps", "t_scale", "anneal"):
            if key in state:
                setattr(self, key, type(getattr(self, key))(state[key]))

    def __repr__(self) -> str:
        return (f"GDNSQSchedule(lr0={self.lr0:g}, warmup_steps={self.warmup_steps}, "
                f"t_scale={self.t_scale:g}, anneal={self.anneal:g}; n={self.n}, lr={self.lr:g}, "
                f"t={self.t:g}, converged={self.converged})")
