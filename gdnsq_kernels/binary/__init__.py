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

Modules: one per op, each with its public function, its implementation and its ``gdnsq::`` op
registration (``bitpack``, ``gemm``, ``linear``, ``conv2d``); ``packed_weight`` (the weight
class, its packing and the cache that finds it inside the ops); ``_dispatch`` (the GEMM backend
choice); ``_checks`` (argument conversions); one module per GEMM backend. This ``__init__``
only re-exports the public API.
"""
from __future__ import annotations

from .bitpack import pack_bits, unpack_bits
from .conv2d import binary_conv2d
from .gemm import and_gemm, xnor_gemm
from .linear import binary_linear
from .packed_weight import PackedBinaryWeight, pack_conv_weight, pack_linear_weight

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
