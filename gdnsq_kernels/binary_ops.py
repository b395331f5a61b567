"""Compatibility module: the bit-packed ops live in :mod:`gdnsq_kernels.binary` (re-exported here,
no logic)."""
from .binary import (PackedBinaryWeight, and_gemm, binary_conv2d, binary_linear, pack_bits,  # noqa: F401
                     pack_conv_weight, pack_linear_weight, unpack_bits, xnor_gemm)

__all__ = ["pack_bits", "unpack_bits", "xnor_gemm", "and_gemm", "PackedBinaryWeight", "pack_linear_weight",
           "pack_conv_weight", "binary_linear", "binary_conv2d"]
