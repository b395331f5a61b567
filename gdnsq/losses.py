"""GDNSQ objective: Jeffreys distillation plus the exterior-point bit-width penalty
(METHOD Part B §3.2, §3.4).

``L = D + t * mu * (omega_w * L_w + omega_a * L_a)`` with

* ``D`` the Jeffreys divergence between student and teacher logits (or cross-entropy with the
  labels when no teacher logits are given);
* ``L_w = mean_i max(0, b_w,i - (B_w,i - eps))`` over every output channel of every quantized
  layer, ``L_a`` the same over every non-pruned activation quantizer (p = 1, unweighted means
  over all constraints, active or not), targets ``B`` from each quantizer's ``target_bits``;
* ``omega_w = (n_w + eps)/(n_w + n_a + eps)``, ``omega_a = (n_a + eps)/(n_w + n_a + eps)`` from
  the active-constraint counts (no gradient);
* ``mu`` the running mean of ``D`` over the previous training steps (sum 0, count 1 at the start,
  so ``mu = 0`` at step 0; updated only while the student is in training mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stats import quantized_layers


def jeffreys_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_T || p_S) + KL(p_S || p_T)`` at temperature 1, summed over classes, mean over the batch.

    Args:
        student_logits, teacher_logits: (N, K) logits (any float dtype; math in float32).
    Returns:
        0-d float32 tensor (float64 for float64 logits), nats per sample.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student_logits and teacher_logits must both be (N, K), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    ct = torch.promote_types(student_logits.dtype, torch.float32)  # float32 (float64 kept)
    ls = F.log_softmax(student_logits.to(ct), dim=1)
    lt = F.log_softmax(teacher_logits.to(ct), dim=1)
    # KL(T||S) + KL(S||T) = sum (p_T - p_S) (log p_T - log p_S)
    return ((lt.exp() - ls.exp()) * (lt - ls)).sum() / student_logits.shape[0]


class BitWidthPenalty:
    """Exterior-point hinge penalty on the continuous bit-widths of a student.

    ``penalty(student)`` returns a dict: ``loss_w``, ``loss_a`` (0-d tensors, differentiable in
    the weights and the log2 parameters), ``omega_w``, ``omega_a`` (floats), ``active_w``,
    ``active_a`` (ints: constraints with a positive hinge), ``count_w``, ``count_a`` (ints).
    """

    def __init__(self, epsilon: float = 1e-3, p: float = 1.0):
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.epsilon = float(epsilon)
        self.p = float(p)

    def constraint_bits(self, student: nn.Module):
        """(weight bits (N_w,), weight targets (N_w,), act bits (N_a,), act targets (N_a,))."""
        wb, wt, ab, at = [], [], [], []
        for _, layer in quantized_layers(student):
            wq = layer.weight_quantizer
            if wq.log2_step.requires_grad:
                b = wq.continuous_bits(layer.weight)
                wb.append(b)
                wt.append(wq.target_bits.to(b.dtype).expand(b.shape[0]))
            aq = layer.act_quantizer
            if aq is not None and aq.enabled and not bool(aq.pruned):
                b = aq.continuous_bits().reshape(1)
                ab.append(b)
                at.append(aq.target_bits.to(b.dtype).reshape(1))
        dev = next(student.parameters()).device

        def cat(xs):
            return torch.cat(xs) if xs else torch.zeros(0, device=dev)
        return cat(wb), cat(wt), cat(ab), cat(at)

    def __call__(self, student: nn.Module) -> dict:
        wb, wt, ab, at = self.constraint_bits(student)
        hw = torch.clamp_min(wb - (wt - self.epsilon), 0.0)
        ha = torch.clamp_min(ab - (at - self.epsilon), 0.0)
        if self.p != 1.0:
            hw, ha = hw ** self.p, ha ** self.p
        zero = torch.zeros((), device=wb.device)
        loss_w = hw.mean() if hw.numel() else zero
        loss_a = ha.mean() if ha.numel() else zero
        n_w, n_a = int((hw > 0).sum()), int((ha > 0).sum())
        eps = self.epsilon
        denom = n_w + n_a + eps
        return {"loss_w": loss_w, "loss_a": loss_a,
                "omega_w": (n_w + eps) / denom, "omega_a": (n_a + eps) / denom,
                "active_w": n_w, "active_a": n_a, "count_w": int(hw.numel()), "count_a": int(ha.numel())}


class GDNSQObjective:
    """``loss, parts = objective(student_logits, teacher_logits, t, labels=None)``.

    ``D`` is :func:`jeffreys_divergence` (labels unused); with ``teacher_logits=None`` it is the
    cross-entropy with ``labels`` instead. ``parts`` holds floats: loss, distill, penalty_w,
    penalty_a, omega_w, omega_a, active_w, active_a, mu, t.

    ``reduce_fn`` (set by the trainer under DDP): callable mapping the detached 0-d ``D`` to its
    mean across ranks, applied before ``mu`` is updated, so every rank holds the same ``mu``.
    """

    def __init__(self, student: nn.Module, epsilon: float = 1e-3, p: float = 1.0):
        self.student = student
        self.penalty = BitWidthPenalty(epsilon=epsilon, p=p)
        self.loss_sum = 0.0
        self.count = 1
        self.reduce_fn = None

    @property
    def mu(self) -> float:
        """Running mean of D over the previous training steps (0 before any)."""
        return self.loss_sum / self.count

    def __call__(self, student_logits, teacher_logits, t: float, labels=None):
        if teacher_logits is not None:
            d = jeffreys_divergence(student_logits, teacher_logits)
        elif labels is not None:
            d = F.cross_entropy(student_logits.float(), labels)
        else:
            raise ValueError("teacher_logits and labels are both None: one is needed for the base loss")
        t = float(t)
        mu = self.mu
        pen = self.penalty(self.student)
        loss = d + (t * mu) * (pen["omega_w"] * pen["loss_w"] + pen["omega_a"] * pen["loss_a"])
        if self.student.training:
            dv = d.detach()
            if self.reduce_fn is not None:
                dv = self.reduce_fn(dv)
            self.loss_sum += float(dv)
            self.count += 1
        parts = {"loss": float(loss.detach()), "distill": float(d.detach()),
                 "penalty_w": float(pen["loss_w"].detach()), "penalty_a": float(pen["loss_a"].detach()),
                 "omega_w": pen["omega_w"], "omega_a": pen["omega_a"],
                 "active_w": pen["active_w"], "active_a": pen["active_a"], "mu": mu, "t": t}
        return loss, parts

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if "loss_sum" not in state or "count" not in state:
            raise ValueError("state must contain 'loss_sum' and 'count'")
        self.loss_sum, self.count = float(state["loss_sum"]), int(state["count"])
