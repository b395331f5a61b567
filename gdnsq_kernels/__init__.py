"""gdnsq_kernels: fused ops for GDNSQ quantization-aware training and bit-packed inference.

Quantizer ops (fused forward/backward, exact GDNSQ gradients):
    quantize_activation, quantize_weight
Bit-packed W1A1 arithmetic:
    pack_bits, unpack_bits, xnor_gemm, and_gemm, binary_linear, binary_conv2d

Every op has a plain-PyTorch oracle (``gdnsq_kernels.quantize.reference`` for the quantizers,
``gdnsq_kernels.binary.reference`` for the packed ops). ``GDNSQ_BACKEND`` selects the
implementation; see ``gdnsq_kernels.backend``. ``status()`` says which implementation each op
family uses in this process and why (a fallback, and its cause, included).
"""
from .backend import BACKENDS, resolve_backend
from .quantize import quantize_activation, quantize_weight
from .binary import and_gemm, binary_conv2d, binary_linear, pack_bits, unpack_bits, xnor_gemm
from ._status import status

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
    "status",
]


def _distribution_version() -> str:
    # gdnsq_kernels ships in the gdnsq distribution, whose version is gdnsq.__version__; read it as
    # text so that importing the kernels does not import the method package.
    import pathlib
    import re

    init = pathlib.Path(__file__).resolve().parent.parent / "gdnsq" / "__init__.py"
    try:
        found = re.search(r'^__version__ = "([^"]+)"$', init.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        found = None
    if found is not None:
        return found.group(1)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gdnsq")
    except PackageNotFoundError:
        return "unknown"


__version__ = _distribution_version()
