"""GDNSQ in a Lightning training loop (``pip install gdnsq[lightning]``).

``GDNSQLightningCallback(loop)`` does the epoch-end and checkpoint work of a
:class:`gdnsq.integrations.loop.GDNSQLoop`; the LightningModule computes its loss with
``loop.training_loss`` and returns the loop's schedule from ``configure_optimizers`` with
``"interval": "step"`` (docs/integrations.md has the complete example):

* ``on_train_epoch_end``: the convergence step (probe on the epoch's last training batch, DDP
  max-sync of the observed bits, test, hold, anneal), before Lightning's ``ModelCheckpoint``
  saves the epoch (Lightning runs checkpoint callbacks last);
* ``on_save_checkpoint`` / ``on_load_checkpoint``: the objective's ``mu`` and the schedule's
  state under the key ``"gdnsq"`` of Lightning's checkpoint, so ``fit(ckpt_path=...)`` resumes
  ``t``, ``mu``, the LR and the hold.
"""
from __future__ import annotations

from lightning.pytorch import Callback

from .loop import GDNSQLoop

#: the key of the GDNSQ state in a Lightning checkpoint dict
CHECKPOINT_KEY = "gdnsq"


class GDNSQLightningCallback(Callback):
    """Convergence step at every training epoch end; GDNSQ state in Lightning's checkpoints."""

    def __init__(self, loop: GDNSQLoop):
        if not isinstance(loop, GDNSQLoop):
            raise TypeError(f"loop must be a gdnsq.integrations.loop.GDNSQLoop, got {type(loop).__name__}")
        self.loop = loop
        #: the status of the last convergence step (None before the first epoch end)
        self.status = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.status = self.loop.epoch_end()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = self.loop.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if CHECKPOINT_KEY not in checkpoint:
            raise ValueError(f"the Lightning checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written with "
                             "a GDNSQLightningCallback")
        self.loop.load_state_dict(checkpoint[CHECKPOINT_KEY])
