"""The AEWGS weight-gradient estimator (METHOD Part B §2.1), in plain torch ops.

Used by the weight quantizer module's AEWGS path (``gdnsq.quantizers``) and by the backward of
the fused layer ops (``gdnsq_kernels.quantize.fused_layers``), so both give the same gradients.
"""
from __future__ import annotations

import math

import torch

__all__ = ["AEWGS_VAR_FLOOR", "AEWGS_MU_MAX", "aewgs_grads"]

#: AEWGS constants (METHOD Part B §2.1): variance floor and the cap on mu (factor 1-mu >= 0.01).
AEWGS_VAR_FLOOR = 1e-3
AEWGS_MU_MAX = 1.0 - 0.01


def _dist_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` over the ranks of an initialised default process group, in place.

    SUM then divide, because ReduceOp.AVG is not available on gloo (CPU).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def aewgs_grads(grad_w_hat: torch.Tensor, w: torch.Tensor, log2_step: torch.Tensor,
                zero_point: torch.Tensor):
    """Weight gradient of the AEWGS estimator and its extra log2-step term (METHOD Part B §2.1).

    The authors' graph is ``w_hat = (v + N(v, s)) * s + z`` with ``v = (w - z)/s`` and
    ``z = amin_c(w)``; AEWGS makes ``dN/dv = -mu``. Autograd through that graph gives

    * ``dL/dw = g*(1 - mu)``, plus ``sum_c(g*mu)`` on the arg-min element(s) of each channel
      (through ``z``; ties share it equally, as ``amin`` does);
    * ``dL/ds_c`` = the STE/GDNSQ term ``sum g*(e + s*r)`` **plus** ``sum_c g*mu*v`` (the
      ``(1 - mu)`` factor also scales the path through ``v = (w - z)/s``), i.e.
      ``dL/dlog2_step_c += ln2 * s_c * sum_c g*mu*v``. (Part B §2.2 lists the step gradient of
      AEWGS as identical to STE's; the composition it describes has this extra term, and we
      follow the composition.)

    ``mu = min(delta*sign(g)*e, 0.99)``, ``delta = mean(sign(g)e) / max(var(e), 1e-3)`` with
    means per output channel (over the whole tensor for a per-tensor step), all-reduced across
    ranks when ``torch.distributed`` is initialised; ``e = round(v) - v``.

    Args:
        grad_w_hat: (C_out, ...) upstream gradient ``g`` of the quantized weight.
        w: (C_out, ...) float weights.
        log2_step: (C_out,) or one element, log2 of the step.
        zero_point: (C_out,) per-channel minimum used by the forward.

    Returns:
        (grad_w shaped and typed like grad_w_hat, extra log2-step gradient shaped like log2_step
        in the compute dtype: float32, float64 for float64 weights).
    """
    c = w.shape[0]
    ct = torch.promote_types(w.dtype, torch.float32)  # float32 math (float64 for checks)
    g = grad_w_hat.to(ct).reshape(c, -1)
    wf = w.detach().to(ct).reshape(c, -1)
    s = torch.exp2(log2_step.detach().to(ct)).reshape(-1, 1)
    z = zero_point.to(ct).reshape(-1, 1)
    v = (wf - z) / s
    e = torch.round(v) - v
    # sign(G) with G = dL/dn = g*s equals sign(g) because s > 0.
    sg = torch.sign(g)
    if log2_step.numel() == c and c > 1:
        stats = torch.stack([(sg * e).mean(1), e.mean(1), (e * e).mean(1)])  # (3, C)
    else:
        stats = torch.stack([(sg * e).mean(), e.mean(), (e * e).mean()]).reshape(3, 1)
    _dist_mean_(stats)
    num, m1, m2 = stats[0], stats[1], stats[2]
    delta = (num / torch.clamp_min(m2 - m1 * m1, AEWGS_VAR_FLOOR)).reshape(-1, 1)
    mu = torch.clamp_max(delta * sg * e, AEWGS_MU_MAX)
    gmu = g * mu
    gw = g - gmu
    # The zero point z = amin(w) passes sum(g*mu) back to the minimum element(s).
    is_min = (wf == z).float()
    gw = gw + is_min * (gmu.sum(1, keepdim=True) / is_min.sum(1, keepdim=True).clamp_min(1.0))
    extra = (gmu * v).sum(1) * (math.log(2.0) * s.reshape(-1))
    if log2_step.numel() != c or c == 1:
        extra = extra.sum()
    return gw.reshape(w.shape).to(grad_w_hat.dtype), extra.reshape(log2_step.shape)
