"""Placeholder: bit-packed W1A1 ops land here (issue: bit-packed W1A1 arithmetic)."""


def _todo(*args, **kwargs):
    raise NotImplementedError("bit-packed ops are being implemented")


pack_bits = unpack_bits = xnor_gemm = and_gemm = binary_linear = binary_conv2d = _todo
