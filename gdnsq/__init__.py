"""gdnsq: GDNSQ quantization-aware fine-tuning down to W1A1, and deployment of the result.

Method API (see docs/method.md and docs/trainer.md):
    quantize_model, teacher_of, calibrate, summary, QConv2d, QLinear, QMultiheadAttention,
    WeightQuantizer, ActivationQuantizer, jeffreys_divergence, BitWidthPenalty, GDNSQObjective,
    read_parts, GDNSQSchedule, param_groups, ConvergenceTracker, Trainer, TrainConfig, get_preset,
    set_exact_inference; submodules stats, data, models, deploy, cli
"""
# The one place the version is written (setup.py reads this line as text).
__version__ = "0.1.0"

from .quantizers import ActivationQuantizer, WeightQuantizer
from .layers import QConv2d, QLinear
from .attention import QMultiheadAttention
from .convert import quantize_model, teacher_of
from .model_summary import summary
from .calibrate import calibrate
from .losses import BitWidthPenalty, GDNSQObjective, jeffreys_divergence, read_parts
from .schedule import GDNSQSchedule, param_groups
from .convergence import ConvergenceStatus, ConvergenceTracker
from . import stats

from .train.trainer import Trainer
from .train.presets import TrainConfig, get_preset
from .layers import set_exact_inference

__all__ = [
    "quantize_model", "teacher_of", "calibrate", "summary", "QConv2d", "QLinear",
    "QMultiheadAttention", "WeightQuantizer", "ActivationQuantizer", "jeffreys_divergence",
    "BitWidthPenalty", "GDNSQObjective", "read_parts", "GDNSQSchedule", "param_groups",
    "ConvergenceTracker", "ConvergenceStatus", "stats", "Trainer", "TrainConfig", "get_preset",
    "set_exact_inference",
]
