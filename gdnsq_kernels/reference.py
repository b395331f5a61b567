"""Compatibility module: the quantizer oracle lives in :mod:`gdnsq_kernels.quantize.reference`
(re-exported here, no logic)."""
from .quantize.reference import (LN2, activation_backward, activation_codes, activation_forward,  # noqa: F401
                                 is_per_channel, quantize_activation, quantize_weight, weight_backward,
                                 weight_codes, weight_forward)

__all__ = ["activation_forward", "activation_backward", "activation_codes", "weight_forward", "weight_backward",
           "weight_codes", "quantize_activation", "quantize_weight", "is_per_channel", "LN2"]
