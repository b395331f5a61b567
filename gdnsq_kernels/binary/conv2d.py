"""``binary_conv2d``: the float result of a conv layer with affine binary codes, and the
``gdnsq::binary_conv2d`` op.

    gdnsq::binary_conv2d(Tensor act_codes, Tensor s_a, Tensor beta, Tensor packed, Tensor step,
        Tensor minimum, Tensor ones, Tensor? tap_ones, Tensor? bias, int[] stride, int[] pads,
        int[] dilation, str backend) -> Tensor                              float32 (N, O, Ho, Wo)

``sum(k*j)`` comes from a word im2col and one AND-popcount GEMM (or, on the ``cpu`` backend
without the C++ GEMM, a float conv of the 0/1 codes; :func:`_cpu_conv_strategy`); ``sum(j)``
from an extra all-ones weight row; ``sum(k)`` and the tap count over the real (in-image) taps,
so zero padding stays exact for ``beta != 0``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _dispatch, reference as _ref
from ..backend import resolve_backend
from ._checks import bias_param, scalar_param
from .bitpack import WORD_BITS, check_bits, num_words, pack_bits_unchecked
from .numpy_gemm import FLOAT32_EXACT_K, full_precision_float32_matmul, use_float_gemm
from .packed_weight import PackedBinaryWeight, remember, resolve_weight, weight_of

__all__ = ["binary_conv2d"]

# Overrides the measured choice below ("float" / "packed"); tests and the benchmark set it.
CPU_CONV_STRATEGY = None


def _cpu_conv_strategy(M: int, C: int, O: int, taps: int) -> str:
    """How the cpu backend computes sum(k*j) of a conv: "float" (F.conv2d of the 0/1 codes) or
    "packed" (word im2col + popcount GEMM). Both are exact; the choice is speed only.

    Measured on a 2-core AMD EPYC, one thread, interleaved runs: with the C++ popcount GEMM the
    packed path beat the float conv of the codes at every ResNet-20 layer and at 128-512
    channels (2x to 8x). With only NumPy popcount, the float conv of the codes wins for
    conv-shaped GEMMs (``use_float_gemm``).
    """
    if CPU_CONV_STRATEGY is not None:
        return CPU_CONV_STRATEGY
    if taps > FLOAT32_EXACT_K or _dispatch.cpp_gemm_available():
        return "packed"
    return "float" if use_float_gemm(M, O) else "packed"


def _pair(v, name: str, minimum: int) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _conv_pads(padding, kernel, dilation, stride) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, as F.conv2d interprets ``padding``."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions (as in F.conv2d)")
            tot_h = dilation[0] * (kernel[0] - 1)
            tot_w = dilation[1] * (kernel[1] - 1)
            # F.conv2d puts the odd extra row/column at the bottom/right.
            return tot_h // 2, tot_h - tot_h // 2, tot_w // 2, tot_w - tot_w // 2
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    ph, pw = _pair(padding, "padding", 0)
    return ph, ph, pw, pw


def binary_conv2d(act_codes: torch.Tensor, act_step, act_offset, weight_codes, weight_step=None,
                  weight_min=None, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
                  dilation=1, *, backend: Optional[str] = None, check: bool = True) -> torch.Tensor:
    """``F.conv2d(beta + s_a*j, m + s*k, bias, stride, padding, dilation)`` from packed codes.

    Zero padding pads the dequantized activation with 0 (exact also for ``beta != 0``).
    Inference only (no autograd); groups are not supported.

    Args:
        act_codes: (N, C, H, W) bool/integer 0/1 activation codes j.
        act_step: activation step s_a (number or 1-element tensor).
        act_offset: activation offset beta (number or 1-element tensor).
        weight_codes: (O, C, kh, kw) 0/1 weight codes k, or a :class:`PackedBinaryWeight` from
            :func:`pack_conv_weight` (then ``weight_step``/``weight_min`` must be None).
        weight_step: (O,) step s_c, or a number.
        weight_min: (O,) lowest level m_c, or a number.
        bias: optional (O,) float.
        stride, padding, dilation: as in ``torch.nn.functional.conv2d`` (int, pair; padding also
            'valid' / 'same').
        backend: GEMM backend (see :mod:`gdnsq_kernels.binary`).
        check: check that the codes are 0/1 (see :func:`pack_bits`); False for codes known to be.

    Returns:
        float32 (N, O, H_out, W_out), the float64-accurate result rounded once to float32.

    Example::

        >>> j = torch.randint(0, 2, (1, 16, 8, 8)); k = torch.randint(0, 2, (32, 16, 3, 3))
        >>> pw = pack_conv_weight(k, torch.full((32,), 0.1), torch.full((32,), -0.05))
        >>> binary_conv2d(j, 0.5, 0.0, pw, padding=1).shape
        torch.Size([1, 32, 8, 8])
    """
    check_bits(act_codes, "act_codes", values=check)
    if act_codes.dim() != 4:
        raise ValueError(f"act_codes must be 4-D (N, C, H, W), got shape {tuple(act_codes.shape)}")
    pw = resolve_weight(weight_codes, weight_step, weight_min, conv=True, check=check)
    dev = act_codes.device
    if pw.packed.device != dev:
        raise ValueError(f"weight is on {pw.packed.device} but act_codes is on {dev}")
    Nb, C, H, Wd = act_codes.shape
    if C != pw.in_channels:
        raise ValueError(f"act_codes has {C} channels but the weight expects {pw.in_channels}")
    kh, kw = pw.kernel_size
    stride = _pair(stride, "stride", 1)
    dilation = _pair(dilation, "dilation", 1)
    pt, pb, pl, pr = _conv_pads(padding, (kh, kw), dilation, stride)
    Ho, Wo = _conv_out_size(H, Wd, kh, kw, stride, (pt, pb, pl, pr), dilation)
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"act_codes of spatial size {(H, Wd)} is too small for kernel {(kh, kw)} "
                         f"with padding {(pt, pb, pl, pr)} and dilation {dilation}")
    s_a = scalar_param(act_step, "act_step", dev)
    beta = scalar_param(act_offset, "act_offset", dev)
    b = bias_param(bias, pw.out_channels, dev)
    name = resolve_backend(act_codes, backend)
    remember(pw)
    return torch.ops.gdnsq.binary_conv2d(act_codes, s_a, beta, pw.packed, pw.step, pw.minimum, pw.ones,
                                         pw.tap_ones, b, list(stride), [pt, pb, pl, pr], list(dilation),
                                         name)


def _conv_out_size(H, Wd, kh, kw, stride, pads, dilation):
    """(H_out, W_out) of F.conv2d; pads = (top, bottom, left, right)."""
    pt, pb, pl, pr = pads
    Ho = (H + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (Wd + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return Ho, Wo


def _binary_conv2d_impl(act_codes, s_a, beta, pw: PackedBinaryWeight, b, stride, pads, dilation,
                        name: str) -> torch.Tensor:
    """float32 (N, O, Ho, Wo) (the body of ``gdnsq::binary_conv2d``); pads = (top, bottom, left, right)."""
    dev = act_codes.device
    Nb, C, H, Wd = act_codes.shape
    kh, kw = pw.kernel_size
    pt, pb, pl, pr = pads
    Ho, Wo = _conv_out_size(H, Wd, kh, kw, stride, pads, dilation)
    O = pw.out_channels
    if name == "reference":
        # F.conv2d pads the dequantized float64 activation with zeros itself; unequal pads come
        # only from padding='same'.
        ref_pad = (pt, pl) if (pt == pb and pl == pr) else "same"
        return _ref.binary_conv2d_reference(act_codes, s_a, beta, pw.codes(), pw.step, pw.minimum,
                                            b, stride=stride, padding=ref_pad, dilation=dilation)

    cargs = dict(stride=stride, dilation=dilation)
    M = Nb * Ho * Wo
    kjt_int = None
    if name == "cpu" and _cpu_conv_strategy(M, C, O, pw.in_features) == "float":
        # Measured: for conv-shaped GEMMs (many rows, few output channels) oneDNN's float conv
        # of the 0/1 codes beats NumPy popcount; it is exact (integer sums < 2**24) at full
        # float32 matmul precision, else float64. Padded taps are code 0: they add nothing.
        ftype = torch.float32 if full_precision_float32_matmul() else torch.float64
        ckey = ("codes", ftype)
        if ckey not in pw.cache:
            pw.cache[ckey] = pw.codes().to(ftype)
        if pt == pb and pl == pr:
            kj = F.conv2d(act_codes.to(ftype), pw.cache[ckey], padding=(pt, pl), **cargs)
        else:
            kj = F.conv2d(F.pad(act_codes.to(ftype), (pl, pr, pt, pb)), pw.cache[ckey], **cargs)
        jsum = None  # window sums below
    else:
        # Pack each pixel's C channel codes once, then gather the kh*kw tap words (im2col on
        # words, 8x less data than on uint8 codes). A padded tap is word 0 = code 0.
        cw = num_words(C)
        pix = pack_bits_unchecked(act_codes.permute(0, 2, 3, 1), dim=3)  # (N, H, W, cw) int32
        pix = F.pad(pix, (0, 0, pl, pr, pt, pb))
        sh, sw = stride
        dh, dw = dilation
        taps = [
            pix[:, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw, :]
            for i in range(kh) for j in range(kw)
        ]
        patches = torch.stack(taps, dim=3).reshape(M, kh * kw * cw)
        # One extra weight row of all-ones channel bits makes the same GEMM return sum(j) per
        # position (padded taps are 0) in its last column.
        if "aug" not in pw.cache:
            ones_row = pack_bits_unchecked(torch.ones((1, kh, kw, C), dtype=torch.uint8, device=dev), dim=3)
            pw.cache["aug"] = torch.cat([pw.packed, ones_row.reshape(1, -1)]).contiguous()
        # AND form: per-tap padding bits are 0 in both operands, so k can be the full word width.
        kbits = kh * kw * cw * WORD_BITS
        if name == "cpu" and _dispatch.cpp_gemm_available():
            # Patches as the GEMM's M side (measured faster); the fused C++ epilogue reads
            # the (N, L, O+1) result and writes NCHW.
            kjt_int = _dispatch.packed_gemm(patches, pw.cache["aug"], kbits, False, name).reshape(Nb, Ho * Wo, O + 1)
            kj = jsum = None
        else:
            # Weight rows as the M side: the (O+1, N*L) result is channel-major, so NCHW needs
            # only a batch/channel swap of contiguous Ho*Wo planes (no element transpose).
            kjt = _dispatch.packed_gemm(pw.cache["aug"], patches, kbits, False, name)
            kjt = kjt.to(torch.float64).reshape(O + 1, Nb, Ho, Wo).permute(1, 0, 2, 3)  # (N, O+1, Ho, Wo)
            kj, jsum = kjt[:, :O], kjt[:, O:]

    # Per-position counts over the real (in-image) taps, as integer window sums (exact).
    sh, sw = stride
    dh, dw = dilation

    def tap(x, i, j):  # the (.., Ho, Wo) view of padded x that kernel tap (i, j) reads
        return x[..., i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]

    f64 = torch.float64
    gkey = ("real_taps", H, Wd, pt, pb, pl, pr, stride, dilation)
    if gkey not in pw.cache:  # depends on the weight and the geometry only
        valid = F.pad(torch.ones((1, 1, H, Wd), dtype=torch.int32, device=dev), (pl, pr, pt, pb))
        n_real = torch.zeros((1, 1, Ho, Wo), dtype=torch.int32, device=dev)
        k_real = torch.zeros((1, O, Ho, Wo), dtype=torch.int32, device=dev)
        for i in range(kh):
            for j in range(kw):
                v = tap(valid, i, j)
                n_real += v
                k_real += pw.tap_ones[:, i, j].reshape(1, O, 1, 1) * v
        pw.cache[gkey] = (C * n_real.to(f64), k_real.to(f64))
    n_real, k_real = pw.cache[gkey]

    s = pw.step.to(f64).reshape(1, O, 1, 1)
    m = pw.minimum.to(f64).reshape(1, O, 1, 1)
    # Position/channel constant (1, O, Ho, Wo): the beta terms over the real taps, and the bias.
    const = (s * beta) * k_real + (m * beta) * n_real
    if b is not None:
        const = const + b.reshape(1, O, 1, 1)
    # float64 passes over the output (kj and jsum are exact integers), then one rounding to
    # float32 into NCHW. Operands are converted first: mixed-dtype addcmul is unvectorised.
    if jsum is None and kjt_int is None:  # NCHW float-conv branch
        jpix = F.pad(act_codes.sum(dim=1, keepdim=True, dtype=torch.int32), (pl, pr, pt, pb))
        jsum = torch.zeros((Nb, 1, Ho, Wo), dtype=torch.int32, device=dev)
        for i in range(kh):
            for j in range(kw):
                jsum += tap(jpix, i, j)
        out = kj.to(f64).mul_(s * s_a).add_(const)
        out.addcmul_(jsum.to(f64), m * s_a)
        return out.to(torch.float32, memory_format=torch.contiguous_format)
    if kjt_int is not None:  # cpu with the C++ extension: one fused pass
        from .cpu_xnor import conv_epilogue

        out = conv_epilogue(kjt_int, const.reshape(O, Ho * Wo).expand(O, Ho * Wo),
                            (s * s_a).reshape(O), (m * s_a).reshape(O))
        return out.reshape(Nb, O, Ho, Wo)
    out = torch.empty((Nb, O, Ho, Wo), dtype=f64, device=dev)
    torch.mul(kj, s * s_a, out=out)  # kj: float64 view with contiguous Ho*Wo planes
    out.add_(const).addcmul_(jsum, m * s_a)
    return out.to(torch.float32)


@torch.library.custom_op("gdnsq::binary_conv2d", mutates_args=())
def _binary_conv2d_op(act_codes: torch.Tensor, s_a: torch.Tensor, beta: torch.Tensor,
                      packed: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor,
                      ones: torch.Tensor, tap_ones: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      stride: List[int], pads: List[int], dilation: List[int],
                      backend: str) -> torch.Tensor:
    kernel = tuple(tap_ones.shape[1:])
    pw = weight_of(packed, step, minimum, ones, tap_ones, act_codes.shape[1], kernel)
    return _binary_conv2d_impl(act_codes, s_a, beta, pw, bias, tuple(stride), tuple(pads),
                               tuple(dilation), backend).contiguous()


@_binary_conv2d_op.register_fake
def _(act_codes, s_a, beta, packed, step, minimum, ones, tap_ones, bias, stride, pads, dilation, backend):
    N, _, H, Wd = act_codes.shape
    kh, kw = tap_ones.shape[1:]
    Ho, Wo = _conv_out_size(H, Wd, kh, kw, stride, pads, dilation)
    return act_codes.new_empty((N, packed.shape[0], Ho, Wo), dtype=torch.float32)
