"""Bit-packed W1A1 arithmetic: packed GEMMs and the affine binary linear / conv2d built on them.

Public ops (all inference-only: no autograd):

* ``pack_bits`` / ``unpack_bits`` (see :mod:`gdnsq_kernels.binary.bitpack` for the bit order).
* ``xnor_gemm(a_packed, b_packed, k)``: ``C[m, n] = sum_{i<k} (2a-1)(2b-1) = k - 2*popcount(a XOR b)``.
* ``and_gemm(a_packed, b_packed, k)``: ``C[m, n] = sum_{i<k} a*b = popcount(a AND b)``.
* ``pack_linear_weight`` / ``pack_conv_weight`` -> :class:`PackedBinaryWeight` (pack once, reuse).
* ``binary_linear`` / ``binary_conv2d``: the float result of a layer with affine binary codes,
  weights ``w = m_c + s_c*k`` (per output channel c, ``k in {0,1}``) and activations
  ``a = beta + s_a*j`` (per tensor, ``j in {0,1}``), from one AND-popcount GEMM plus rank-1
  corrections (METHOD.md Part B §7). Over the ``n`` real taps of an output position::

      sum w*a = s_c*s_a*sum(k*j) + s_c*beta*sum(k) + m_c*s_a*sum(j) + m_c*beta*n

  ``sum(k*j)`` is the packed GEMM; ``sum(j)`` is a per-position count (for conv, an extra
  all-ones row of the packed weight makes the same GEMM return it); ``sum(k)`` and ``n`` are
  counted over the taps that land inside the image, so zero padding stays exact when
  ``beta != 0`` (a padded tap is the value 0, not the code 0 = beta).

Backends (``backend=`` or ``GDNSQ_BACKEND``, see :mod:`gdnsq_kernels.backend`):

* ``triton``: the Triton kernel (:mod:`gdnsq_kernels.binary.triton_xnor`); on CPU tensors only under
  ``TRITON_INTERPRET=1``.
* ``cpu``: CPU tensors. A C++ popcount GEMM over uint64 words (``csrc/xnor_cpu.cpp``, built on
  first use; AVX-512 VPOPCNTDQ when the CPU has it), the fastest path measured at every shape.
  Without a compiler (or with ``GDNSQ_NO_CPP_XNOR=1``) it falls back to NumPy
  ``bitwise_count`` over uint64 views of the words for small M, and for many rows against few
  columns an unpack to float32 +-1 / 0-1 matrices and one sgemm (see ``use_float_gemm``;
  ``binary_conv2d`` then runs a float conv of the 0/1 codes), which is exact while
  ``k <= 2**24`` (integer partial sums stay exactly representable) and when float32 matmul runs
  at full precision; otherwise float64. The switch point was measured (docs/binary.md).
* ``torch``: plain-torch SWAR popcount on the words, chunked (CPU or CUDA; no compiler). It is
  its own implementation here (not an alias of ``reference`` or ``cpu``): the fallback for a
  CUDA machine without a working Triton.
* ``reference``: :mod:`gdnsq_kernels.binary.reference` (unpack and multiply in float64; the
  conv/linear dequantize and run float64 ``F.conv2d``/``F.linear``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference as _ref
from ..backend import resolve_backend
from ._torch_gemm import gemm_torch_swar
from .numpy_gemm import (FLOAT32_EXACT_K, full_precision_float32_matmul, gemm_cpu_float, gemm_cpu_popcount,
                         use_float_gemm)
from .bitpack import (
    MAX_GEMM_K,
    WORD_BITS,
    check_bits,
    check_k,
    check_packed,
    masked_tail,
    num_words,
    pack_bits,
    pack_bits_unchecked,
    unpack_bits,
)

__all__ = [
    "pack_bits",
    "unpack_bits",
    "xnor_gemm",
    "and_gemm",
    "PackedBinaryWeight",
    "pack_linear_weight",
    "pack_conv_weight",
    "binary_linear",
    "binary_conv2d",
]


# ----------------------------------------------------------------------------- GEMM dispatch

def _check_gemm_inputs(a_packed, b_packed, k):
    check_packed(a_packed, "a_packed")
    check_packed(b_packed, "b_packed")
    if a_packed.dim() != 2:
        raise ValueError(f"a_packed must be 2-D (M, W), got shape {tuple(a_packed.shape)}")
    if b_packed.dim() != 2:
        raise ValueError(f"b_packed must be 2-D (N, W), got shape {tuple(b_packed.shape)}")
    if a_packed.shape[1] != b_packed.shape[1]:
        raise ValueError(
            f"b_packed has {b_packed.shape[1]} words per row but a_packed has {a_packed.shape[1]}; "
            f"both must be packed from K = k columns"
        )
    if a_packed.device != b_packed.device:
        raise ValueError(f"b_packed is on {b_packed.device} but a_packed is on {a_packed.device}")
    check_k(k, a_packed.shape[1], "k", "a_packed/b_packed")
    if k > MAX_GEMM_K:
        raise ValueError(f"k={k} exceeds {MAX_GEMM_K}, the int32 range of the GEMM result")


def xnor_gemm(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """XNOR-popcount GEMM of +-1 codes.

    Args:
        a_packed: int32 (M, W), ``pack_bits`` of an (M, k) 0/1 matrix along dim 1.
        b_packed: int32 (N, W), ``pack_bits`` of an (N, k) 0/1 matrix along dim 1.
        k: number of valid bits per row; ``W == ceil(k/32)``. Bits past k are ignored.
        backend: see module docstring.

    Returns:
        int32 (M, N): ``C[m, n] = sum_{i<k} (2a[m,i]-1)(2b[n,i]-1) = k - 2*popcount(a_m XOR b_n)``.
    """
    _check_gemm_inputs(a_packed, b_packed, k)
    return torch.ops.gdnsq.packed_gemm(a_packed, b_packed, int(k), True, resolve_backend(a_packed, backend))


def and_gemm(a_packed: torch.Tensor, b_packed: torch.Tensor, k: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """AND-popcount GEMM of 0/1 codes: int32 (M, N) ``C[m, n] = sum_{i<k} a[m,i]*b[n,i]``.

    Same arguments as :func:`xnor_gemm`.
    """
    _check_gemm_inputs(a_packed, b_packed, k)
    return torch.ops.gdnsq.packed_gemm(a_packed, b_packed, int(k), False, resolve_backend(a_packed, backend))


def _packed_gemm(a, b, k, xnor, backend):
    name = resolve_backend(a, backend)
    M, N = a.shape[0], b.shape[0]
    if k == 0 or M == 0 or N == 0:
        return torch.zeros((M, N), dtype=torch.int32, device=a.device)
    if name == "reference":
        return (_ref.xnor_gemm_reference if xnor else _ref.and_gemm_reference)(a, b, k)
    if name == "triton":
        from .triton_xnor import packed_gemm_triton

        return packed_gemm_triton(a, b, k, xnor)
    if name == "torch":
        return gemm_torch_swar(a, b, k, xnor)
    # cpu
    if _cpp_gemm_available():
        from .cpu_xnor import packed_gemm_cpp

        return packed_gemm_cpp(masked_tail(a, k), masked_tail(b, k), k, xnor)
    if use_float_gemm(M, N):
        return gemm_cpu_float(a, b, k, xnor)
    return gemm_cpu_popcount(a, b, k, xnor)


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
    if taps > FLOAT32_EXACT_K or _cpp_gemm_available():
        return "packed"
    return "float" if use_float_gemm(M, O) else "packed"


def _cpp_gemm_available() -> bool:
    from . import cpu_xnor

    return cpu_xnor.available()


# ----------------------------------------------------------------------------- packed weights

@dataclass(frozen=True)
class PackedBinaryWeight:
    """A binary weight ``w = minimum[c] + step[c]*k`` packed once for :func:`binary_linear` /
    :func:`binary_conv2d`. Build it with :func:`pack_linear_weight` or :func:`pack_conv_weight`.

    Fields:
        packed: int32 (O, W) words of the codes k. Linear: ``W = ceil(in_features/32)``, bits in
            input-feature order. Conv: ``W = kh*kw*ceil(C/32)``, tap-major: for tap (i, j) in
            row-major order, ``ceil(C/32)`` words hold the channels LSB first, zero-padded.
        step: float32 (O,) per-output-channel step ``s_c`` (same units as the weights).
        minimum: float32 (O,) per-output-channel lowest level ``m_c``.
        ones: int32 (O,) ``sum_i k`` per output channel.
        tap_ones: int32 (O, kh, kw) ``sum over input channels of k`` per tap (conv only, else None).
        in_features: C*kh*kw for conv, K for linear (the number of real codes per output).
        in_channels: C (conv) or K (linear).
        kernel_size: (kh, kw) for conv, None for linear.
    """

    packed: torch.Tensor
    step: torch.Tensor
    minimum: torch.Tensor
    ones: torch.Tensor
    tap_ones: Optional[torch.Tensor]
    in_features: int
    in_channels: int
    kernel_size: Optional[Tuple[int, int]]
    # Derived tensors that depend only on the weight and the call geometry (float codes, the
    # per-position real-tap counts), filled on first use so that repeated calls skip them.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def out_channels(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes alone (the metadata adds 8 bytes per output channel)."""
        return self.packed.numel() * self.packed.element_size()

    def to(self, device) -> "PackedBinaryWeight":
        """Copy of this weight with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBinaryWeight(mv(self.packed), mv(self.step), mv(self.minimum), mv(self.ones),
                                  mv(self.tap_ones), self.in_features, self.in_channels, self.kernel_size)

    def codes(self) -> torch.Tensor:
        """The 0/1 codes as uint8: (O, K) for linear, (O, C, kh, kw) for conv."""
        if self.kernel_size is None:
            return unpack_bits(self.packed, self.in_features, dim=1)
        kh, kw = self.kernel_size
        cw = num_words(self.in_channels)
        words = self.packed.reshape(self.out_channels, kh, kw, cw)
        return unpack_bits(words, self.in_channels, dim=3).permute(0, 3, 1, 2).contiguous()


def _per_channel(v, out_channels: int, name: str, device) -> torch.Tensor:
    """float32 (O,) from a Python number or a 1-element / (O,) tensor."""
    if isinstance(v, torch.Tensor):
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float tensor, got {v.dtype}")
        t = v.detach().reshape(-1).to(device=device, dtype=torch.float32)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        t = torch.full((1,), float(v), dtype=torch.float32, device=device)  # a fill, no H2D copy
    else:
        raise TypeError(f"{name} must be a float or a tensor of shape ({out_channels},), got {type(v).__name__}")
    if t.numel() == 1:
        t = t.expand(out_channels)
    if t.numel() != out_channels:
        raise ValueError(f"{name} must have shape ({out_channels},) (one per output channel) or 1 element, got {t.numel()} elements")
    return t.contiguous()


def pack_linear_weight(weight_codes: torch.Tensor, weight_step, weight_min, *, check: bool = True) -> PackedBinaryWeight:
    """Pack a linear layer's binary weight once.

    Args:
        weight_codes: (O, K) bool/integer 0/1 codes k.
        weight_step: (O,) float step s_c (or a number / 1-element tensor for all channels).
        weight_min: (O,) float lowest level m_c (or a number / 1-element tensor).
        check: check that the codes are 0/1 (see :func:`pack_bits`).

    Returns:
        :class:`PackedBinaryWeight` with ``packed`` of shape (O, ceil(K/32)), on the codes' device.
    """
    check_bits(weight_codes, "weight_codes", values=check)
    if weight_codes.dim() != 2:
        raise ValueError(f"weight_codes must be 2-D (out_features, in_features), got shape {tuple(weight_codes.shape)}")
    O, K = weight_codes.shape
    dev = weight_codes.device
    return PackedBinaryWeight(
        packed=pack_bits(weight_codes, dim=1, check=False),
        step=_per_channel(weight_step, O, "weight_step", dev),
        minimum=_per_channel(weight_min, O, "weight_min", dev),
        ones=weight_codes.to(torch.int32).sum(dim=1, dtype=torch.int32),
        tap_ones=None,
        in_features=K,
        in_channels=K,
        kernel_size=None,
    )


def pack_conv_weight(weight_codes: torch.Tensor, weight_step, weight_min, *, check: bool = True) -> PackedBinaryWeight:
    """Pack a conv layer's binary weight once.

    Args:
        weight_codes: (O, C, kh, kw) bool/integer 0/1 codes k.
        weight_step: (O,) float step s_c (or a number / 1-element tensor for all channels).
        weight_min: (O,) float lowest level m_c (or a number / 1-element tensor).
        check: check that the codes are 0/1 (see :func:`pack_bits`).

    Returns:
        :class:`PackedBinaryWeight` with ``packed`` of shape (O, kh*kw*ceil(C/32)) (tap-major,
        channels LSB first within a tap), on the codes' device.
    """
    check_bits(weight_codes, "weight_codes", values=check)
    if weight_codes.dim() != 4:
        raise ValueError(f"weight_codes must be 4-D (O, C, kh, kw), got shape {tuple(weight_codes.shape)}")
    O, C, kh, kw = weight_codes.shape
    dev = weight_codes.device
    # Channels innermost so that activations can be packed once per pixel (see binary_conv2d).
    packed = pack_bits(weight_codes.permute(0, 2, 3, 1), dim=3, check=False).reshape(O, kh * kw * num_words(C))
    tap_ones = weight_codes.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return PackedBinaryWeight(
        packed=packed.contiguous(),
        step=_per_channel(weight_step, O, "weight_step", dev),
        minimum=_per_channel(weight_min, O, "weight_min", dev),
        ones=tap_ones.sum(dim=(1, 2), dtype=torch.int32),
        tap_ones=tap_ones,
        in_features=C * kh * kw,
        in_channels=C,
        kernel_size=(kh, kw),
    )


def _scalar_param(v, name: str, device) -> torch.Tensor:
    """0-d float64 tensor from a number or a 0-d / 1-element tensor (per-tensor parameter)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor (per-tensor), got shape {tuple(v.shape)}")
        return v.detach().reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.full((), float(v), dtype=torch.float64, device=device)  # a fill, no H2D copy
    raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(v).__name__}")


def _resolve_weight(weight_codes, weight_step, weight_min, conv: bool, check: bool) -> PackedBinaryWeight:
    if isinstance(weight_codes, PackedBinaryWeight):
        if weight_step is not None or weight_min is not None:
            raise ValueError("weight_step and weight_min must be None when weight_codes is a "
                             "PackedBinaryWeight (it stores them)")
        if (weight_codes.kernel_size is not None) != conv:
            kind = "pack_conv_weight" if conv else "pack_linear_weight"
            raise ValueError(f"weight_codes is a PackedBinaryWeight of the wrong kind; build it with {kind}")
        return weight_codes
    if weight_step is None or weight_min is None:
        raise ValueError("weight_step and weight_min are required when weight_codes is a tensor of codes")
    return (pack_conv_weight if conv else pack_linear_weight)(weight_codes, weight_step, weight_min, check=check)


def _bias(bias, out_channels, device):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a tensor of shape ({out_channels},) or None, got {type(bias).__name__}")
    if bias.numel() != out_channels:
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return bias.detach().reshape(-1).to(device=device, dtype=torch.float64)


# ----------------------------------------------------------------------------- linear

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
        backend: GEMM backend (see module docstring).
        check: check that the codes are 0/1 (see :func:`pack_bits`); False for codes known to be.

    Returns:
        float32 (..., O), the float64-accurate result rounded once to float32.
    """
    check_bits(act_codes, "act_codes", values=check)
    pw = _resolve_weight(weight_codes, weight_step, weight_min, conv=False, check=check)
    dev = act_codes.device
    if pw.packed.device != dev:
        raise ValueError(f"weight is on {pw.packed.device} but act_codes is on {dev}")
    if act_codes.dim() < 1 or act_codes.shape[-1] != pw.in_features:
        raise ValueError(f"act_codes must have shape (..., {pw.in_features}), got {tuple(act_codes.shape)}")
    s_a = _scalar_param(act_step, "act_step", dev)
    beta = _scalar_param(act_offset, "act_offset", dev)
    b = _bias(bias, pw.out_channels, dev)
    lead = act_codes.shape[:-1]
    j = act_codes.reshape(-1, pw.in_features)
    name = resolve_backend(j, backend)
    _remember(pw)
    out = torch.ops.gdnsq.binary_linear(j, s_a, beta, pw.packed, pw.step, pw.minimum, pw.ones, b, name)
    return out.reshape(*lead, pw.out_channels)


def _binary_linear_impl(j, s_a, beta, pw: PackedBinaryWeight, b, name: str) -> torch.Tensor:
    """float32 (M, O) of (M, K) codes ``j`` (the body of ``gdnsq::binary_linear``)."""
    K = pw.in_features
    if name == "reference":
        return _ref.binary_linear_reference(j, s_a, beta, pw.codes(), pw.step, pw.minimum, b)
    kj = _packed_gemm(pack_bits_unchecked(j, dim=1), pw.packed, K, False, name)  # int32 (M, O)
    jsum = j.sum(dim=1, dtype=torch.int32)[:, None]  # (M, 1)
    s = pw.step.to(torch.float64)
    m = pw.minimum.to(torch.float64)
    const = s * beta * pw.ones.to(torch.float64) + m * beta * K  # (O,)
    if b is not None:
        const = const + b
    if name == "cpu" and _cpp_gemm_available():  # one fused pass, same arithmetic
        from .cpu_xnor import linear_epilogue

        return linear_epilogue(kj, jsum.reshape(-1), (s * s_a).contiguous(), (m * s_a).contiguous(),
                               const.expand(pw.out_channels).contiguous())
    # Same-dtype in-place passes (mixed-dtype addcmul takes a slow unvectorised path).
    out = kj.to(torch.float64).mul_(s * s_a).add_(const)
    out.addcmul_(jsum.to(torch.float64), m * s_a)
    return out.to(torch.float32)


# ----------------------------------------------------------------------------- conv2d

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
        backend: GEMM backend (see module docstring).
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
    pw = _resolve_weight(weight_codes, weight_step, weight_min, conv=True, check=check)
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
    Ho = (H + pt + pb - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (Wd + pl + pr - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"act_codes of spatial size {(H, Wd)} is too small for kernel {(kh, kw)} "
                         f"with padding {(pt, pb, pl, pr)} and dilation {dilation}")
    s_a = _scalar_param(act_step, "act_step", dev)
    beta = _scalar_param(act_offset, "act_offset", dev)
    b = _bias(bias, pw.out_channels, dev)
    name = resolve_backend(act_codes, backend)
    _remember(pw)
    return torch.ops.gdnsq.binary_conv2d(act_codes, s_a, beta, pw.packed, pw.step, pw.minimum, pw.ones,
                                         pw.tap_ones, b, list(stride), [pt, pb, pl, pr], list(dilation),
                                         name)


def _conv_out_size(H, Wd, kh, kw, stride, pads, dilation):
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
        if name == "cpu" and _cpp_gemm_available():
            # Patches as the GEMM's M side (measured faster); the fused C++ epilogue reads
            # the (N, L, O+1) result and writes NCHW.
            kjt_int = _packed_gemm(patches, pw.cache["aug"], kbits, False, name).reshape(Nb, Ho * Wo, O + 1)
            kj = jsum = None
        else:
            # Weight rows as the M side: the (O+1, N*L) result is channel-major, so NCHW needs
            # only a batch/channel swap of contiguous Ho*Wo planes (no element transpose).
            kjt = _packed_gemm(pw.cache["aug"], patches, kbits, False, name)
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


# ----------------------------------------------------------------------------- gdnsq:: ops
#
#   gdnsq::packed_gemm(Tensor a, Tensor b, int k, bool xnor, str backend) -> Tensor   int32 (M, N)
#   gdnsq::binary_linear(Tensor j, Tensor s_a, Tensor beta, Tensor packed, Tensor step,
#       Tensor minimum, Tensor ones, Tensor? bias, str backend) -> Tensor           float32 (M, O)
#   gdnsq::binary_conv2d(Tensor act_codes, Tensor s_a, Tensor beta, Tensor packed, Tensor step,
#       Tensor minimum, Tensor ones, Tensor? tap_ones, Tensor? bias, int[] stride, int[] pads,
#       int[] dilation, str backend) -> Tensor                              float32 (N, O, Ho, Wo)
#
# The Python wrappers above validate (shapes, 0/1 values outside tracing) and resolve the
# backend. A PackedBinaryWeight enters the ops as its tensors; its Python-side cache (derived
# tensors per geometry) is found again through the packed words (weak reference), so repeated
# eager calls keep skipping that work.

from torch.utils.weak import WeakTensorKeyDictionary  # noqa: E402

_PACKED_WEIGHTS = WeakTensorKeyDictionary()


def _remember(pw: PackedBinaryWeight) -> None:
    if _PACKED_WEIGHTS.get(pw.packed) is not pw:
        _PACKED_WEIGHTS[pw.packed] = pw


def _weight_of(packed, step, minimum, ones, tap_ones, in_channels: int, kernel_size) -> PackedBinaryWeight:
    pw = _PACKED_WEIGHTS.get(packed)
    if (pw is not None and pw.step is step and pw.minimum is minimum and pw.ones is ones
            and pw.tap_ones is tap_ones):
        return pw
    kh, kw = kernel_size if kernel_size is not None else (1, 1)
    return PackedBinaryWeight(packed, step, minimum, ones, tap_ones, in_channels * kh * kw, in_channels,
                              kernel_size)


@torch.library.custom_op("gdnsq::packed_gemm", mutates_args=())
def _packed_gemm_op(a: torch.Tensor, b: torch.Tensor, k: int, xnor: bool, backend: str) -> torch.Tensor:
    out = _packed_gemm(a, b, k, xnor, backend)
    return out.contiguous()


@_packed_gemm_op.register_fake
def _(a, b, k, xnor, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.custom_op("gdnsq::binary_linear", mutates_args=())
def _binary_linear_op(j: torch.Tensor, s_a: torch.Tensor, beta: torch.Tensor, packed: torch.Tensor,
                      step: torch.Tensor, minimum: torch.Tensor, ones: torch.Tensor,
                      bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    pw = _weight_of(packed, step, minimum, ones, None, j.shape[1], None)
    return _binary_linear_impl(j, s_a, beta, pw, bias, backend).contiguous()


@_binary_linear_op.register_fake
def _(j, s_a, beta, packed, step, minimum, ones, bias, backend):
    return j.new_empty((j.shape[0], packed.shape[0]), dtype=torch.float32)


@torch.library.custom_op("gdnsq::binary_conv2d", mutates_args=())
def _binary_conv2d_op(act_codes: torch.Tensor, s_a: torch.Tensor, beta: torch.Tensor,
                      packed: torch.Tensor, step: torch.Tensor, minimum: torch.Tensor,
                      ones: torch.Tensor, tap_ones: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      stride: List[int], pads: List[int], dilation: List[int],
                      backend: str) -> torch.Tensor:
    kernel = tuple(tap_ones.shape[1:])
    pw = _weight_of(packed, step, minimum, ones, tap_ones, act_codes.shape[1], kernel)
    return _binary_conv2d_impl(act_codes, s_a, beta, pw, bias, tuple(stride), tuple(pads),
                               tuple(dilation), backend).contiguous()


@_binary_conv2d_op.register_fake
def _(act_codes, s_a, beta, packed, step, minimum, ones, tap_ones, bias, stride, pads, dilation, backend):
    N, _, H, Wd = act_codes.shape
    kh, kw = tap_ones.shape[1:]
    Ho, Wo = _conv_out_size(H, Wd, kh, kw, stride, pads, dilation)
    return act_codes.new_empty((N, packed.shape[0], Ho, Wo), dtype=torch.float32)
