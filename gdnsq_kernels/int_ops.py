"""Exact integer kernels for deployed models: conv / GEMM on uint8 x int8 codes, 1-bit popcount GEMM and conv.

The building blocks a deploy plan runs between its quantizers (``csrc/int_ops.cpp``):

* ``int_conv2d(x, w, stride, padding, dilation, groups, pad_code)``: NHWC uint8 activation codes
  ``(N, H, W, C_in)`` x int8 weight codes ``(C_out, kh, kw, C_in / groups)`` -> the exact int32
  sums ``(N, Ho, Wo, C_out)``. Any kernel size, stride, padding (padded taps hold ``pad_code``,
  the code of a zero activation: codes are offset) and dilation; grouped convs, and depthwise
  (``groups == C_in == C_out``) with its own loop.
* ``int_linear(x, w)``: ``(..., K)`` uint8 x ``(N, K)`` int8 -> int32 ``(..., N)``.
* ``popcount_linear(x_bits, w_bits, k)``: 1-bit GEMM on int64 words, ``sum x & w`` over the
  ``k`` valid bits, or the XNOR form ``sum (2x - 1)(2w - 1)``.
* ``popcount_conv2d(x_bits, w, stride, padding, dilation, with_sums=False)``: the W1A1 conv.
  ``x_bits`` int64 ``(N, H, W, ceil(C/64))`` channel-packed NHWC (``pack_channel_bits(codes)``:
  bit ``c % 64`` of word ``c // 64`` = ``codes[..., c] != 0``), ``w`` 0/1 ``(O, kh, kw, C)`` ->
  int32 ``(N, Ho, Wo, O)`` = ``sum x & w`` over the taps inside the image (padded taps add 0);
  ``with_sums`` also returns ``S`` int32 ``(N, Ho, Wo)``, the set input bits under each window.
  Any kernel size, stride, padding, dilation; groups = 1.

Every output is exact (integer arithmetic only; the checks refuse a reduction long enough for an
int32 sum to wrap), so every build and thread count gives the same tensor bit for bit. The
oracle is ``gdnsq_kernels.int_reference`` (plain PyTorch, shares no code with this module).

Weights are packed once into the kernels' layout (``pack_int_conv_weight``,
``pack_int_linear_weight``, ``pack_popcount_weight``, ``pack_popcount_conv_weight``: plain
torch reshapes, any ISA); a plain tensor passed as ``w`` is packed on every call, fine for
tests, wasteful in a model. A 1-bit conv weight's rows are either per tap (``ceil(C/64)`` words
a tap, read in place from the zero-padded image) or ``tight`` (``ceil(kh*kw*C/64)`` words: an
implicit im2col row built per pixel, for C not a multiple of 64), whichever has fewer words.

Builds: the instruction set is chosen at build time as for the fused runtime
(``gdnsq_kernels.cpu_deploy``: ``avx512vnni``, ``avx512``, ``avx2``, ``scalar``;
``GDNSQ_DEPLOY_ISA`` or ``isa=`` forces one). ``avx512vnni`` runs ``vpdpbusd`` and VPOPCNTDQ;
``avx512`` VPOPCNTDQ and the AVX2 byte kernels; ``avx2`` ``vpmaddubsw`` + ``vpmaddwd`` (exact for
codes <= 127, checked per call: larger codes run the plain loops) and scalar ``popcnt``;
``scalar`` plain loops. Register tiles: up to 24 accumulators (e.g. 4 x 16 output channels x 6
pixels for ``vpdpbusd``, 4 x 8 x 6 for the popcount kernels); the last pixels / GEMM rows run
in tiles of 8, 4, 2, 1 (an M = 1 GEMM computes one row, not six). Threads:
``at::parallel_for`` over pixel tiles (``torch.set_num_threads``); every thread count gives the
same tensors bit for bit.

Speed (``benchmarks/results/int_ops.md``, one loaded Zen 4 core): uint8 x int8 2.8-4.7x FP32 on
the ResNet-18 3x3 convs, 3-4x on BERT linears at M >= 16; 1-bit popcount 3.5-17x on those convs;
1x1 convs with few channels are bound by the int32 output they write (1.4-3x), depthwise convs
are memory bound (0.6-1.25x), 16-channel 1-bit convs by their im2col rows (1.5x at batch 16).

Each op is a ``gdnsq::`` custom op with a fake implementation (``torch.compile`` / ``export``
see one node): ``gdnsq::int_conv2d``, ``gdnsq::int_linear``, ``gdnsq::popcount_linear``,
``gdnsq::popcount_conv2d``, ``gdnsq::pack_channel_bits``.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from ._build import Extension, build_spec
from .cpu_deploy import _ISA_FLAGS, ISAS, default_isa, supported_isas

__all__ = [
    "IntConvWeight", "PopcountWeight", "PopcountConvWeight", "pack_int_conv_weight", "pack_int_linear_weight",
    "pack_popcount_weight", "pack_popcount_conv_weight", "pack_channel_bits", "int_conv2d", "int_linear",
    "popcount_linear", "popcount_conv2d", "load_extension", "MAX_EXACT_K",
]

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "int_ops.cpp")
_lock = threading.Lock()
_exts: dict = {}        # isa -> loaded module (the per-call cache)
_extensions: dict = {}  # isa -> Extension (build under the flock)

#: The longest reduction (kh*kw*C_in/groups, or K) whose int32 sums cannot wrap:
#: K * 255 * 128 <= 2^31 - 1.
MAX_EXACT_K = (2**31 - 1) // (255 * 128)


def load_extension(isa: str | None = None):
    """Build (first call) or load the ``int_ops`` extension for ``isa`` (default: best
    available), under the cross-process build lock of ``gdnsq_kernels._build``."""
    loaded = _exts.get(isa)  # the per-call path: no lock, no checks
    if loaded is not None:
        return loaded
    isa = _resolve_isa(isa)
    with _lock:
        if isa not in _extensions:
            flags = ["-O3", "-fopenmp"] + _ISA_FLAGS[isa]
            _extensions[isa] = Extension(f"the C++ integer ops ({isa})", "no fallback: the call raises",
                                         lambda: build_spec(f"gdnsq_int_ops_{isa}", _SOURCE, flags))
    module = _extensions[isa].load()
    _exts[isa] = module
    return module


@functools.lru_cache(maxsize=None)
def _supported_isas() -> tuple:
    return supported_isas()  # reads /proc/cpuinfo: once per process, not per call


def _resolve_isa(isa) -> str:
    isa = isa or default_isa()
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa not in _supported_isas():
        raise ValueError(f"isa {isa!r} is not supported by this CPU (supported: {_supported_isas()})")
    return isa


# ----------------------------------------------------------------------------- weight packing


@dataclass(frozen=True)
class IntConvWeight:
    """int8 weight codes in the kernels' layout.

    ``packed``: int8, 1-D. Dense / grouped: ``[G][kh*kw][ceil(Cg/4)][ceil16(Og)][4]`` (16 output
    channels x 4 input channels = one ``vpdpbusd`` operand; padding is 0). Depthwise:
    ``[kh*kw][ceil16(C)]``. ``shape``: the logical weight shape ``(C_out, kh, kw, C_in/groups)``
    (a linear weight ``(N, K)`` is ``(N, 1, 1, K)``); ``groups``: the conv's groups.
    """

    packed: Tensor
    shape: Tuple[int, int, int, int]
    groups: int

    @property
    def depthwise(self) -> bool:
        return _is_depthwise(self.shape, self.groups)


@dataclass(frozen=True)
class PopcountWeight:
    """1-bit weights in the popcount kernel's layout: ``packed`` int64 ``[W][ceil8(N)]`` (word i of
    output column n, bits past ``k`` cleared), for ``n`` columns of ``k`` bits."""

    packed: Tensor
    n: int
    k: int


@dataclass(frozen=True)
class PopcountConvWeight:
    """1-bit conv weights in ``popcount_conv2d``'s layout: ``packed`` int64 ``[K][ceil8(O)]``
    (word k of output channel o). ``shape``: ``(O, kh, kw, C)``. ``tight``: the rows' layout:
    ``False``, per tap: ``K = kh*kw*ceil(C/64)``, word ``t*ceil(C/64) + q`` = channels ``64q..``
    of tap ``t`` (the kernel reads the input words in place); ``True``: ``K = ceil(kh*kw*C/64)``,
    bit ``t*C + c`` = channel ``c`` of tap ``t`` (an implicit im2col row packed tightly, chosen
    when it has fewer words: C not a multiple of 64, e.g. a 16-channel 3x3 conv reads 3 words per
    pixel, not 9). Bits past the valid ones are 0."""

    packed: Tensor
    shape: Tuple[int, int, int, int]
    tight: bool


def _is_depthwise(shape, groups: int) -> bool:
    return groups > 1 and shape[3] == 1 and shape[0] == groups


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


def _check_tensor(t, name: str, dtype: torch.dtype, dim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} {what}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got one on {t.device}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {what}, got shape {tuple(t.shape)}")


def pack_int_conv_weight(w: Tensor, groups: int = 1) -> IntConvWeight:
    """Pack int8 weight codes ``w`` ``(C_out, kh, kw, C_in/groups)`` (OHWI, as NHWC activations
    want them; an OIHW tensor is ``w.permute(0, 2, 3, 1)``) for ``int_conv2d``."""
    _check_tensor(w, "w", torch.int8, 4, "(C_out, kh, kw, C_in/groups)")
    groups = _positive_int(groups, "groups")
    O, kh, kw, Cg = (int(v) for v in w.shape)
    if min(O, kh, kw, Cg) == 0:
        raise ValueError(f"w must have no zero-sized dimension, got shape {tuple(w.shape)}")
    if O % groups:
        raise ValueError(f"w's C_out={O} must be divisible by groups={groups}")
    T = kh * kw
    if _is_depthwise(w.shape, groups):
        packed = torch.zeros(T, _ceil(O, 16), dtype=torch.int8)
        packed[:, :O] = w.reshape(O, T).t()
    else:
        Og, Np, Cgp = O // groups, _ceil(O // groups, 16), _ceil(Cg, 4)
        padded = torch.zeros(groups, Np, T, Cgp, dtype=torch.int8)
        padded[:, :Og, :, :Cg] = w.reshape(groups, Og, T, Cg)
        packed = padded.view(groups, Np, T, Cgp // 4, 4).permute(0, 2, 3, 1, 4)
    return IntConvWeight(packed.contiguous().view(-1), (O, kh, kw, Cg), groups)


def pack_int_linear_weight(w: Tensor) -> IntConvWeight:
    """Pack int8 weight codes ``w`` ``(N, K)`` (``nn.Linear`` layout) for ``int_linear``."""
    _check_tensor(w, "w", torch.int8, 2, "(N, K)")
    return pack_int_conv_weight(w.reshape(w.shape[0], 1, 1, w.shape[1]))


def pack_popcount_weight(w_bits: Tensor, k: int) -> PopcountWeight:
    """Pack 1-bit weights ``w_bits`` int64 ``(N, ceil(k/64))`` (bit b of word i = element
    ``64 i + b``, LSB first) for ``popcount_linear``; bits past ``k`` are cleared."""
    _check_tensor(w_bits, "w_bits", torch.int64, 2, "(N, ceil(k/64))")
    k = _positive_int(k, "k")
    N, W = (int(v) for v in w_bits.shape)
    if N == 0:
        raise ValueError("w_bits must have at least one row (output column)")
    if W != -(-k // 64):
        raise ValueError(f"w_bits must have ceil(k/64)={-(-k // 64)} words per row for k={k}, got {W}")
    packed = torch.zeros(W, _ceil(N, 8), dtype=torch.int64)
    packed[:, :N] = w_bits.t()
    rem = k - 64 * (W - 1)
    if rem < 64:
        packed[-1] &= (1 << rem) - 1
    return PopcountWeight(packed.view(-1), N, k)


def _words(bits: Tensor) -> Tensor:
    """int64 0/1 ``(..., 64 w)`` -> int64 ``(..., w)``, bit b of word i = element ``64 i + b``."""
    shifts = torch.arange(64, dtype=torch.int64)
    return (bits.reshape(bits.shape[:-1] + (-1, 64)) << shifts).sum(-1)  # distinct bits: sum = OR


def pack_popcount_conv_weight(w01: Tensor) -> PopcountConvWeight:
    """Pack 1-bit conv weights ``w01`` ``(O, kh, kw, C)`` (OHWI; any integer or bool dtype,
    bit = ``w01 != 0``) for ``popcount_conv2d``. The row layout (``tight`` or per tap) is the one
    with fewer words per output pixel."""
    if not isinstance(w01, torch.Tensor):
        raise TypeError(f"w01 must be a torch.Tensor (O, kh, kw, C) of 0/1 weights, got {type(w01).__name__}")
    if w01.dtype.is_floating_point or w01.dtype.is_complex:
        raise TypeError(f"w01 must be an integer or bool tensor of 0/1 weights, got {w01.dtype}")
    if w01.dim() != 4:
        raise ValueError(f"w01 must be 4-D (O, kh, kw, C), got shape {tuple(w01.shape)}")
    O, kh, kw, C = (int(v) for v in w01.shape)
    if min(O, kh, kw, C) == 0:
        raise ValueError(f"w01 must have no zero-sized dimension, got shape {tuple(w01.shape)}")
    T, CW = kh * kw, -(-C // 64)
    K_tight = -(-T * C // 64)
    tight = K_tight < T * CW
    bits = (w01.cpu() != 0).to(torch.int64)
    if tight:
        rows = torch.zeros(O, K_tight * 64, dtype=torch.int64)
        rows[:, :T * C] = bits.reshape(O, T * C)
    else:
        rows = torch.zeros(O, T, CW * 64, dtype=torch.int64)
        rows[:, :, :C] = bits.reshape(O, T, C)
    words = _words(rows.reshape(O, -1))  # (O, K)
    packed = torch.zeros(words.shape[1], _ceil(O, 8), dtype=torch.int64)
    packed[:, :O] = words.t()
    return PopcountConvWeight(packed.view(-1), (O, kh, kw, C), tight)


# ----------------------------------------------------------------------------- argument checks


def _positive_int(v, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _pair(v, name: str, minimum: int) -> List[int]:
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and
            all(isinstance(e, int) and not isinstance(e, bool) for e in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(pair)}")
    return [int(pair[0]), int(pair[1])]


def _check_contiguous(t: Tensor, name: str, layout: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {layout} (call .contiguous() on it), got strides {t.stride()}")


def _check_reduction(k: int, what: str) -> None:
    if k > MAX_EXACT_K:
        raise ValueError(f"{what} = {k} is longer than {MAX_EXACT_K}: its int32 sums could wrap")


def _conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gdnsq::int_conv2d", mutates_args=())
def _int_conv2d_op(x: Tensor, w_packed: Tensor, w_shape: List[int], stride: List[int], padding: List[int],
                   dilation: List[int], groups: int, pad_code: int, isa: str) -> Tensor:
    return load_extension(isa).conv2d(x, w_packed, w_shape, stride, padding, dilation, groups, pad_code)


@_int_conv2d_op.register_fake
def _(x, w_packed, w_shape, stride, padding, dilation, groups, pad_code, isa):
    ho = _conv_out_size(x.shape[1], w_shape[1], stride[0], padding[0], dilation[0])
    wo = _conv_out_size(x.shape[2], w_shape[2], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], ho, wo, w_shape[0]), dtype=torch.int32)


@torch.library.custom_op("gdnsq::int_linear", mutates_args=())
def _int_linear_op(x: Tensor, w_packed: Tensor, n: int, isa: str) -> Tensor:
    return load_extension(isa).linear(x, w_packed, n)


@_int_linear_op.register_fake
def _(x, w_packed, n, isa):
    return x.new_empty((x.shape[0], n), dtype=torch.int32)


@torch.library.custom_op("gdnsq::popcount_linear", mutates_args=())
def _popcount_linear_op(x_bits: Tensor, w_packed: Tensor, n: int, k: int, xnor: bool, isa: str) -> Tensor:
    return load_extension(isa).popcount_linear(x_bits, w_packed, n, k, xnor)


@_popcount_linear_op.register_fake
def _(x_bits, w_packed, n, k, xnor, isa):
    return x_bits.new_empty((x_bits.shape[0], n), dtype=torch.int32)


@torch.library.custom_op("gdnsq::popcount_conv2d", mutates_args=())
def _popcount_conv2d_op(x_bits: Tensor, w_packed: Tensor, w_shape: List[int], stride: List[int], padding: List[int],
                        dilation: List[int], tight: bool, with_sums: bool, isa: str) -> Tuple[Tensor, Tensor]:
    out, sums = load_extension(isa).popcount_conv2d(x_bits, w_packed, w_shape, stride, padding, dilation, tight,
                                                    with_sums)
    return out, sums


@_popcount_conv2d_op.register_fake
def _(x_bits, w_packed, w_shape, stride, padding, dilation, tight, with_sums, isa):
    ho = _conv_out_size(x_bits.shape[1], w_shape[1], stride[0], padding[0], dilation[0])
    wo = _conv_out_size(x_bits.shape[2], w_shape[2], stride[1], padding[1], dilation[1])
    out = x_bits.new_empty((x_bits.shape[0], ho, wo, w_shape[0]), dtype=torch.int32)
    sums = x_bits.new_empty((x_bits.shape[0], ho, wo) if with_sums else (0,), dtype=torch.int32)
    return out, sums


@torch.library.custom_op("gdnsq::pack_channel_bits", mutates_args=())
def _pack_channel_bits_op(codes: Tensor, isa: str) -> Tensor:
    return load_extension(isa).pack_channel_bits(codes)


@_pack_channel_bits_op.register_fake
def _(codes, isa):
    return codes.new_empty((codes.shape[0], -(-codes.shape[1] // 64)), dtype=torch.int64)


# ----------------------------------------------------------------------------- public functions


def int_conv2d(x: Tensor, w: Union[Tensor, IntConvWeight], stride=1, padding=0, dilation=1, groups: int = 1,
               pad_code: int = 0, *, isa: str | None = None) -> Tensor:
    """Exact integer convolution of NHWC activation codes.

    ``x``: uint8 ``(N, H, W, C_in)``, contiguous. ``w``: int8 codes ``(C_out, kh, kw, C_in/groups)``
    or an ``IntConvWeight`` from ``pack_int_conv_weight(w, groups)``. ``stride`` / ``padding`` /
    ``dilation``: int or (h, w). Padded taps hold ``pad_code`` (0..255). Returns int32
    ``(N, Ho, Wo, C_out)``: ``out[n, y, x, o] = sum_{i, j, c} x_pad[n, y*sh + i*dh, x*sw + j*dw,
    g*Cg + c] * w[o, i, j, c]`` with g = o's group, exactly.
    """
    _check_tensor(x, "x", torch.uint8, 4, "(N, H, W, C_in) codes")
    _check_contiguous(x, "x", "NHWC (N, H, W, C_in)")
    groups = _positive_int(groups, "groups")
    if not isinstance(w, IntConvWeight):
        w = pack_int_conv_weight(w, groups)
    elif w.groups != groups:
        raise ValueError(f"w was packed for groups={w.groups}, got groups={groups}")
    stride, padding, dilation = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    pad_code = _positive_int(pad_code, "pad_code", 0)
    if pad_code > 255:
        raise ValueError(f"pad_code must be a uint8 code in [0, 255], got {pad_code}")
    O, kh, kw, Cg = w.shape
    C = x.shape[3]
    if C != groups * Cg:
        raise ValueError(f"x has C_in={C} channels but w expects groups*C_in/groups = {groups}*{Cg} = {groups * Cg}")
    _check_reduction(kh * kw * Cg, "the reduction length kh*kw*C_in/groups")
    sizes = [_conv_out_size(int(x.shape[1 + a]), (kh, kw)[a], stride[a], padding[a], dilation[a]) for a in (0, 1)]
    if min(sizes) < 1:
        raise ValueError(f"x's spatial size {tuple(x.shape[1:3])} with padding {tuple(padding)} is smaller than "
                         f"the dilated kernel ({kh}, {kw}) x {tuple(dilation)}")
    return _int_conv2d_op(x, w.packed, list(w.shape), stride, padding, dilation, groups, pad_code, _resolve_isa(isa))


def int_linear(x: Tensor, w: Union[Tensor, IntConvWeight], *, isa: str | None = None) -> Tensor:
    """Exact integer GEMM ``x @ w.T``: ``x`` uint8 ``(..., K)`` contiguous, ``w`` int8 ``(N, K)``
    or an ``IntConvWeight`` from ``pack_int_linear_weight(w)``. Returns int32 ``(..., N)``."""
    _check_tensor(x, "x", torch.uint8, max(1, getattr(x, "ndim", 1)), "(..., K) codes")
    _check_contiguous(x, "x", "(..., K)")
    if not isinstance(w, IntConvWeight):
        w = pack_int_linear_weight(w)
    N, kh, kw, K = w.shape
    if (kh, kw) != (1, 1) or w.groups != 1:
        raise ValueError(f"w must be packed with pack_int_linear_weight, got a conv weight of shape {w.shape}")
    if x.shape[-1] != K:
        raise ValueError(f"x must have K={K} features in its last dimension, got shape {tuple(x.shape)}")
    _check_reduction(K, "K")
    lead = tuple(x.shape[:-1])
    out = _int_linear_op(x.reshape(-1, K), w.packed, N, _resolve_isa(isa))
    return out.reshape(lead + (N,))


def popcount_linear(x_bits: Tensor, w_bits: Union[Tensor, PopcountWeight], k: int, *, xnor: bool = False,
                    isa: str | None = None) -> Tensor:
    """1-bit GEMM: ``x_bits`` int64 ``(M, ceil(k/64))`` (bit b of word i = element ``64 i + b``),
    ``w_bits`` int64 ``(N, ceil(k/64))`` or a ``PopcountWeight``. Returns int32 ``(M, N)``:
    ``sum_b x_b * w_b`` (AND form) or, with ``xnor=True``, ``sum_b (2 x_b - 1)(2 w_b - 1)``, over
    the ``k`` valid bits (bits past ``k`` are ignored)."""
    _check_tensor(x_bits, "x_bits", torch.int64, 2, "(M, ceil(k/64)) words")
    _check_contiguous(x_bits, "x_bits", "(M, W)")
    k = _positive_int(k, "k")
    if not isinstance(xnor, bool):
        raise TypeError(f"xnor must be a bool, got {xnor!r}")
    if not isinstance(w_bits, PopcountWeight):
        w_bits = pack_popcount_weight(w_bits, k)
    elif w_bits.k != k:
        raise ValueError(f"w_bits was packed for k={w_bits.k}, got k={k}")
    if x_bits.shape[1] != -(-k // 64):
        raise ValueError(f"x_bits must have ceil(k/64)={-(-k // 64)} words per row for k={k}, "
                         f"got shape {tuple(x_bits.shape)}")
    return _popcount_linear_op(x_bits, w_bits.packed, w_bits.n, k, xnor, _resolve_isa(isa))



def pack_channel_bits(codes: Tensor, *, isa: str | None = None) -> Tensor:
    """Channel-pack 1-bit activation codes: ``codes`` uint8 ``(..., C)`` contiguous (an NHWC
    image ``(N, H, W, C)``, or GEMM rows ``(M, K)``) -> int64 ``(..., ceil(C/64))``, bit
    ``c % 64`` of word ``c // 64`` = ``codes[..., c] != 0``; bits past ``C`` are 0. The input
    layout of ``popcount_conv2d`` (and ``popcount_linear``'s ``x_bits``)."""
    _check_tensor(codes, "codes", torch.uint8, max(1, getattr(codes, "ndim", 1)), "(..., C) codes")
    _check_contiguous(codes, "codes", "(..., C)")
    C = int(codes.shape[-1])
    if C == 0:
        raise ValueError(f"codes must have at least one channel, got shape {tuple(codes.shape)}")
    lead = tuple(codes.shape[:-1])
    return _pack_channel_bits_op(codes.reshape(-1, C), _resolve_isa(isa)).reshape(lead + (-(-C // 64),))


def popcount_conv2d(x_bits: Tensor, w: Union[Tensor, PopcountConvWeight], stride=1, padding=0, dilation=1, *,
                    with_sums: bool = False, isa: str | None = None):
    """1-bit (W1A1) convolution by AND + popcount, exact.

    ``x_bits``: int64 ``(N, H, W, ceil(C/64))`` contiguous, from ``pack_channel_bits`` (bit
    ``c % 64`` of word ``c // 64`` = channel ``c``; bits past ``C`` are ignored). ``w``: 0/1
    weights ``(O, kh, kw, C)`` (OHWI) or a ``PopcountConvWeight`` from
    ``pack_popcount_conv_weight``. ``stride`` / ``padding`` / ``dilation``: int or (h, w); padded
    taps are 0 bits (they add nothing). Returns int32 ``(N, Ho, Wo, O)``: ``out[n, y, x, o] =
    sum_{i, j, c} x[n, y*sh + i*dh - ph, x*sw + j*dw - pw, c] & w[o, i, j, c]`` over the taps
    inside the image; with ``with_sums=True`` also int32 ``(N, Ho, Wo)`` ``S`` = the number of
    set input bits under each window (what an epilogue needs besides ``out`` for codes with an
    offset, e.g. the +-1 form ``sum (2x - 1)(2w - 1) = 4 out - 2 S - 2 |w| + taps`` over the
    valid taps).
    """
    _check_tensor(x_bits, "x_bits", torch.int64, 4, "(N, H, W, ceil(C/64)) words")
    _check_contiguous(x_bits, "x_bits", "NHWC words (N, H, W, ceil(C/64))")
    if not isinstance(with_sums, bool):
        raise TypeError(f"with_sums must be a bool, got {with_sums!r}")
    if not isinstance(w, PopcountConvWeight):
        w = pack_popcount_conv_weight(w)
    O, kh, kw, C = w.shape
    if x_bits.shape[3] != -(-C // 64):
        raise ValueError(f"x_bits must have ceil(C/64)={-(-C // 64)} words per pixel for the weight's C={C}, "
                         f"got shape {tuple(x_bits.shape)}")
    stride, padding, dilation = _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    sizes = [_conv_out_size(int(x_bits.shape[1 + a]), (kh, kw)[a], stride[a], padding[a], dilation[a]) for a in (0, 1)]
    if min(sizes) < 1:
        raise ValueError(f"x_bits' spatial size {tuple(x_bits.shape[1:3])} with padding {tuple(padding)} is smaller "
                         f"than the dilated kernel ({kh}, {kw}) x {tuple(dilation)}")
    out, sums = _popcount_conv2d_op(x_bits, w.packed, list(w.shape), stride, padding, dilation, w.tight, with_sums,
                                    _resolve_isa(isa))
    return (out, sums) if with_sums else out
