"""gdnsq.train: the training infrastructure around the method (not the method itself).

* :mod:`~gdnsq.train.trainer`: :class:`Trainer` (fit, evaluate, checkpoints, resume, metrics).
* :mod:`~gdnsq.train.presets`: :class:`TrainConfig` and the named presets (:func:`get_preset`).
* :mod:`~gdnsq.train.distributed`: torch.distributed helpers (DDP does the gradients).
* :mod:`~gdnsq.train.loop`: ``train_epoch``, the batch loop shared with ``gdnsq train-fp``.
* :mod:`~gdnsq.train.progress`: tqdm progress bars; :mod:`~gdnsq.train.plot`: bits.png and
  curves.png; :mod:`~gdnsq.train.report`: report.json / report.md.

It uses the method modules at the top of :mod:`gdnsq` (quantizers, losses, schedule, stats);
they never import it (docs/DESIGN.md, "Layers and import rules").
"""
from .presets import PRESETS, TrainConfig, get_preset
from .trainer import Trainer, load_checkpoint, save_checkpoint

__all__ = ["Trainer", "TrainConfig", "get_preset", "PRESETS", "load_checkpoint", "save_checkpoint"]
