"""GDNSQ in a Hugging Face ``transformers.Trainer`` (``pip install gdnsq[hf]``).

``GDNSQTrainer`` is a ``transformers.Trainer`` whose loss is the GDNSQ objective (distillation
from the teacher, or the model's own loss without one, plus ``t * mu * penalty``), whose LR
scheduler is the :class:`gdnsq.GDNSQSchedule`, and which carries ``GDNSQTrainerCallback``:

* ``on_epoch_end``: the convergence step (probe on the epoch's last training batch, DDP max-sync
  of the observed bits, test, hold, anneal);
* ``on_save``: writes the objective and schedule state to ``gdnsq_state.pt`` inside HF's
  checkpoint folder (``checkpoint-<step>``); ``train(resume_from_checkpoint=...)`` reads it back,
  so a resumed run continues ``t``, ``mu``, the LR and the hold where they stopped.

Example (docs/integrations.md has it complete)::

    student = gdnsq.quantize_model(bert, weight_bits=4, act_bits=4)
    gdnsq.calibrate(student, calibration_batches)         # dict batches: student(**batch)
    optimizer = torch.optim.RAdam(gdnsq.param_groups(student, lr=1e-3), weight_decay=0.0)
    schedule = gdnsq.GDNSQSchedule(optimizer, warmup_steps=100, t_scale=2.0)
    trainer = GDNSQTrainer(gdnsq=GDNSQLoop(student, schedule), model=student,
                           args=TrainingArguments(...), train_dataset=...)
    trainer.train()
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .loop import GDNSQLoop

#: the file in each HF checkpoint folder that holds the GDNSQ state
STATE_FILE = "gdnsq_state.pt"


class GDNSQTrainerCallback(TrainerCallback):
    """Convergence step at every epoch end, GDNSQ state into every HF checkpoint folder.

    Use it with any ``Trainer`` whose loss comes from ``loop.training_loss`` (``GDNSQTrainer``
    adds it by itself). Restoring needs ``load_checkpoint_state`` before ``train`` (done by
    ``GDNSQTrainer.train``).
    """

    def __init__(self, loop: GDNSQLoop):
        if not isinstance(loop, GDNSQLoop):
            raise TypeError(f"loop must be a gdnsq.integrations.loop.GDNSQLoop, got {type(loop).__name__}")
        self.loop = loop
        #: the status of the last convergence step (None before the first epoch end)
        self.status = None

    def on_epoch_end(self, args, state, control, **kwargs):
        # Every rank runs it: the observed bits are max-reduced over ranks inside.
        self.status = self.loop.epoch_end()

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Hugging Face checkpoint folder {folder} not found after on_save")
        self.loop.save(os.path.join(folder, STATE_FILE))


def load_checkpoint_state(loop: GDNSQLoop, checkpoint: str) -> None:
    """Restore ``loop`` from the ``gdnsq_state.pt`` of an HF checkpoint folder."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the checkpoint was not written by a GDNSQ Trainer "
                                "(GDNSQTrainerCallback)")
    loop.load(path)


class GDNSQTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a GDNSQ student.

    Args:
        gdnsq: the :class:`gdnsq.integrations.loop.GDNSQLoop` (student, teacher, objective,
            schedule); keyword only. Pass its student as ``model``.
        *args, **kwargs: those of ``transformers.Trainer``. ``optimizers`` defaults to
            ``(gdnsq.schedule.optimizer, gdnsq.schedule)``; a ``GDNSQTrainerCallback`` is added.

    Token-level (B, T, V) logits are distilled position by position under the batch's
    ``attention_mask``. Without a teacher (``GDNSQLoop(..., teacher=False)``) the base loss is
    the model's own ``outputs.loss`` (the batch holds ``labels``).
    """

    def __init__(self, *args, gdnsq: GDNSQLoop, **kwargs):
        if not isinstance(gdnsq, GDNSQLoop):
            raise TypeError(f"gdnsq must be a gdnsq.integrations.loop.GDNSQLoop, got {type(gdnsq).__name__}")
        self.gdnsq = gdnsq
        self.gdnsq_callback = GDNSQTrainerCallback(gdnsq)
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [self.gdnsq_callback]
        if kwargs.get("optimizers") in (None, (None, None)):
            kwargs["optimizers"] = (gdnsq.schedule.optimizer, gdnsq.schedule)
        super().__init__(*args, **kwargs)
        # The GDNSQ loss is a mean per call; HF then divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        logits = self.gdnsq.logits_fn(outputs)
        mask = inputs.get("attention_mask") if logits.dim() == 3 and isinstance(inputs, Mapping) else None
        task_loss = None if self.gdnsq.teacher is not None else getattr(outputs, "loss", None)
        loss, _ = self.gdnsq.training_loss(outputs, inputs, mask=mask, task_loss=task_loss,
                                           labels=inputs.get("labels"))
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``transformers.Trainer.train``; on resume, also restores the GDNSQ state of that
        checkpoint (``True``: the last checkpoint in ``args.output_dir``)."""
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool) and checkpoint:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but no checkpoint found in {self.args.output_dir}")
        if checkpoint:
            load_checkpoint_state(self.gdnsq, checkpoint)
        return super().train(checkpoint or None, *args, **kwargs)
