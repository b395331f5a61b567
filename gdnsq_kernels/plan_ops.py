"""Element-wise C++ kernels of the deploy plan (``csrc/plan_ops.cpp``), one build per ISA.

The passes ``gdnsq.deploy.plan`` runs around the exact integer GEMMs of ``int_ops``:

* ``quantize(x, s, lo, hi, groups)``: float32 ``(M, C)`` -> uint8 codes
  ``round((clamp(x, lo, hi) - lo) / s)`` (float32, round half to even; NaN -> 0) and int32
  ``(M, groups)`` sums of the codes over each group's channels.
* ``box_sum(s, kernel, stride, padding, dilation)``: int32 NHWC ``(N, H, W, G)`` per-pixel sums
  -> ``(N, Ho, Wo, G)`` sums over each output's window (padded taps add 0).
* ``epilogue_float(acc, sj, a, b, cst, order)``: int32 sums ``acc`` ``(M, O)``, ``sj`` ``(M, G)``,
  float64 ``a``, ``b`` ``(O,)``, ``cst`` ``(P, O)`` (row m uses position ``m % P``) -> float32
  ``(M, O)``: ``(a*acc + b*sj) + cst`` (order 0) or ``(a*acc + cst) + b*sj`` (order 1) in float64,
  one IEEE operation each, rounded once.
* ``epilogue_codes(..., thr, direction, groups)``: the same value ``y``, then uint8 codes
  ``#{l : y >= thr[o, l]}`` (direction +1) or ``#{l : y <= thr[o, l]}`` (-1), plus their
  group sums. ``thr`` float32 ``(O, L)``; NaN thresholds are never reached.
* ``channel_sums(codes, groups)``, ``pack_bits(codes)`` (0/1 codes -> int64 words, bit b of
  word i = element ``64 i + b``).

The plain-PyTorch oracle is ``gdnsq_kernels.plan_reference`` (shares no code). Builds: the ISA
flags of ``gdnsq_kernels.cpu_deploy`` plus ``-ffp-contract=off`` (the epilogue's float64
operations must not be contracted into FMAs), under the flock build lock of ``_build``.
``ops(isa)`` returns the raw extension (what the plan calls, no Python checks); the functions
here check their arguments and raise a one-line ``TypeError``/``ValueError``.
"""
from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

from ._build import Extension, build_spec
from .cpu_deploy import _ISA_FLAGS, ISAS, default_isa, supported_isas
from .int_ops import _check_tensor

__all__ = ["ops", "quantize", "box_sum", "epilogue_float", "epilogue_codes", "channel_sums", "pack_bits"]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "plan_ops.cpp")
_lock = threading.Lock()
_exts: dict = {}
_extensions: dict = {}


def ops(isa: str | None = None):
    """Build (first call) or load the ``plan_ops`` extension for ``isa`` (default: the best this
    CPU runs, or ``$GDNSQ_DEPLOY_ISA``); raises when it cannot be built."""
    loaded = _exts.get(isa)
    if loaded is not None:
        return loaded
    resolved = isa or default_isa()
    if resolved not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {resolved!r}")
    if resolved not in supported_isas():
        raise ValueError(f"isa {resolved!r} is not supported by this CPU (supported: {supported_isas()})")
    with _lock:
        if resolved not in _extensions:
            flags = ["-O3", "-fopenmp", "-ffp-contract=off"] + _ISA_FLAGS[resolved]
            _extensions[resolved] = Extension(f"the C++ deploy plan ops ({resolved})",
                                              "the per-layer deployed path",
                                              lambda: build_spec(f"gdnsq_plan_ops_{resolved}", _SOURCE, flags))
    module = _extensions[resolved].load()
    _exts[isa] = module
    return module


def _tensor(t, name: str, dtype: torch.dtype, dim: int, what: str) -> Tensor:
    _check_tensor(t, name, dtype, dim, what)  # the same one-line errors as int_ops
    return t.contiguous()


def _groups(groups, channels: int, name: str = "groups", allow_zero: bool = False) -> int:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {groups!r}")
    if groups and channels % groups:
        raise ValueError(f"{name}={groups} must divide the {channels} channels")
    return groups


def _pair(v, name: str, minimum: int) -> list:
    pair = [v, v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(e, int) and not isinstance(e, bool) and e >= minimum for e in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return [int(pair[0]), int(pair[1])]


def quantize(x: Tensor, s: float, lo: float, hi: float, groups: int = 1, *, isa: str | None = None):
    """``(codes uint8 (M, C), sums int32 (M, groups))`` of float32 ``x`` ``(M, C)``; ``groups=0``
    skips the sums. ``s``, ``lo``, ``hi``: the quantizer's step, clamp bottom and top (float32
    values; ``s > 0``; the codes must fit uint8: ``(hi - lo) / s <= 255``)."""
    x = _tensor(x, "x", torch.float32, 2, "(M, C)")
    for v, n in ((s, "s"), (lo, "lo"), (hi, "hi")):
        if not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{n} must be a finite number, got {v!r}")
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s!r}")
    if hi >= lo and (hi - lo) / s > 255.5:
        raise ValueError(f"the codes of [lo, hi] = [{lo}, {hi}] at step {s} do not fit uint8 (top code > 255)")
    return ops(isa).quantize(x, float(s), float(lo), float(hi), _groups(groups, x.shape[1], allow_zero=True))


def box_sum(s: Tensor, kernel, stride=1, padding=0, dilation=1, *, isa: str | None = None) -> Tensor:
    """int32 ``(N, Ho, Wo, G)`` window sums of int32 NHWC ``s`` ``(N, H, W, G)``."""
    s = _tensor(s, "s", torch.int32, 4, "(N, H, W, G)")
    kernel, stride = _pair(kernel, "kernel", 1), _pair(stride, "stride", 1)
    padding, dilation = _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    for a in (0, 1):
        if s.shape[1 + a] + 2 * padding[a] < dilation[a] * (kernel[a] - 1) + 1:
            raise ValueError(f"s's spatial size {tuple(s.shape[1:3])} with padding {tuple(padding)} is smaller "
                             f"than the window {tuple(kernel)} x dilation {tuple(dilation)}")
    return ops(isa).box_sum(s, kernel, stride, padding, dilation)


def _epilogue_args(acc, sj, a, b, cst, order):
    acc = _tensor(acc, "acc", torch.int32, 2, "(M, O) sums")
    sj = _tensor(sj, "sj", torch.int32, 2, "(M, G) sums")
    a = _tensor(a, "a", torch.float64, 1, "(O,)")
    b = _tensor(b, "b", torch.float64, 1, "(O,)")
    cst = _tensor(cst, "cst", torch.float64, 2, "(P, O)")
    M, O = acc.shape
    if sj.shape[0] != M or sj.shape[1] < 1 or O % sj.shape[1]:
        raise ValueError(f"sj must be (M={M}, G) with G dividing O={O}, got {tuple(sj.shape)}")
    if a.shape[0] != O or b.shape[0] != O or cst.shape[1] != O:
        raise ValueError(f"a, b must be ({O},) and cst (P, {O}), got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(cst.shape)}")
    if cst.shape[0] < 1 or M % cst.shape[0]:
        raise ValueError(f"cst's positions P={cst.shape[0]} must divide the rows M={M}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 or 1, got {order!r}")
    return acc, sj, a, b, cst, order


def epilogue_float(acc: Tensor, sj: Tensor, a: Tensor, b: Tensor, cst: Tensor, order: int = 0, *,
                   isa: str | None = None) -> Tensor:
    """float32 ``(M, O)`` deployed-layer output of the exact sums (module docstring)."""
    return ops(isa).epilogue_float(*_epilogue_args(acc, sj, a, b, cst, order))


def thresholds_for_kernel(thr: Tensor, direction: Tensor):
    """``(thr_t, sign)``: the ``(L, O)`` signed thresholds and ``(O,)`` signs the kernel reads."""
    sign = direction.to(torch.float32)
    return (thr * sign.view(-1, 1)).t().contiguous(), sign.contiguous()


def epilogue_codes(acc: Tensor, sj: Tensor, a: Tensor, b: Tensor, cst: Tensor, order: int, thr: Tensor,
                   direction: Tensor, groups: int = 1, *, isa: str | None = None):
    """``(codes uint8 (M, O), sums int32 (M, groups))``: the epilogue value counted against the
    per-channel thresholds ``thr`` float32 ``(O, L)`` with ``direction`` (O,) of +1/-1."""
    acc, sj, a, b, cst, order = _epilogue_args(acc, sj, a, b, cst, order)
    O = acc.shape[1]
    thr = _tensor(thr, "thr", torch.float32, 2, "(O, L)")
    if thr.shape[0] != O or not 1 <= thr.shape[1] <= 255:
        raise ValueError(f"thr must be ({O}, L) with 1 <= L <= 255, got {tuple(thr.shape)}")
    if not isinstance(direction, torch.Tensor) or direction.shape != (O,) or not bool(
            ((direction == 1) | (direction == -1)).all()):
        raise ValueError(f"direction must be a ({O},) tensor of +1/-1")
    thr_t, sign = thresholds_for_kernel(thr, direction)
    return ops(isa).epilogue_codes(acc, sj, a, b, cst, order, thr_t, sign, _groups(groups, O, allow_zero=True))


def channel_sums(codes: Tensor, groups: int = 1, *, isa: str | None = None) -> Tensor:
    """int32 ``(M, groups)`` sums of uint8 ``codes`` ``(M, C)`` over each group's channels."""
    codes = _tensor(codes, "codes", torch.uint8, 2, "(M, C) codes")
    return ops(isa).channel_sums(codes, _groups(groups, codes.shape[1]))


def pack_bits(codes: Tensor, *, isa: str | None = None) -> Tensor:
    """int64 ``(M, ceil(K/64))`` words of 0/1 uint8 ``codes`` ``(M, K)`` (bit 0 of each code)."""
    codes = _tensor(codes, "codes", torch.uint8, 2, "(M, K) codes")
    return ops(isa).pack_bits(codes)
