"""gdnsq.train: the training infrastructure around the method (not the method itself).

* :mod:`~gdnsq.train.trainer`: :class:`Trainer` (fit, evaluate, test), built from the method's
  public loop pieces (param_groups, GDNSQSchedule, GDNSQObjective, ConvergenceTracker);
* :mod:`~gdnsq.train.checkpoint`: checkpoint files (sealed, versioned), rank-0 reads under DDP,
  the trainer's own random streams;
* :mod:`~gdnsq.train.evaluation`: the eval pass (top-1, loss, realised activation bits);
* :mod:`~gdnsq.train.selection`: the selected epoch and early stopping;
* :mod:`~gdnsq.train.report`: metrics.jsonl, report.json / report.md (strict JSON);
* :mod:`~gdnsq.train.presets`: :class:`TrainConfig` and the named presets (:func:`get_preset`);
* :mod:`~gdnsq.train.distributed`: torch.distributed helpers (DDP does the gradients);
* :mod:`~gdnsq.train.loop`: ``train_epoch``, the batch loop shared with ``gdnsq train-fp``;
* :mod:`~gdnsq.train.progress`: tqdm progress bars; :mod:`~gdnsq.train.plot`: bits.png and
  curves.png.

It uses the method modules at the top of :mod:`gdnsq` (quantizers, losses, schedule,
convergence, stats); they never import it (docs/DESIGN.md, "Layers and import rules").
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .presets import PRESETS, TrainConfig, get_preset
from .trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "get_preset", "PRESETS", "load_checkpoint", "save_checkpoint"]
