"""``binary_linear``: the float result of a linear layer with affine binary codes, and the
``gdnsq::binary_linear`` op.

    gdnsq::binary_linear(Tensor j, Tensor s_a, Tensor beta, Tensor packed, Tensor step,
        Tensor minimum, Tensor ones, Tensor? bias, str backend) -> Tensor           float32 (M, O)

One AND-popcount GEMM gives ``sum(k*j)``; the rank-1 corrections of the package docstring give
the rest (``sum(j)`` per row, ``sum(k)`` per output channel from the packed weight).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch, reference as _ref
from ..backend import resolve_backend
from ._checks import bias_param, scalar_param
from .bitpack import check_bits, pack_bits_unchecked
from .packed_weight import PackedBinaryWeight, remember, resolve_weight, weight_of

__all__ = ["binary_linear"]


def binary_linear(act_codes: torch.Tensor, act_step, act_offset, weight_codes, weight_step=None,
                  weight_min=None, bias: Optional[torch.Tensor] = None, *,
                  backend: Optional[str] = None, check: bool = True) -> torch.Tensor:
    """``F.linear(beta + s_a*j, m + s*k, bias)`` from packed codes (inference, no autograd).

    Args:
        act_codes: (..., K) bool/integer 0/1 activation codes j.
        act_step: activation step s_a (number or 1-element tensor).
        act_offset: activation offset beta (number or 1-element tensor).
        weight_codes: (O, K) 0/1 weight codes k, or a :class:`PackedBinaryWeight` from
            :func:`pack_linear_weight` (then ``weight_step``/``weight_min`` must be None).
        weight_step: (O,) step s_c, or a number.
        weight_min: (O,) lowest level m_c, or a number.
        bias: optional (O,) float.
        backend: GEMM backend (see :mod:`gdnsq_kernels.binary`).
        check: check that the codes are 0/1 (see :func:`pack_bits`); False for codes known to be.

    Returns:
        float32 (..., O), the float64-accurate result rounded once to float32.
    """
    check_bits(act_codes, "act_codes", values=check)
    pw = resolve_weight(weight_codes, weight_step, weight_min, conv=False, check=check)
    dev = act_codes.device
    if pw.packed.device != dev:
        raise ValueError(f"weight is on {pw.packed.device} but act_codes is on {dev}")
    if act_codes.dim() < 1 or act_codes.shape[-1] != pw.in_features:
        raise ValueError(f"act_codes must have shape (..., {pw.in_features}), got {tuple(act_codes.shape)}")
    s_a = scalar_param(act_step, "act_step", dev)
    beta = scalar_param(act_offset, "act_offset", dev)
    b = bias_param(bias, pw.out_channels, dev)
    lead = act_codes.shape[:-1]
    j = act_codes.reshape(-1, pw.in_features)
    name = resolve_backend(j, backend)
    remember(pw)
    out = torch.ops.gdnsq.binary_linear(j, s_a, beta, pw.packed, pw.step, pw.minimum, pw.ones, b, name)
    return out.reshape(*lead, pw.out_channels)


def _binary_linear_impl(j, s_a, beta, pw: PackedBinaryWeight, b, name: str) -> torch.Tensor:
    """float32 (M, O) of (M, K) codes ``j`` (the body of ``gdnsq::binary_linear``)."""
    K = pw.in_features
    if name == "reference":
        return _ref.binary_linear_reference(j, s_a, beta, pw.codes(), pw.step, pw.minimum, b)
    kj = _dispatch.packed_gemm(pack_bits_unchecked(j, dim=1), pw.packed, K, False, name)  # int32 (M, O)
    jsum = j.sum(dim=1, dtype=torch.int32)[:, None]  # (M, 1)
    s = pw.step.to(torch.float64)
    m = pw.minimum.to(torch.float64)
    const = s * beta * pw.ones.to(torch.float64) + m * beta * K  # (O,)
    if b is not None:
        const = const + b
    if name == "cpu" and _dispatch.cpp_gemm_available():  # one fused pass, same arithmetic
        from .cpu_xnor import linear_epilogue

        return linear_epilogue(kj, jsum.reshape(-1), (s * s_a).contiguous(), (m * s_a).contiguous(),
                               const.expand(pw.out_channels).contiguous())
    # Same-dtype in-place passes (mixed-dtype addcmul takes a slow unvectorised path).
    out = kj.to(torch.float64).mul_(s * s_a).add_(const)
    out.addcmul_(jsum.to(torch.float64), m * s_a)
    return out.to(torch.float32)


@torch.library.custom_op("gdnsq::binary_linear", mutates_args=())
def _binary_linear_op(j: torch.Tensor, s_a: torch.Tensor, beta: torch.Tensor, packed: torch.Tensor,
                      step: torch.Tensor, minimum: torch.Tensor, ones: torch.Tensor,
                      bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    pw = weight_of(packed, step, minimum, ones, None, j.shape[1], None)
    return _binary_linear_impl(j, s_a, beta, pw, bias, backend).contiguous()


@_binary_linear_op.register_fake
def _(j, s_a, beta, packed, step, minimum, ones, bias, backend):
    return j.new_empty((j.shape[0], packed.shape[0]), dtype=torch.float32)
