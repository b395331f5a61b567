"""Counter-based dither shared by every implementation of the quantizer backward.

GDNSQ's scale gradient carries a random term ``s * r`` with ``r = +-1/(2*sqrt(3))`` drawn
i.i.d. per element and per call (variance 1/12, the variance of uniform rounding noise; see
METHOD.md Part B §2.1). Storing that noise for the backward would cost one tensor per
quantizer, so every implementation instead *regenerates* it from ``(seed, element index)``:

    key  = lowbias32(seed ^ 0x9E3779B9)            # once per call, on the host
    h    = lowbias32(i ^ key)                       # per element, i = flat row-major index
    r_i  = +DITHER_MAGNITUDE  if bit 31 of h is 1
           -DITHER_MAGNITUDE  otherwise

``lowbias32`` is the 32-bit integer finaliser found by Chris Wellons' hash-prospector
(two xor-shift-multiply rounds, constants 0x7feb352d and 0x846ca68b); it is a bijection on
32-bit words with near-ideal avalanche, so neighbouring indices give independent bits.

* ``i`` is the element's flat index in the *logical* row-major order of the input (a
  non-contiguous input is indexed as if it were contiguous), taken modulo 2**32.
* All arithmetic is on unsigned 32-bit words. The reference below emulates it with int64
  torch ops masked to 32 bits (multiplications are split in 16-bit halves so that no int64
  product overflows); the Triton kernels use ``tl.uint32`` and the C++ path ``uint32_t``.
  The three agree bit for bit for any seed, which the tests check.
* ``seed`` is any Python int; only its low 32 bits matter.
"""
from __future__ import annotations

import math

import torch

DITHER_MAGNITUDE = 1.0 / (2.0 * math.sqrt(3.0))  # |r|; r**2 = 1/12
SEED_SALT = 0x9E3779B9  # golden-ratio constant: keeps seed 0 away from the all-zero key
MIX1 = 0x7FEB352D
MIX2 = 0x846CA68B
MASK32 = 0xFFFFFFFF


def lowbias32_int(x: int) -> int:
    """The 32-bit finaliser on a Python int (host side; used for the per-call key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX1) & MASK32
    x ^= x >> 15
    x = (x * MIX2) & MASK32
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    """Per-call 32-bit key derived from ``seed`` (an int; low 32 bits used). Returns 0..2**32-1."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return lowbias32_int((seed & MASK32) ^ SEED_SALT)


def seed_key_i32(seed: int) -> int:
    """``seed_key`` reinterpreted as a signed 32-bit int (how it is passed to kernels)."""
    k = seed_key(seed)
    return k - (1 << 32) if k >= (1 << 31) else k


def seed_key_tensor(seed: torch.Tensor) -> torch.Tensor:
    """``seed_key_i32`` computed on ``seed``'s device: (1,) int64 seed tensor -> (1,) int32 key.

    Torch ops only (no host read), so it can run inside a captured CUDA graph.
    """
    x = (seed.reshape(1).to(torch.int64) & MASK32) ^ SEED_SALT
    k = lowbias32_torch(x)  # in [0, 2**32)
    return torch.where(k >= 2**31, k - 2**32, k).to(torch.int32)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) without int64 overflow."""
    lo = x * (c & 0xFFFF)  # < 2**48
    hi = ((x * (c >> 16)) & 0xFFFF) << 16  # only the low 16 bits of x*c_hi survive the shift
    return (lo + hi) & MASK32


def lowbias32_torch(x: torch.Tensor) -> torch.Tensor:
    """The finaliser on an int64 tensor holding 32-bit words (values in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    x = x ^ (x >> 16)
    return x


def dither_bits(numel: int, seed: int, device=None) -> torch.Tensor:
    """The dither sign bits, shape (numel,) bool: True where r = +DITHER_MAGNITUDE."""
    idx = torch.arange(numel, dtype=torch.int64, device=device) & MASK32
    h = lowbias32_torch(idx ^ seed_key(seed))
    return (h >> 31) == 1


def dither(shape, seed: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Dither values ``r`` for a tensor of ``shape`` (row-major flat indices), in ``dtype``.

    Returns a tensor of ``shape`` with entries +-1/(2*sqrt(3)), identical to what the Triton
    kernels and the C++ path regenerate for the same seed.
    """
    shape = torch.Size(shape)
    bits = dither_bits(shape.numel(), seed, device=device)
    r = torch.where(
        bits,
        torch.tensor(DITHER_MAGNITUDE, dtype=dtype, device=device),
        torch.tensor(-DITHER_MAGNITUDE, dtype=dtype, device=device),
    )
    return r.reshape(shape)


SEED_HIGH = 2**31 - 1  # seeds are drawn from [0, SEED_HIGH)


def new_seed_tensor(device=None) -> torch.Tensor:
    """A 31-bit seed as an int64 tensor of shape (1,), drawn on ``device`` by torch's generator.

    This is what the layers and ``quantize_*`` pass to the ``gdnsq::`` ops: the draw is a
    tensor op, so ``torch.compile`` keeps it in the graph and a CUDA graph replays the draw (a
    fresh seed per step) instead of baking in one value. ``torch.manual_seed`` repeats it.
    """
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)

