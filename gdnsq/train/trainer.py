"""The GDNSQ training loop: ``Trainer(student, teacher, train_loader, val_loader, config, out_dir)``.

Built from the public pieces a hand-written loop uses (docs/method.md): the optimizer groups of
:func:`gdnsq.param_groups`, :class:`gdnsq.GDNSQSchedule`, :class:`gdnsq.GDNSQObjective` and
:class:`gdnsq.ConvergenceTracker`. The rest of the job lives beside this module: checkpoint
files and random streams (:mod:`.checkpoint`), evaluation (:mod:`.evaluation`), selection and
early stopping (:mod:`.selection`), metrics and reports (:mod:`.report`).

What one ``fit()`` does (METHOD.md Part B §3-§4, Part A items 6-8):

* every batch: teacher (eval mode, ``no_grad``) and student (train mode) see the same inputs;
  ``loss, parts = objective(student_logits, teacher_logits, schedule.t)``; RAdam (no weight
  decay) steps, then ``schedule.step()`` sets the LR of the next batch for both groups (model
  parameters at ``lr``, quantizer parameters at ``quantizer_lr_scale`` times it);
* at every train-epoch end: the student runs in eval mode on the validation loader (the full
  pass when validation is due: every ``val_every`` epochs and on the epoch the run stops or
  pauses on; otherwise the first ``probe_batches`` batches), which refreshes each activation
  quantizer's observed bits; then the convergence step (max-sync of the observed bits over
  ranks, ``gdnsq.stats.is_converged``, the hold, annealing) runs;
* selection and early stopping (:mod:`.selection`);
* ``checkpoint_last.pt`` is written atomically after every epoch with everything needed to
  continue bit-identically; constructing a Trainer on the same ``out_dir`` resumes from it;
* rank 0 writes ``metrics.jsonl``, ``report.json``/``report.md``, ``bits.png`` and ``curves.png``.

Example::

    student = gdnsq.quantize_model(fp_model, weight_bits=2, act_bits=2)
    teacher = gdnsq.teacher_of(student)
    gdnsq.calibrate(student, calib_loader)
    cfg = gdnsq.get_preset("cpu-fast")
    trainer = gdnsq.Trainer(student, teacher, train_loader, val_loader, config=cfg, out_dir="runs/w2a2")
    trainer.fit()
    report = trainer.test(test_loader)   # report["test_top1"] in percent
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Optional

import torch
import torch.nn as nn

from . import distributed as gdist
from .. import stats as gstats
from ..convergence import ConvergenceTracker
from ..losses import GDNSQObjective, _masked_cross_entropy, jeffreys_divergence, read_parts
from ..schedule import GDNSQSchedule, param_groups
from .checkpoint import (BEST, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, LAST, METRICS, RandomStreams,
                         config_changes, read_on_main, save_checkpoint)
from .evaluation import evaluate, split_batch
from .loop import train_epoch
from .plot import plot_bit_history, plot_curves
from .precision import resolve_precision
from .presets import TrainConfig, get_preset
from .progress import close_with, progress_bar
from .report import MetricsLog, build_report, per_layer_bits, realised_bits, target_bits, write_report
from .selection import Selection, selected_checkpoint


def _distill_with_labels(label_weight: float, temperature: float = 1.0):
    """The objective's base loss for ``TrainConfig.label_weight``: None (the built-in Jeffreys
    distillation, at the objective's temperature) at 0, else ``D = T^2 Jeffreys_T(student,
    teacher) + label_weight * CE(student, labels)`` (the cross-entropy at temperature 1)."""
    if not label_weight:
        return None

    def distill_and_labels(student_logits, teacher_logits, labels):
        return (jeffreys_divergence(student_logits, teacher_logits, temperature=temperature)
                + label_weight * _masked_cross_entropy(student_logits, labels, None))
    return distill_and_labels


def _planned_steps(config: TrainConfig, train_loader) -> Optional[int]:
    """Optimizer steps of the whole planned run (``max_epochs`` x batches per epoch), which a
    cosine anneal ends at; None for the exponential anneal, which does not need it."""
    if config.anneal_shape != "cosine":
        return None
    try:
        batches = len(train_loader)
    except TypeError:
        raise ValueError("TrainConfig.anneal_shape='cosine' needs a train_loader with a length "
                         "(batches per epoch) to plan where the LR reaches 0") from None
    return config.max_epochs * batches


def _set_loader_epoch(loader, epoch: int) -> None:
    # DistributedSampler (and samplers or loaders like it, e.g. gdnsq.data.CifarLoader) derive
    # their order from seed + epoch, which makes the epoch's data independent of history.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    for sampler in (getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None


def _no_forward_buffer_sync() -> dict:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in newer torch)."""
    import inspect
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class Trainer:
    """GDNSQ fine-tuning of a converted student against its FP teacher.

    Args:
        student: model returned by ``gdnsq.quantize_model`` (calibrated), any ``nn.Module``
            whose quantized layers ``gdnsq.stats.quantized_layers`` finds.
        teacher: the frozen FP model (``gdnsq.teacher_of(student)``); kept in eval mode.
        train_loader: batches ``(images, labels)`` (labels unused for training: distillation).
            Under DDP give it a ``DistributedSampler`` (``gdnsq.train.distributed.make_loader``).
        val_loader: held-out batches ``(images, labels)`` for selection, early stopping and the
            convergence probe. Sharded (DistributedSampler) or full on every rank. None: no
            validation; the convergence probe runs on the epoch's last training batch, the
            selected checkpoint is the latest converged epoch and early stopping is off.
        config: a :class:`TrainConfig` (default: the "paper" preset).
        out_dir: folder for checkpoints, metrics and reports. If it holds
            ``checkpoint_last.pt`` the trainer resumes from it (under DDP rank 0 reads it and
            broadcasts it to the other ranks).
        command: the command line recorded in the report (default ``sys.argv``).

    Attributes after construction: ``optimizer`` (RAdam), ``schedule`` (GDNSQSchedule),
    ``objective`` (GDNSQObjective), ``convergence`` (ConvergenceTracker), ``epoch``
    (completed epochs), ``global_step`` (batches). Construction touches no global random
    generator: the trainer's streams (:class:`~gdnsq.train.checkpoint.RandomStreams`, seeded
    from ``config.seed``) replace them only while ``fit()`` runs.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, train_loader, val_loader,
                 config: Optional[TrainConfig] = None, out_dir: str = "runs/gdnsq", *,
                 command: Optional[str] = None):
        if not isinstance(student, nn.Module):
            raise TypeError(f"Trainer: student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"Trainer: teacher must be an nn.Module (gdnsq.teacher_of(student)), got {type(teacher).__name__}")
        if config is None:
            config = get_preset("paper")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: config must be a gdnsq.TrainConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"Trainer: out_dir must be a path, got {type(out_dir).__name__}")
        if not gstats.quantized_layers(student):
            raise ValueError("Trainer: student has no quantized layers; convert it with gdnsq.quantize_model first")
        self.cfg = config
        self.out_dir = os.fspath(out_dir)
        self.command = command if command is not None else " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
        self.rank = gdist.rank()
        self.world_size = gdist.world_size()
        self.is_main = self.rank == 0
        self.device = _resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        # The rank offset of the torch stream gives each rank its own dither stream.
        self.random = RandomStreams(config.seed, self.rank, [("train", train_loader), ("val", val_loader)])

        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        # "auto" becomes fp32 or bf16 here; a resumed run keeps the precision it started with
        # (see _resume), so that it stays bit-identical to an uninterrupted one.
        self.precision, self.precision_reason = resolve_precision(config.precision, self.device)
        self.student = student.to(self.device, memory_format=self.memory_format)
        self.teacher = teacher.to(self.device, memory_format=self.memory_format)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.train_loader = train_loader
        self.val_loader = val_loader
        # Ranks start from rank 0's weights (calibration may have seen different data).
        gdist.broadcast_module(self.student)

        if config.estimator is not None:
            for _, layer in gstats.quantized_layers(self.student):
                wq = getattr(layer, "weight_quantizer", None)
                if wq is not None:
                    wq.estimator = config.estimator
        self.optimizer = torch.optim.RAdam(param_groups(self.student, config.lr, config.quantizer_lr_scale),
                                           lr=config.lr, weight_decay=0.0)
        self.schedule = GDNSQSchedule(self.optimizer, config.warmup_steps, t_scale=config.t_scale,
                                      anneal=config.anneal, hold_epochs=config.hold_epochs, lr0=config.lr,
                                      shape=config.anneal_shape,
                                      total_steps=_planned_steps(config, train_loader))
        # Under DDP its default reduce_fn averages D over ranks, so every rank keeps the same mu.
        self.objective = GDNSQObjective(self.student, epsilon=config.epsilon,
                                        base_loss=_distill_with_labels(config.label_weight,
                                                                       config.distill_temperature),
                                        temperature=config.distill_temperature)
        self.convergence = ConvergenceTracker(self.student, self.schedule)
        # The module the training step runs: under DDP a DistributedDataParallel wrapper that
        # averages the gradients over ranks with bucketed all-reduces overlapping the backward.
        # Buffers are not broadcast per forward: each rank's BatchNorm statistics are averaged at
        # the epoch end (gdist.average_float_buffers). Evaluation calls self.student directly.
        self.train_module: nn.Module = self.student
        if gdist.is_distributed():
            self.train_module = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index if self.device.index is not None
                                          else torch.cuda.current_device()] if self.device.type == "cuda" else None,
                **_no_forward_buffer_sync())

        # Trainer state (all of it is in checkpoint_last.pt).
        self.epoch = 0
        self.global_step = 0
        self.selection = Selection()
        self.stop_reason: Optional[str] = None
        self.wall_seconds_before = 0.0
        self.history: list = []
        self.last_val: Optional[dict] = None
        self.metrics = MetricsLog(os.path.join(self.out_dir, METRICS), self.is_main)
        self._fit_start: Optional[float] = None
        self.resumed_from: Optional[int] = None
        self._last_inputs = None
        self._bar = None  # the epoch's tqdm bar, closed at the epoch end with its summary

        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        last = read_on_main(os.path.join(self.out_dir, LAST), "last")
        if last is not None:
            self._resume(last)
        gdist.barrier()

    # ------------------------------------------------------------------ state views

    @property
    def converged(self) -> bool:
        """The last convergence check's result."""
        return self.schedule.converged

    @property
    def first_converged_epoch(self) -> Optional[int]:
        """The first epoch whose convergence check passed (one check per epoch)."""
        return self.schedule.first_converged

    # ------------------------------------------------------------------ public API

    def fit(self) -> dict:
        """Train until early stopping, ``max_epochs`` or ``max_minutes``; return the report
        (as :meth:`report`; ``test_top1`` is None until :meth:`test`)."""
        if self._finished():
            self._log(f"gdnsq: nothing to do in {self.out_dir} ({self._finished()}); epochs run: {self.epoch}")
            return self._write_report()
        if self.resumed_from is not None:
            self._log(f"gdnsq: resuming {self.out_dir} after epoch {self.epoch} (step {self.global_step})")
        if self.epoch == 0 and not self.history:
            # The starting point (calibrated bits) is epoch 0 of the bit-width plot.
            self.history.append({"epoch": 0, "layers": per_layer_bits(self.student), "realised": None,
                                 "converged": False, "val_top1": None})
        self._fit_start = time.monotonic()
        try:
            with self.random.active():
                while True:
                    epoch = self.epoch + 1
                    t_epoch = time.monotonic()
                    train = self._train_epoch(epoch)
                    self._end_of_epoch(epoch, train, time.monotonic() - t_epoch)
                    if self.stop_reason is not None:
                        break
        finally:
            # Fold this segment's time into the total (a later fit() call continues from it).
            self.wall_seconds_before = self._wall_seconds()
            self._fit_start = None
        # Every rank asks (rank 0 reads checkpoint_best.pt and broadcasts it); rank 0 prints.
        self._log(f"gdnsq: stopped after epoch {self.epoch} ({self.stop_reason}); {self._selected().describe()}")
        return self._write_report()

    def evaluate(self, loader, max_batches: Optional[int] = None) -> dict:
        """Evaluate the student in eval mode (:func:`gdnsq.train.evaluation.evaluate`):
        ``{"top1": percent or None, "n": images, "loss": mean cross-entropy or None,
        "act_bits_max": {layer: max observed activation bits over the pass}}``, the same on
        every rank."""
        return evaluate(self.student, loader, device=self.device, prepare_input=self._to_input,
                        max_batches=max_batches)

    def load_selected(self) -> Optional[int]:
        """Load the selected weights into the student: ``checkpoint_best.pt`` when some epoch
        converged, else the last checkpoint. Returns the epoch loaded (None if no checkpoint)."""
        for name, kind in ((BEST, "best"), (LAST, "last")):
            ckpt = read_on_main(os.path.join(self.out_dir, name), kind)
            if ckpt is not None:
                self.student.load_state_dict(ckpt["student"])
                return ckpt["epoch"]
        return None

    def test(self, test_loader) -> dict:
        """Load the selected checkpoint, evaluate it once on ``test_loader`` and write
        report.json / report.md / bits.png. Returns the report. The student keeps the selected
        weights afterwards."""
        epoch = self.load_selected()
        if epoch is None:
            raise ValueError(f"Trainer.test: no checkpoint in {self.out_dir}; call fit() first")
        res = self.evaluate(test_loader)
        return self._write_report(test=res, realised=realised_bits(self.student, res["act_bits_max"]))

    def report(self) -> dict:
        """The report dictionary as last written (or built from the current state)."""
        return self._build_report()

    # ------------------------------------------------------------------ training

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.student.train()
        self.teacher.eval()
        _set_loader_epoch(self.train_loader, epoch)
        try:
            total = len(self.train_loader)
        except TypeError:
            total = None
        bar = progress_bar(total, desc=f"epoch {epoch}/{cfg.max_epochs}", enabled=self.is_main and cfg.progress)

        def step(batch):
            x, y = split_batch(batch)
            x = self._to_input(x)
            self._last_inputs = x
            lr, t = self.schedule.lr, self.schedule.t
            # Autocast is opened per step around the forwards and the loss only: an autocast
            # context held across steps keeps serving the bf16 copies of the FP layers' weights
            # cast at its first step while the optimizer updates the float32 masters.
            with self._autocast():
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                student_logits = self.train_module(x)
                labels = y.to(student_logits.device) if cfg.label_weight > 0 and y is not None else None
                if cfg.label_weight > 0 and labels is None:
                    raise ValueError("TrainConfig.label_weight > 0 needs labels: train_loader must yield "
                                     "(images, labels) batches")
                loss, parts = self.objective(student_logits.float(), teacher_logits.float(), t, labels=labels)
            parts = read_parts(parts)  # the step's one read from the device: the loss is checked
            loss_value = parts["loss"]
            if not math.isfinite(loss_value):
                # Stop before the update: checkpoint_last.pt still holds the last good epoch.
                raise FloatingPointError(f"Trainer: the loss became {loss_value} at epoch {epoch}, step "
                                         f"{self.global_step + 1} (lr {lr:g}, t {t:g}); lower lr or t_scale")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients over ranks
            self.optimizer.step()
            self.schedule.step()
            self.global_step += 1
            metrics = {"loss": loss_value} | {k: float(v) for k, v in parts.items() if k not in ("loss", "t")}
            if self.global_step % cfg.log_every != 0:
                return metrics, None
            mb = gstats.mean_bits(self.student)
            # Realised weight bits come from the current codes (cheap); realised activation
            # bits exist only for eval batches, so they are in the epoch records.
            rw = [v["weight"] for v in gstats.realised_bits(self.student).values()]
            self.metrics.append({"kind": "step", "epoch": epoch, "step": self.global_step, "loss": loss_value,
                                 **parts, "t": t, "lr": lr,
                                 "mean_weight_bits": mb["weight"], "mean_act_bits": mb["act"],
                                 "realised_weight_bits_max": max(rw) if rw else None})
            return metrics, {"loss": loss_value, "wbits": mb["weight"], "abits": mb["act"], "lr": lr, "t": t}

        train = train_epoch(self.train_loader, step, bar, what="Trainer: train_loader")
        self._bar = bar  # closed at the epoch end with the validation result
        return train

    def _end_of_epoch(self, epoch: int, train: dict, epoch_seconds: float) -> None:
        cfg = self.cfg
        gdist.average_float_buffers(self.student)
        # The epoch a run stops or pauses on is validated (its checkpoint is the one a later
        # segment or the user picks up); patience already spent stops the run at this epoch.
        out_of_time = cfg.max_minutes is not None and self._segment_seconds() >= cfg.max_minutes * 60
        may_stop = epoch >= cfg.max_epochs or out_of_time or self.selection.patience_spent(cfg.patience)
        val = None
        if self.val_loader is None:
            # Convergence needs fresh observed activation bits from an eval-mode batch.
            status = self.convergence.step(self._last_inputs)
        else:
            if epoch % cfg.val_every == 0 or may_stop:
                val = self.evaluate(self.val_loader)
            else:
                self.evaluate(self.val_loader, max_batches=cfg.probe_batches)
            status = self.convergence.step()
        converged = status.converged
        realised = gstats.realised_bits(self.student)
        selected = self.selection.observe(epoch, converged=converged, held=status.held,
                                          val_top1=val["top1"] if val else None, validated=val is not None,
                                          has_validation=self.val_loader is not None, min_delta=cfg.min_delta)
        if val is not None:
            self.last_val = {"epoch": epoch, "top1": val["top1"], "loss": val["loss"]}
        self.epoch = epoch
        per_layer = per_layer_bits(self.student)
        self.history.append({"epoch": epoch, "layers": per_layer,
                             "realised": {n: dict(v) for n, v in realised.items()},
                             "converged": converged, "val_top1": val["top1"] if val else None,
                             "train_loss": train["loss"], "val_loss": val["loss"] if val else None})
        # Stop decisions are made before the checkpoint so that it records them.
        if self.selection.patience_spent(cfg.patience):
            self.stop_reason = "early_stopping"
        elif epoch >= cfg.max_epochs:
            self.stop_reason = "max_epochs"
        elif out_of_time:
            self.stop_reason = "max_minutes"
        mb = gstats.mean_bits(self.student)
        rmax_w = max((v["weight"] for v in realised.values() if v.get("weight") is not None), default=None)
        rmax_a = max((v["act"] for v in realised.values() if v.get("act") is not None), default=None)
        self.metrics.append({
            "kind": "epoch", "epoch": epoch, "step": self.global_step,
            "train_loss": train["loss"], **{"train_" + k: v for k, v in train.items() if k not in ("loss", "batches")},
            "t": float(self.schedule.t), "lr": float(self.schedule.lr),
            "mean_weight_bits": mb["weight"], "mean_act_bits": mb["act"],
            "realised_weight_bits_max": rmax_w, "realised_act_bits_max": rmax_a,
            "converged": converged, "val_top1": val["top1"] if val else None,
            "val_loss": val["loss"] if val else None, "selected": selected,
            "bad_validations": self.selection.bad_validations, "epoch_seconds": epoch_seconds,
            "wall_seconds": self._wall_seconds(), "per_layer_bits": per_layer, "realised_bits": realised})
        if selected:
            self._save_best(epoch, val or {"top1": None, "loss": None, "n": 0, "act_bits_max": None})
        self._save_last()
        if self.is_main:
            self._plot()
        fields = {"loss": train["loss"], "wbits": mb["weight"], "abits": mb["act"],
                  "realised": f"W{rmax_w:.3g}/A{rmax_a:.3g}" if rmax_w is not None and rmax_a is not None else "-",
                  "converged": "yes" if converged else "no", "lr": float(self.schedule.lr)}
        if val is not None and val["top1"] is not None:
            fields["val_top1"] = val["top1"]
        close_with(self._bar, **fields)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dim() == 4 and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        """A fresh autocast context for one training step (a no-op context for fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict:
        return {
            "converged": self.converged, "first_converged_epoch": self.first_converged_epoch,
            **self.selection.state_dict(),
            "stop_reason": self.stop_reason, "wall_seconds": self._wall_seconds(),
            "precision": self.precision, "precision_reason": self.precision_reason,
            "history": self.history, "last_val": self.last_val,
        }

    def _save_last(self) -> None:
        rng = gdist.all_gather_object(self.random.capture())
        if self.is_main:
            ckpt = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "last",
                "epoch": self.epoch, "global_step": self.global_step,
                "student": self.student.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "objective": self.objective.state_dict(),
                "rng": rng, "world_size": self.world_size,
                "trainer": self._trainer_state(),
                "metrics_offset": self.metrics.size(),
                "config": self.cfg.to_dict(),
                "complete": True,  # written last: its presence marks a complete payload
            }
            save_checkpoint(ckpt, os.path.join(self.out_dir, LAST))
        gdist.barrier()

    def _save_best(self, epoch: int, val: dict) -> None:
        if not self.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "best",
            "epoch": epoch, "val_top1": val["top1"], "val_loss": val["loss"], "val_n": val["n"],
            "realised_bits": realised_bits(self.student, val["act_bits_max"]),
            "student": self.student.state_dict(), "config": self.cfg.to_dict(), "complete": True,
        }
        save_checkpoint(ckpt, os.path.join(self.out_dir, BEST))

    def _resume(self, ckpt: dict) -> None:
        """Continue from a ``checkpoint_last.pt`` payload (the same on every rank)."""
        path = os.path.join(self.out_dir, LAST)
        old = ckpt["config"]
        changed = config_changes(old, self.cfg.to_dict())
        if changed:
            warnings.warn(f"Trainer resume from {path}: config field(s) {changed} differ from the checkpoint's "
                          f"({ {k: old.get(k) for k in changed} }); the result will differ from an uninterrupted run")
        st = ckpt["trainer"]
        self.student.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt["version"] == 1:  # the schedule state of version 1 had no convergence checks
            self.schedule.checks, self.schedule.converged = ckpt["epoch"], st["converged"]
            self.schedule.first_converged = st["first_converged_epoch"]
        self.objective.load_state_dict(ckpt["objective"])
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            self.random.restore(rng[self.rank])
        else:
            warnings.warn(f"Trainer resume: checkpoint written by {len(rng)} rank(s), now {self.world_size}; "
                          "random streams are re-seeded, so the run will not be bit-identical")
        self.epoch = ckpt["epoch"]
        self.global_step = ckpt["global_step"]
        self.selection.load_state_dict(st)
        self.stop_reason = st["stop_reason"]
        started = st.get("precision")
        if self.cfg.precision == "auto" and started is not None and started != self.precision:
            warnings.warn(f"Trainer resume: the run started in {started} (precision='auto' resolved "
                          f"then: {st.get('precision_reason')}); it continues in {started}, although "
                          f"here 'auto' would choose {self.precision} ({self.precision_reason})")
            self.precision, self.precision_reason = started, st.get("precision_reason")
        self.wall_seconds_before = st["wall_seconds"]
        self.history = st["history"]
        self.last_val = st["last_val"]
        self.resumed_from = self.epoch
        # Drop metric records written after this checkpoint (the epoch that was interrupted
        # runs again and writes them again).
        self.metrics.truncate(ckpt["metrics_offset"])

    def _finished(self) -> Optional[str]:
        """Why the run in out_dir is finished under the current config, or None."""
        if self.stop_reason == "early_stopping":
            return "early_stopping"
        if self.epoch >= self.cfg.max_epochs:
            return "max_epochs"
        # ``max_minutes`` is the budget of one segment (one fit() call), so a run paused by it
        # continues when the same command runs again; a raised ``max_epochs`` continues too.
        self.stop_reason = None
        return None

    # ------------------------------------------------------------------ output

    def _segment_seconds(self) -> float:
        """Seconds since this fit() call started (0 outside fit)."""
        return time.monotonic() - self._fit_start if self._fit_start is not None else 0.0

    def _wall_seconds(self) -> float:
        return self.wall_seconds_before + self._segment_seconds()

    def _log(self, msg: str) -> None:
        if self.is_main and self.cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    def _plot(self) -> None:
        if not self.history:
            return
        run = os.path.basename(os.path.abspath(self.out_dir))
        plot_bit_history(self.history, os.path.join(self.out_dir, "bits.png"), targets=target_bits(self.student),
                         title=f"GDNSQ per-layer continuous bit-width ({run})")
        plot_curves(self.history, os.path.join(self.out_dir, "curves.png"),
                    title=f"GDNSQ loss and validation accuracy ({run})")

    def _selected(self):
        return selected_checkpoint(self.out_dir, self.epoch, self.last_val)

    def _build_report(self, test: Optional[dict] = None, realised: Optional[dict] = None) -> dict:
        selected = self._selected()
        if realised is None:
            realised = selected.realised_bits if selected.realised_bits is not None else realised_bits(self.student)
        run = {"first_converged_epoch": self.first_converged_epoch, "epochs_run": self.epoch,
               "global_steps": self.global_step, "stop_reason": self.stop_reason,
               "wall_seconds": self._wall_seconds(), "world_size": self.world_size,
               "precision": {"requested": self.cfg.precision, "used": self.precision,
                             "reason": self.precision_reason},
               "config": self.cfg.to_dict(), "command": self.command}
        return build_report(self.student, selected, realised=realised, run=run, test=test)

    def _write_report(self, test: Optional[dict] = None, realised: Optional[dict] = None) -> dict:
        report = self._build_report(test, realised)
        if self.is_main:
            write_report(self.out_dir, report)
            self._plot()
        gdist.barrier()
        return report
