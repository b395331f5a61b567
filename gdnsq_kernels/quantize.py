"""Placeholder: the fused quantizer ops land here (issue: fused Triton noisy-quantization ops)."""


def quantize_activation(x, log2_step, log2_range, offset, *, seed=None, dither=True):
    raise NotImplementedError("quantize_activation is being implemented")


def quantize_weight(w, log2_step, *, seed=None, dither=True):
    raise NotImplementedError("quantize_weight is being implemented")
