"""Packing of 0/1 codes into 32-bit words, and validation shared by the packed-bit ops.

Bit order (fixed for every op in ``gdnsq_kernels``): along the packed dimension, bit ``i``
(LSB first, ``i = 0..31``) of word ``w`` holds element ``32*w + i``. Words are ``torch.int32``
holding the two's-complement bit pattern, so element ``32*w + 31`` is the sign bit. The last
word is zero-padded: bits at positions ``>= k`` are 0 when produced by :func:`pack_bits`.
"""
from __future__ import annotations

import numpy as np
import torch

WORD_BITS = 32
MAX_GEMM_K = 2**31 - 1  # the GEMMs return int32 sums of k terms


def num_words(k: int) -> int:
    """Number of int32 words that hold ``k`` bits: ``ceil(k / 32)``."""
    return (k + WORD_BITS - 1) // WORD_BITS


def tail_mask(k: int) -> int:
    """int32 bit pattern selecting the ``k % 32`` valid bits of the last word (-1 = all 32)."""
    r = k % WORD_BITS
    if r == 0:
        return -1
    return (1 << r) - 1  # r <= 31 bits: positive, fits int32


def masked_tail(x: torch.Tensor, k: int) -> torch.Tensor:
    """Copy of ``x`` with bits past k cleared (no copy when k fills its last word)."""
    m = tail_mask(k)
    if m == -1:
        return x
    x = x.clone()
    x[:, -1] &= m
    return x


def _normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if ndim == 0:
        raise ValueError(f"{name}: cannot pack/unpack a 0-d tensor, it has no dimension {dim}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-d tensor")
    return dim % ndim


def check_bits(bits: torch.Tensor, name: str = "bits", *, values: bool = True) -> None:
    """Raise unless ``bits`` is a bool or integer tensor whose values are all 0 or 1.

    ``values=False`` checks the type only: the caller vouches for the values (codes the library
    produced itself), so nothing is read. The value check reads one flag on the host, which on
    an accelerator is a synchronisation, but a bad code then raises a ``ValueError`` here
    instead of a device-side assert that would leave the CUDA context unusable.
    """
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of 0/1 codes, got {type(bits).__name__}")
    if bits.is_floating_point() or bits.is_complex():
        raise TypeError(
            f"{name} must be a bool or integer tensor of 0/1 codes, got {bits.dtype} "
            f"(convert exact codes with .to(torch.uint8))"
        )
    if values and bits.dtype != torch.bool and bits.numel() > 0 and not _tracing(bits):
        _check_values(bits, name)


def _check_values(bits: torch.Tensor, name: str) -> None:
    """ValueError naming the first code outside {0, 1} (a code > 1 would set a neighbouring bit
    when packed)."""
    if bits.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"{name}: checking that the codes are 0/1 reads them on the host, which a CUDA "
                         f"graph capture cannot do; pass check=False for codes known to be 0 or 1")
    bad = bits > 1 if bits.dtype == torch.uint8 else (bits < 0) | (bits > 1)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must contain only 0 and 1, got {int(bits[index])} at index {index}")


def _tracing(t: torch.Tensor) -> bool:
    """True under torch.compile / torch.export tracing (fake tensors: no values to check)."""
    if torch.compiler.is_compiling():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if is_exporting is not None and is_exporting():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def pack_bits(bits: torch.Tensor, dim: int = -1, *, check: bool = True) -> torch.Tensor:
    """Pack 0/1 values along ``dim`` into int32 words.

    Args:
        bits: bool or integer tensor of 0/1 values, any shape; size ``k`` along ``dim``.
        dim: the dimension to pack.
        check: raise a ``ValueError`` naming the first value outside {0, 1} (reads a flag on the
            host: a synchronisation on CUDA, refused under CUDA-graph capture). False skips the
            value check for codes known to be 0/1; a value > 1 then corrupts the packed words.

    Returns:
        int32 tensor, same shape as ``bits`` except ``ceil(k/32)`` along ``dim``. Bit ``i`` of
        word ``w`` holds element ``32*w + i`` (LSB first); the bits past ``k`` in the last word
        are 0. Same device as ``bits``.

    Example::

        >>> pack_bits(torch.tensor([1, 0, 1, 1]))
        tensor([13], dtype=torch.int32)
    """
    check_bits(bits, "bits", values=check)
    dim = _normalize_dim(dim, bits.dim())
    return torch.ops.gdnsq.pack_bits(bits, dim)


def pack_bits_unchecked(bits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`pack_bits` without the 0/1 value check (for callers that already checked)."""
    dim = _normalize_dim(dim, bits.dim())
    x = bits.movedim(dim, -1)
    k = x.shape[-1]
    nw = num_words(k)
    lead = x.shape[:-1]
    rows = 1
    for n in lead:
        rows *= n
    x2 = x.reshape(rows, k)
    out = _pack_last_numpy(x2, nw) if x.device.type == "cpu" else _pack_last_torch(x2, nw)
    return out.reshape(*lead, nw).movedim(-1, dim).contiguous()


def _pack_last_numpy(x2: torch.Tensor, nw: int) -> torch.Tensor:
    """(R, k) 0/1 CPU tensor -> (R, nw) int32, via NumPy's packbits (LSB first per byte)."""
    rows, k = x2.shape
    arr = x2.to(torch.uint8).numpy()
    if rows == 0 or nw == 0:
        return torch.zeros(rows, nw, dtype=torch.int32)
    if k % 8 == 0 and arr.flags.c_contiguous:
        # Rows end on byte boundaries: one flat pass (packbits along a short last axis pays a
        # per-row overhead that dominates for k = 16..64 channel codes).
        by = np.packbits(arr.reshape(-1), bitorder="little").reshape(rows, k // 8)
    else:
        by = np.packbits(arr, axis=-1, bitorder="little")  # (R, ceil(k/8)) uint8
    need = 4 * nw
    if by.shape[1] != need:
        by = np.concatenate([by, np.zeros((rows, need - by.shape[1]), np.uint8)], axis=1)
    # Little-endian bytes -> word: byte b of word w holds elements 32*w + 8*b ... + 7.
    words = np.ascontiguousarray(by).view("<i4").astype(np.int32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(words))


def _pack_last_torch(x2: torch.Tensor, nw: int) -> torch.Tensor:
    """(R, k) 0/1 tensor on any device -> (R, nw) int32 with plain torch ops."""
    rows, k = x2.shape
    pad = nw * WORD_BITS - k
    x = torch.nn.functional.pad(x2.to(torch.int32), (0, pad)).reshape(rows, nw, WORD_BITS)
    shifts = torch.arange(WORD_BITS, device=x.device, dtype=torch.int32)
    # 1 << 31 is -2**31 in int32: the sum of distinct powers is then the two's-complement
    # pattern itself and never overflows.
    return (x << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_bits(packed: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: int32 tensor of words; ``ceil(k/32)`` words along ``dim``.
        k: number of bits to return along ``dim`` (bits past ``k`` are ignored).
        dim: the packed dimension.

    Returns:
        uint8 tensor of 0/1, same shape as ``packed`` except ``k`` along ``dim``.
    """
    check_packed(packed, "packed")
    dim = _normalize_dim(dim, packed.dim())
    check_k(k, packed.shape[dim], "k", "packed")
    return torch.ops.gdnsq.unpack_bits(packed, int(k), dim)


def _unpack_impl(packed: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    x = packed.movedim(dim, -1)
    shifts = torch.arange(WORD_BITS, device=x.device, dtype=torch.int32)
    # Arithmetic right shift sign-extends bit 31, so mask with 1 after shifting.
    bits = ((x.unsqueeze(-1) >> shifts) & 1).to(torch.uint8)
    bits = bits.reshape(*x.shape[:-1], x.shape[-1] * WORD_BITS)[..., :k]
    return bits.movedim(-1, dim).contiguous()


def check_packed(packed, name: str) -> None:
    """Raise unless ``packed`` is an int32 tensor (the output format of :func:`pack_bits`)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor from pack_bits, got {type(packed).__name__}")
    if packed.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor of packed words from pack_bits, got {packed.dtype}")


def check_k(k, words: int, name: str = "k", packed_name: str = "packed") -> None:
    """Raise unless ``k`` is an int with ``ceil(k/32) == words``."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise TypeError(f"{name} must be an int number of bits, got {type(k).__name__}")
    k = int(k)
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    if k > words * WORD_BITS:
        raise ValueError(
            f"{name}={k} is larger than the packed width of {packed_name} "
            f"({words} words = {words * WORD_BITS} bits)"
        )
    if num_words(k) != words:
        raise ValueError(
            f"{name}={k} needs ceil({k}/32)={num_words(k)} words but {packed_name} has {words}"
        )


# ----------------------------------------------------------------------------- gdnsq:: ops
#   gdnsq::pack_bits(Tensor bits, int dim) -> Tensor          int32, ceil(k/32) words along dim
#   gdnsq::unpack_bits(Tensor packed, int k, int dim) -> Tensor  uint8 0/1, k along dim
# ``dim`` is normalised (non-negative) by the Python wrappers, which also validate the values.


@torch.library.custom_op("gdnsq::pack_bits", mutates_args=())
def _pack_bits_op(bits: torch.Tensor, dim: int) -> torch.Tensor:
    return pack_bits_unchecked(bits, dim)


@_pack_bits_op.register_fake
def _(bits, dim):
    shape = list(bits.shape)
    shape[dim] = num_words(shape[dim])
    return bits.new_empty(shape, dtype=torch.int32)


@torch.library.custom_op("gdnsq::unpack_bits", mutates_args=())
def _unpack_bits_op(packed: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    return _unpack_impl(packed, k, dim)


@_unpack_bits_op.register_fake
def _(packed, k, dim):
    shape = list(packed.shape)
    shape[dim] = k
    return packed.new_empty(shape, dtype=torch.uint8)
