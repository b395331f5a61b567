"""gdnsq_kernels: fused ops for GDNSQ quantization-aware training and bit-packed inference.

Quantizer ops (fused forward/backward, exact GDNSQ gradients):
    quantize_activation, quantize_weight
Bit-packed W1A1 arithmetic:
    pack_bits, unpack_bits, xnor_gemm, and_gemm, binary_linear, binary_conv2d

Every op has a plain-PyTorch oracle (``gdnsq_kernels.reference`` for the quantizers,
``gdnsq_kernels.binary_reference`` for the packed ops). ``GDNSQ_BACKEND`` selects the
implementation; see ``gdnsq_kernels.backend``.
"""
from .backend import BACKENDS, resolve_backend
from .quantize import quantize_activation, quantize_weight
from .binary_ops import and_gemm, binary_conv2d, binary_linear, pack_bits, unpack_bits, xnor_gemm

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "quantize_activation",
    "quantize_weight",
    "pack_bits",
    "unpack_bits",
    "xnor_gemm",
    "and_gemm",
    "binary_linear",
    "binary_conv2d",
]
__version__ = "0.1.0"
