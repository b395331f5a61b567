"""GDNSQ objective: a base loss plus the exterior-point bit-width penalty (METHOD Part B §3.2,
§3.4).

``L = D + t * mu * (omega_w * L_w + omega_a * L_a)`` with

* ``D`` the base loss: by default the Jeffreys divergence between student and teacher logits
  (token-level for (B, T, V) logits, with an optional mask), or the cross-entropy with the
  labels when no teacher logits are given; any other loss through a callable or as a
  precomputed 0-d tensor;
* ``L_w = mean_i max(0, b_w,i - (B_w,i - eps))`` over every output channel of every quantized
  layer, ``L_a`` the same over every non-pruned activation quantizer (p = 1, unweighted means
  over all constraints, active or not), targets ``B`` from each quantizer's ``target_bits``;
* ``omega_w = (n_w + eps)/(n_w + n_a + eps)``, ``omega_a = (n_a + eps)/(n_w + n_a + eps)`` from
  the active-constraint counts (no gradient);
* ``mu`` the running mean of ``D`` over the previous training steps (sum 0, count 1 at the start,
  so ``mu = 0`` at step 0; updated only while the student is in training mode).

Nothing here reads a tensor back to the host: counts, weights and ``mu`` stay tensors on the
loss's device, so a call never waits for the device and traces whole under
``torch.compile(fullgraph=True)``. :func:`read_parts` reads a call's parts for logging, in
one transfer.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import mean_over_ranks
from .stats import quantized_layers


def _check_temperature(temperature) -> float:
    """``temperature`` as a float, or a ValueError naming it."""
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return float(temperature)


def jeffreys_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        mask: Optional[torch.Tensor] = None, *, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * (KL(p_T || p_S) + KL(p_S || p_T))`` with both distributions taken at temperature
    ``T`` (``softmax(logits / T)``), summed over the last (class) axis, averaged over the positions.

    ``T = 1`` (the default) is the paper's divergence. ``T > 1`` softens both distributions,
    which matters when the teacher is nearly certain on the training images (one that trained on
    them: its ``T = 1`` targets are then almost one-hot and carry little beyond the label); the
    ``T^2`` factor keeps the gradients' scale comparable across temperatures (Hinton et al.,
    2015).

    Args:
        student_logits, teacher_logits: logits of the same shape, classes last: (N, K) for a
            classifier, (B, T, V) for a sequence model (token-level divergence), any float
            dtype (math in float32, float64 kept).
        mask: None (every position counts), or a bool / 0-1 tensor of the logits' shape
            without the class axis ((N,) or (B, T)): only positions where it is nonzero count,
            e.g. a tokenizer's ``attention_mask``. A mask with no nonzero entry gives 0.
        temperature: ``T`` > 0 (keyword only).
    Returns:
        0-d tensor, nats per position (per sample for (N, K) logits: ``batchmean``), times ``T^2``.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"student_logits and teacher_logits must have one shape (..., classes) with at "
                         f"least 2 dims, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    temperature = _check_temperature(temperature)
    ct = torch.promote_types(student_logits.dtype, torch.float32)  # float32 (float64 kept)
    # x / 1 and x * 1 are exact, so T = 1 gives the paper's values (and earlier runs') bit for bit
    ls = F.log_softmax(student_logits.to(ct) / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.to(ct) / temperature, dim=-1)
    # KL(T||S) + KL(S||T) = sum (p_T - p_S) (log p_T - log p_S)
    per_position = ((lt.exp() - ls.exp()) * (lt - ls)).sum(-1) * (temperature * temperature)
    if mask is None:
        return per_position.sum() / per_position.numel()
    if tuple(mask.shape) != tuple(per_position.shape):
        raise ValueError(f"mask must have the logits' shape without the class axis, "
                         f"{tuple(per_position.shape)}, got {tuple(mask.shape)}")
    weight = (mask != 0).to(ct)
    return (per_position * weight).sum() / weight.sum().clamp_min(1.0)


def _masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                          mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the positions (labels == -100 and mask == 0 are left out)."""
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if mask is not None:
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask must have the labels' shape {tuple(labels.shape)}, got {tuple(mask.shape)}")
        flat_labels = torch.where(mask.reshape(-1) != 0, flat_labels, torch.full_like(flat_labels, -100))
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)


class BitWidthPenalty:
    """Exterior-point hinge penalty on the continuous bit-widths of a student.

    ``penalty(student)`` returns a dict of tensors: ``loss_w``, ``loss_a`` (0-d, differentiable
    in the weights and the log2 parameters), ``omega_w``, ``omega_a`` (0-d, no gradient),
    ``active_w``, ``active_a`` (0-d int64: constraints with a positive hinge), ``count_w``,
    ``count_a`` (0-d int64: constraints). Pruned activation quantizers (``pruned`` buffer) are
    left out through a mask, so the call never reads a flag back from the device.
    """

    def __init__(self, epsilon: float = 1e-3, p: float = 1.0):
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.epsilon = float(epsilon)
        self.p = float(p)

    def constraint_bits(self, student: nn.Module):
        """(weight bits (N_w,), weight targets (N_w,), act bits (N_a,), act targets (N_a,),
        act kept (N_a,) bool: False for a pruned quantizer)."""
        wb, wt, ab, at, keep = [], [], [], [], []
        for _, layer in quantized_layers(student):
            wq = layer.weight_quantizer
            if wq.log2_step.requires_grad:
                b = wq.continuous_bits(layer.weight)
                wb.append(b)
                wt.append(wq.target_bits.to(b.dtype).expand(b.shape[0]))
            aq = layer.act_quantizer
            if aq is not None and aq.enabled:
                b = aq.continuous_bits().reshape(1)
                ab.append(b)
                at.append(aq.target_bits.to(b.dtype).reshape(1))
                keep.append(~aq.pruned.reshape(1).to(torch.bool))
        dev = next(student.parameters()).device

        def cat(xs, dtype=None):
            return torch.cat(xs) if xs else torch.zeros(0, device=dev, dtype=dtype)
        return cat(wb), cat(wt), cat(ab), cat(at), cat(keep, torch.bool)

    def __call__(self, student: nn.Module) -> dict:
        wb, wt, ab, at, keep = self.constraint_bits(student)
        hw = torch.clamp_min(wb - (wt - self.epsilon), 0.0)
        ha = torch.clamp_min(ab - (at - self.epsilon), 0.0)
        if self.p != 1.0:
            hw, ha = hw ** self.p, ha ** self.p
        ha = torch.where(keep, ha, torch.zeros_like(ha))
        zero = torch.zeros((), device=wb.device)
        count_w = torch.full((), hw.numel(), dtype=torch.int64, device=wb.device)
        count_a = keep.sum()
        loss_w = hw.mean() if hw.numel() else zero
        loss_a = ha.sum() / count_a.clamp_min(1).to(ha.dtype) if ha.numel() else zero
        n_w = (hw > 0).sum()
        n_a = (ha > 0).sum()
        # The side weights in float64, then cast to the penalty's dtype (as Python floats were).
        eps = self.epsilon
        nw64, na64 = n_w.detach().to(torch.float64), n_a.detach().to(torch.float64)
        denom = nw64 + na64 + eps
        return {"loss_w": loss_w, "loss_a": loss_a,
                "omega_w": ((nw64 + eps) / denom).to(loss_w.dtype),
                "omega_a": ((na64 + eps) / denom).to(loss_a.dtype),
                "active_w": n_w, "active_a": n_a, "count_w": count_w, "count_a": count_a}


def _checked_t(t):
    """``t`` as a number or a 0-d tensor."""
    if torch.is_tensor(t):
        if t.numel() != 1:
            raise ValueError(f"t must be a number or a one-element tensor, got shape {tuple(t.shape)}")
        return t.reshape(())
    if isinstance(t, bool) or not isinstance(t, Real):
        raise TypeError(f"t must be a number or a one-element tensor, got {type(t).__name__}")
    return t


class GDNSQObjective(nn.Module):
    """The GDNSQ loss of a student: a base loss ``D`` plus ``t * mu * (omega_w L_w + omega_a L_a)``.

    Three ways to call it; each returns ``(loss, parts)``, ``loss`` a 0-d tensor to backward:

    * ``objective(student_logits, teacher_logits, t, mask=None)``: ``D`` is
      :func:`jeffreys_divergence` at the objective's ``temperature`` (default 1, the paper's)
      ((N, K) or token-level (B, T, V) logits; ``mask`` (N,) or (B, T) selects the positions,
      e.g. an ``attention_mask``);
      ``objective(student_logits, None, t, labels=y, mask=None)``: ``D`` is the cross-entropy
      with ``labels`` ((N,) or (B, T) class indices; -100 and masked positions are ignored).
      With ``base_loss=fn`` given at construction, ``D = fn(student_logits, teacher_logits,
      labels)`` instead (any callable returning a 0-d tensor; either argument may be None).
    * ``objective.add_penalty(d, t)``: ``D`` is a loss the caller computed already (0-d tensor:
      a Hugging Face model's ``outputs.loss``, a task loss, a distillation loss of one's own).
    * ``objective.penalty_term(t)``: ``(t * mu * (omega_w L_w + omega_a L_a), parts)`` alone,
      without touching ``mu`` (to add to a loss elsewhere; ``objective.update_mu(d)`` then
      records that step's base loss).

    ``t`` is the schedule's penalty weight (:attr:`gdnsq.GDNSQSchedule.t`), a number or a
    one-element tensor. ``parts`` holds detached 0-d tensors (a number for a number ``t``):
    loss, distill (= D), penalty_w, penalty_a, omega_w, omega_a, active_w, active_a, mu, t.
    Read them with :func:`read_parts` (one device-to-host transfer) when logging.

    State: the running mean ``mu = loss_sum / count`` of ``D`` over the training-mode calls,
    in the buffers ``loss_sum`` ((1,) float64) and ``count`` ((1,) int64), so ``state_dict()`` /
    ``load_state_dict()`` carry it and a module that holds the objective (a LightningModule)
    checkpoints it with its own state. The student is referenced, not registered: the
    objective's ``state_dict`` holds only these two buffers. The buffers follow the loss's
    device on the first call after a move.

    ``reduce_fn``: applied to the detached ``D`` before it enters ``mu``. The default averages
    it over the ranks of an initialised process group (identity otherwise), so every rank holds
    the same ``mu`` under DDP; every rank must then call the objective on every training step.
    None uses each rank's own ``D``.
    """

    def __init__(self, student: nn.Module, epsilon: float = 1e-3, p: float = 1.0, *,
                 base_loss: Optional[Callable] = None, temperature: float = 1.0):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if base_loss is not None and not callable(base_loss):
            raise TypeError(f"base_loss must be a callable (student_logits, teacher_logits, labels) -> 0-d "
                            f"tensor, or None, got {type(base_loss).__name__}")
        # A plain attribute: the student is not a submodule of its objective.
        object.__setattr__(self, "student", student)
        self.penalty = BitWidthPenalty(epsilon=epsilon, p=p)
        self.base_loss = base_loss
        #: distillation temperature of the built-in Jeffreys base loss (not used by ``base_loss``)
        self.temperature = _check_temperature(temperature)
        self.reduce_fn: Optional[Callable] = mean_over_ranks
        param = next(student.parameters(), None)
        device = param.device if param is not None else None
        # Shape (1,), not 0-d: torch.compile drops in-place updates of 0-d float64 buffers.
        self.register_buffer("loss_sum", torch.zeros(1, dtype=torch.float64, device=device))
        self.register_buffer("count", torch.ones(1, dtype=torch.int64, device=device))

    @property
    def mu(self) -> torch.Tensor:
        """Running mean of D over the previous training steps (0-d float64; 0 before any)."""
        return (self.loss_sum / self.count).reshape(())

    def _follow(self, device: torch.device) -> None:
        if self.loss_sum.device != device:
            self.loss_sum = self.loss_sum.to(device)
            self.count = self.count.to(device)

    def forward(self, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
                t=0.0, *, labels: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None):
        if self.base_loss is not None:
            if mask is not None:
                raise ValueError("mask applies to the built-in base losses; apply it inside base_loss")
            d = self.base_loss(student_logits, teacher_logits, labels)
        elif teacher_logits is not None:
            d = jeffreys_divergence(student_logits, teacher_logits, mask, temperature=self.temperature)
        elif labels is not None:
            d = _masked_cross_entropy(student_logits, labels, mask)
        else:
            raise ValueError("teacher_logits and labels are both None: one is needed for the base loss")
        return self.add_penalty(d, t)

    def penalty_term(self, t) -> tuple:
        """``(t * mu * (omega_w * L_w + omega_a * L_a), parts)`` without updating ``mu``."""
        t = _checked_t(t)
        pen = self.penalty(self.student)
        self._follow(pen["loss_w"].device)
        mu = self.mu
        # t*mu in float64 (as Python floats were), cast to the penalty's dtype before scaling it.
        term = (t * mu).to(pen["loss_w"].dtype) * (pen["omega_w"] * pen["loss_w"] + pen["omega_a"] * pen["loss_a"])
        parts = {"penalty_w": pen["loss_w"].detach(), "penalty_a": pen["loss_a"].detach(),
                 "omega_w": pen["omega_w"], "omega_a": pen["omega_a"],
                 "active_w": pen["active_w"], "active_a": pen["active_a"], "mu": mu,
                 "t": t.detach() if torch.is_tensor(t) else t}
        return term, parts

    def update_mu(self, d: torch.Tensor) -> None:
        """Add one step's base loss ``d`` (0-d) to the running mean, after ``reduce_fn``;
        nothing happens while the student is in eval mode."""
        if not self.student.training:
            return
        dv = d.detach()
        if self.reduce_fn is not None:
            dv = self.reduce_fn(dv)
        self._follow(dv.device)
        self.loss_sum.add_(dv.reshape(1).to(self.loss_sum.dtype))
        self.count.add_(1)

    def add_penalty(self, d: torch.Tensor, t) -> tuple:
        """``(d + penalty_term(t), parts)`` for a base loss ``d`` (0-d tensor) computed by the
        caller; ``d`` enters ``mu`` (training mode only), after the penalty used the old ``mu``."""
        if not torch.is_tensor(d) or d.numel() != 1:
            raise TypeError(f"the base loss must be a one-element tensor, got "
                            f"{tuple(d.shape) if torch.is_tensor(d) else type(d).__name__}")
        d = d.reshape(())
        term, parts = self.penalty_term(t)
        loss = d + term
        self.update_mu(d)
        return loss, {"loss": loss.detach(), "distill": d.detach(), **parts}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load ``{"loss_sum", "count"}``: tensors, or the plain numbers older gdnsq wrote."""
        missing = {"loss_sum", "count"} - set(state_dict)
        if missing:
            raise ValueError(f"state must contain 'loss_sum' and 'count' (missing {sorted(missing)})")
        state = {"loss_sum": torch.as_tensor(state_dict["loss_sum"], dtype=torch.float64).reshape(1),
                 "count": torch.as_tensor(state_dict["count"], dtype=torch.int64).reshape(1)}
        return super().load_state_dict(state, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return (f"epsilon={self.penalty.epsilon:g}, p={self.penalty.p:g}, temperature={self.temperature:g}, "
                f"base_loss={self.base_loss!r}")


def read_parts(parts: dict) -> dict:
    """``parts`` of one objective call as Python numbers (ints for the counts ``active_*``),
    read from the device in one transfer. Call it only where the values are logged."""
    tensors = {k: v for k, v in parts.items() if torch.is_tensor(v)}
    out = {k: float(v) for k, v in parts.items() if not torch.is_tensor(v)}
    if tensors:
        devices = {v.device for v in tensors.values()}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
        values = torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in tensors.values()]).tolist()
        for (k, v), value in zip(tensors.items(), values):
            out[k] = value if v.is_floating_point() else int(value)
    return {k: out[k] for k in parts}
