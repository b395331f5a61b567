"""gdnsq: GDNSQ quantization-aware fine-tuning down to W1A1, and deployment of the result.

Method API (see docs/readme/method.md):
    quantize_model, teacher_of, calibrate, QConv2d, QLinear, WeightQuantizer,
    ActivationQuantizer, jeffreys_divergence, BitWidthPenalty, GDNSQObjective, GDNSQSchedule
"""
from .quantizers import ActivationQuantizer, WeightQuantizer
from .layers import QConv2d, QLinear
from .convert import quantize_model, teacher_of
from .calibrate import calibrate
from .losses import BitWidthPenalty, GDNSQObjective, jeffreys_divergence
from .schedule import GDNSQSchedule
from . import stats

try:  # the trainer is written separately; export it once it exists
    from .trainer import Trainer
except ImportError:  # pragma: no cover
    Trainer = None

__all__ = [
    "quantize_model", "teacher_of", "calibrate", "QConv2d", "QLinear", "WeightQuantizer",
    "ActivationQuantizer", "jeffreys_divergence", "BitWidthPenalty", "GDNSQObjective",
    "GDNSQSchedule", "stats", "Trainer",
]
__version__ = "0.1.0"
