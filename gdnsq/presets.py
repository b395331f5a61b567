"""Compatibility module: the presets live in :mod:`gdnsq.train.presets` (re-exported here, no logic)."""
from .train.presets import (ESTIMATORS, PRECISIONS, PRESETS, TrainConfig, get_preset,  # noqa: F401
                            half_life_to_anneal, parse_field)

__all__ = ["TrainConfig", "get_preset", "PRESETS", "half_life_to_anneal", "parse_field", "ESTIMATORS",
           "PRECISIONS"]
