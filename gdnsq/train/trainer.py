"""The GDNSQ training loop: ``Trainer(student, teacher, train_loader, val_loader, config, out_dir)``.

What one ``fit()`` does (METHOD.md Part B §3-§4, Part A items 6-8):

* every batch: teacher (eval mode, ``no_grad``) and student (train mode) see the same inputs;
  ``loss, parts = GDNSQObjective(student_logits, teacher_logits, t)`` with the schedule's penalty
  weight ``t``; the LR of the RAdam groups (no weight decay; model parameters at the schedule's
  LR, quantizer parameters at ``quantizer_lr_scale`` times it, 1 in the paper) is set
  from the schedule before the step, and ``schedule.step()`` follows the optimizer step;
* at every train-epoch end: the student runs in eval mode on the validation loader (the full
  pass when validation is due: every ``val_every`` epochs, at ``max_epochs`` and at the epoch
  where a ``max_minutes`` segment pauses; otherwise the
  first ``probe_batches`` batches). That refreshes each activation quantizer's
  ``observed_bits`` (realised bits of its last eval batch). Then ``gdnsq.stats.is_converged`` is
  evaluated (weights: realised bits from the integer codes; activations: those observed bits)
  and passed to ``schedule.set_converged`` (LR annealing starts at the first convergence);
* selection: among validated epochs where the model is converged, the best val top-1 is saved
  to ``checkpoint_best.pt``;
* early stopping: from the first convergence on, each validation whose converged accuracy
  (0 when not converged, as the authors' ``ns_Accuracy_top1``) does not beat the best so far by
  more than ``min_delta`` counts towards ``patience``;
* ``checkpoint_last.pt`` is written atomically after every epoch with everything needed to
  continue bit-identically (student, optimizer, schedule, objective running mean, RNG states of
  torch/CUDA/numpy/python/the loader generators, trainer counters, metrics file offset);
  constructing a Trainer on the same ``out_dir`` resumes from it;
* rank 0 writes ``metrics.jsonl`` (a record every ``log_every`` batches and one per epoch),
  ``report.json``/``report.md``, ``bits.png`` (per-layer continuous bit-width per epoch) and
  ``curves.png`` (loss and validation top-1 per epoch).

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

import json
import math
import os
import random
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as gdist
from .. import stats as gstats
from .._atomic import atomic_torch_save  # noqa: F401  (re-exported: tests write checkpoints with it)
from .._sealed import MAGIC as _SEAL_MAGIC, read_sealed, write_sealed
from .loop import train_epoch
from ..losses import GDNSQObjective
from .plot import plot_bit_history, plot_curves
from .precision import resolve_precision
from .presets import TrainConfig, get_preset
from .progress import close_with, progress_bar
from .report import write_report
from ..quantizers import ActivationQuantizer, WeightQuantizer
from ..schedule import GDNSQSchedule

CHECKPOINT_FORMAT = "gdnsq.trainer.checkpoint"  # a file-format tag written into checkpoints: never renamed
CHECKPOINT_VERSION = 1
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
METRICS = "metrics.jsonl"

# Config fields that may change between a run and its resume without breaking exactness
# (they decide when to stop, what to print, or where to run).
_RESUME_FREE_FIELDS = {"max_epochs", "max_minutes", "patience", "progress", "log_every", "num_workers",
                       "device", "extra", "val_every"}


# --------------------------------------------------------------------------- file helpers

def save_checkpoint(ckpt: dict, path: str) -> None:
    """Write a trainer checkpoint atomically with its length and SHA-256 (see gdnsq._sealed)."""
    write_sealed(ckpt, path)


def load_checkpoint(path: str, kind: Optional[str] = None) -> dict:
    """Load and check a trainer checkpoint (CPU tensors).

    Raises ValueError with the path when the file is truncated/corrupt (length or SHA-256 checksum
    mismatch), is not a gdnsq trainer checkpoint, has another format version, lacks the completion
    marker, or (with ``kind``) is not of that kind ("last" or "best"). Checkpoints written before
    checksums (plain ``torch.save`` archives) still load, with a warning that they are unverified."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(len(_SEAL_MAGIC))
    if head == _SEAL_MAGIC:
        ckpt = read_sealed(path)
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip archive fails inside torch.load
            raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "delete it to restart, or restore a complete copy") from None
        if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
            warnings.warn(f"checkpoint {path} was written without a checksum (older gdnsq); "
                          "it is loaded unverified")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} is not a gdnsq trainer checkpoint (format marker missing)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {ckpt.get('version')!r}; "
                         f"this gdnsq reads version {CHECKPOINT_VERSION}")
    if ckpt.get("complete") is not True:
        raise ValueError(f"checkpoint {path} lacks its completion marker (incomplete write)")
    if kind is not None and ckpt.get("kind") != kind:
        raise ValueError(f"checkpoint {path} is a {ckpt.get('kind')!r} checkpoint, expected {kind!r}")
    return ckpt


# --------------------------------------------------------------------------- RNG state

def _numpy_state_to_plain(state):
    # Plain Python types so the checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(plain):
    name, keys, pos, has_gauss, cached = plain
    return (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_plain(plain):
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


def _loader_generators(loader):
    """The torch.Generator objects a DataLoader draws its shuffle order from (deduplicated)."""
    gens = []
    for obj in (getattr(loader, "generator", None),
                getattr(getattr(loader, "sampler", None), "generator", None),
                getattr(getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None)):
        if isinstance(obj, torch.Generator) and all(obj is not g for g in gens):
            gens.append(obj)
    return gens


def _set_loader_epoch(loader, epoch: int) -> None:
    # DistributedSampler (and samplers or loaders like it, e.g. gdnsq.data.CifarLoader) derive
    # their order from seed + epoch, which makes the epoch's data independent of history.
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    for sampler in (getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


def _is_sharded(loader) -> bool:
    from torch.utils.data.distributed import DistributedSampler
    return any(isinstance(s, DistributedSampler) for s in (
        getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)))


# --------------------------------------------------------------------------- trainer

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


def _split_batch(batch):
    """(inputs, labels or None) from a loader batch: a tensor, or a tuple/list (x, y, ...)."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        y = batch[1] if len(batch) > 1 and torch.is_tensor(batch[1]) else None
        return batch[0], y
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"], batch.get("label")
    raise TypeError("Trainer: a batch must be a tensor, a (inputs, labels) tuple/list or a dict with "
                    f"'input' (and 'label'), got {type(batch).__name__}")


def _param_groups(student: nn.Module, config) -> list:
    """RAdam parameter groups: the model's own parameters at ``lr`` and the quantizer parameters
    (log2 steps, log2 ranges, offsets) at ``lr * quantizer_lr_scale``.

    The paper uses one group (scale 1). RAdam moves each log2 parameter by about the LR per step
    once the penalty dominates, so the bit-widths fall at a rate set by the quantizer LR, while
    the weights of a pretrained model want a smaller LR; a scale > 1 separates the two. Each
    group carries its ``lr_scale`` so the schedule's LR is applied to both.
    """
    quantizer_ids = set()
    for module in student.modules():
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            quantizer_ids.update(id(p) for p in module.parameters())
    model_params, quantizer_params = [], []
    for p in student.parameters():
        if p.requires_grad:
            (quantizer_params if id(p) in quantizer_ids else model_params).append(p)
    scale = float(getattr(config, "quantizer_lr_scale", 1.0))
    groups = [{"params": model_params, "lr_scale": 1.0}]
    if quantizer_params:
        groups.append({"params": quantizer_params, "lr_scale": scale})
    return [g for g in groups if g["params"]]


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
            ``checkpoint_last.pt`` the trainer resumes from it.
        command: the command line recorded in the report (default ``sys.argv``).

    Attributes after construction: ``optimizer`` (RAdam), ``schedule`` (GDNSQSchedule),
    ``objective`` (GDNSQObjective), ``epoch`` (completed epochs), ``global_step`` (batches).
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

        # Seeds first, so that everything below that draws random numbers is reproducible.
        # The rank offset gives each rank its own dither stream (gradients are averaged anyway).
        random.seed(config.seed)
        np.random.seed(config.seed % (2 ** 32))
        torch.manual_seed(config.seed + self.rank)

        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        # "auto" becomes fp32 or bf16 here; a resumed run keeps the precision it started with
        # (see _load_last), so that it stays bit-identical to an uninterrupted one.
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
        self.optimizer = torch.optim.RAdam(_param_groups(self.student, config), lr=config.lr, weight_decay=0.0)
        self.schedule = GDNSQSchedule(config.lr, config.warmup_steps, t_scale=config.t_scale, anneal=config.anneal)
        self.objective = GDNSQObjective(self.student, epsilon=config.epsilon)
        # The module the training step runs: under DDP a DistributedDataParallel wrapper that
        # averages the gradients over ranks with bucketed all-reduces overlapping the backward.
        # Buffers are not broadcast per forward: each rank's BatchNorm statistics are averaged at
        # the epoch end (gdist.average_float_buffers). Evaluation calls self.student directly.
        self.train_module: nn.Module = self.student
        if gdist.is_distributed():
            self.objective.reduce_fn = gdist.all_reduce_mean
            self.train_module = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index if self.device.index is not None
                                          else torch.cuda.current_device()] if self.device.type == "cuda" else None,
                **_no_forward_buffer_sync())

        # Trainer state (all of it is in checkpoint_last.pt).
        self.epoch = 0
        self.global_step = 0
        self.converged = False
        self.first_converged_epoch: Optional[int] = None
        self.best_val_top1: Optional[float] = None      # selection: best converged val top-1
        self.best_epoch: Optional[int] = None
        self.es_best: Optional[float] = None            # early stopping reference (converged acc)
        self.bad_validations = 0
        self.stop_reason: Optional[str] = None
        self.wall_seconds_before = 0.0
        self.history: list = []
        self.last_val: Optional[dict] = None
        self.metrics_path = os.path.join(self.out_dir, METRICS)
        self._fit_start: Optional[float] = None
        self.resumed_from: Optional[int] = None
        self._last_inputs = None
        self._bar = None  # the epoch's tqdm bar, closed at the epoch end with its summary

        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        last = os.path.join(self.out_dir, LAST)
        if os.path.exists(last):
            self._load_last(last)
        gdist.barrier()

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
            self.history.append({"epoch": 0, "layers": self._per_layer_bits(), "realised": None,
                                 "converged": False, "val_top1": None})
        self._fit_start = time.monotonic()
        try:
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
        if self.is_main:
            self._log(f"gdnsq: stopped after epoch {self.epoch} ({self.stop_reason}); {self._selection_text()}")
        return self._write_report()

    @torch.no_grad()
    def evaluate(self, loader, max_batches: Optional[int] = None) -> dict:
        """Evaluate the student in eval mode.

        Returns ``{"top1": percent or None, "n": images, "loss": mean cross-entropy or None,
        "act_bits_max": {layer: max over batches of the activation quantizer's realised bits}}``.
        Under DDP the counts are summed over ranks when ``loader`` is sharded by a
        DistributedSampler (which pads the last round with repeats) and the observed
        activation bits are max-reduced, so every rank returns the same numbers."""
        was_training = self.student.training
        self.student.eval()
        layers = [(n, l) for n, l in gstats.quantized_layers(self.student)
                  if getattr(l, "act_quantizer", None) is not None and l.act_quantizer.enabled]
        act_max = {n: torch.full((), -math.inf, device=self.device) for n, _ in layers}
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_seen = 0
        n_labelled = 0
        try:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _split_batch(batch)
                x = self._to_input(x)
                logits = self.student(x)
                n_seen += x.shape[0]
                if y is not None:
                    y = y.to(self.device, non_blocking=True)
                    correct += (logits.argmax(dim=1) == y).sum().double()
                    loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
                    n_labelled += y.numel()
                for n, l in layers:
                    ob = l.act_quantizer.observed_bits.to(self.device)
                    act_max[n] = torch.maximum(act_max[n], ob.float())
        finally:
            self.student.train(was_training)
        counts = torch.tensor([float(n_seen), float(n_labelled)], dtype=torch.float64, device=self.device)
        if gdist.is_distributed():
            if _is_sharded(loader):
                counts = gdist.all_reduce_sum(counts)
                correct = gdist.all_reduce_sum(correct)
                loss_sum = gdist.all_reduce_sum(loss_sum)
            for n, l in layers:
                act_max[n] = gdist.all_reduce_max(act_max[n])
                # Same convergence decision on every rank: the observed bits become the max too.
                l.act_quantizer.observed_bits.fill_(float(gdist.all_reduce_max(l.act_quantizer.observed_bits.float())))
        n_seen, n_labelled = int(counts[0].item()), int(counts[1].item())
        top1 = 100.0 * correct.item() / n_labelled if n_labelled else None
        loss = loss_sum.item() / n_labelled if n_labelled else None
        return {"top1": top1, "n": n_seen, "loss": loss,
                "act_bits_max": {n: float(v) for n, v in act_max.items()}}

    def load_selected(self) -> Optional[int]:
        """Load the selected weights into the student: ``checkpoint_best.pt`` when some epoch
        converged, else the last checkpoint. Returns the epoch loaded (None if no checkpoint)."""
        best = os.path.join(self.out_dir, BEST)
        last = os.path.join(self.out_dir, LAST)
        if os.path.exists(best):
            ckpt = load_checkpoint(best, kind="best")
        elif os.path.exists(last):
            ckpt = load_checkpoint(last, kind="last")
        else:
            return None
        self.student.load_state_dict(ckpt["student"])
        return ckpt["epoch"]

    def test(self, test_loader) -> dict:
        """Load the selected checkpoint, evaluate it once on ``test_loader`` and write
        report.json / report.md / bits.png. Returns the report. The student keeps the selected
        weights afterwards."""
        epoch = self.load_selected()
        if epoch is None:
            raise ValueError(f"Trainer.test: no checkpoint in {self.out_dir}; call fit() first")
        res = self.evaluate(test_loader)
        realised = self._realised_bits(res["act_bits_max"])
        return self._write_report(test=res, realised=realised)

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
            x, _ = _split_batch(batch)
            x = self._to_input(x)
            self._last_inputs = x
            lr, t = float(self.schedule.lr), float(self.schedule.t)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            # Autocast is opened per step around the forwards and the loss only: an autocast
            # context held across steps keeps serving the bf16 copies of the FP layers' weights
            # cast at its first step while the optimizer updates the float32 masters.
            with self._autocast():
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                student_logits = self.train_module(x)
                loss, parts = self.objective(student_logits.float(), teacher_logits.float(), t)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                # Stop before the update: checkpoint_last.pt still holds the last good epoch.
                raise FloatingPointError(f"Trainer: the loss became {loss_value} at epoch {epoch}, step "
                                         f"{self.global_step + 1} (lr {lr:g}, t {t:g}); lower lr or t_scale")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP this also averages the gradients over ranks
            self.optimizer.step()
            self.schedule.step()
            self.global_step += 1
            parts = {k: float(v) for k, v in dict(parts).items()}
            metrics = {"loss": loss_value} | {k: v for k, v in parts.items() if k not in ("loss", "t")}
            if self.global_step % cfg.log_every != 0:
                return metrics, None
            mb = self._mean_bits()
            # Realised weight bits come from the current codes (cheap); realised activation
            # bits exist only for eval batches, so they are in the epoch records.
            rw = [v["weight"] for v in gstats.realised_bits(self.student).values()]
            self._write_metrics({"kind": "step", "epoch": epoch, "step": self.global_step, "loss": loss_value,
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
        # The budget is checked before validation so that the epoch a segment pauses on is
        # validated too (its checkpoint may be the one a later segment or the user picks up).
        out_of_time = cfg.max_minutes is not None and self._segment_seconds() >= cfg.max_minutes * 60
        val_due = epoch % cfg.val_every == 0 or epoch >= cfg.max_epochs or out_of_time
        val = None
        if self.val_loader is None:
            # Convergence needs fresh observed activation bits from an eval-mode batch.
            self._probe_on(self._last_inputs)
        elif val_due:
            val = self.evaluate(self.val_loader)
        else:
            self.evaluate(self.val_loader, max_batches=cfg.probe_batches)
        converged = bool(gstats.is_converged(self.student))
        self.converged = converged
        if converged and self.first_converged_epoch is None:
            self.first_converged_epoch = epoch
        # The LR anneals (and patience counts) only once the hold at the target bits is over.
        held = self.first_converged_epoch is not None and epoch - self.first_converged_epoch >= cfg.hold_epochs
        self.schedule.set_converged(converged and held)
        realised = gstats.realised_bits(self.student)
        selected = False
        if self.val_loader is None and converged:
            # Without validation data the latest converged epoch is the selection.
            self.best_epoch = epoch
            selected = True
        if val is not None:
            self.last_val = {"epoch": epoch, "top1": val["top1"], "loss": val["loss"]}
            top1 = val["top1"] if val["top1"] is not None else 0.0
            if converged and (self.best_val_top1 is None or top1 > self.best_val_top1):
                self.best_val_top1, self.best_epoch = top1, epoch
                selected = True
            if held:
                score = top1 if converged else 0.0
                if self.es_best is None or score > self.es_best + cfg.min_delta:
                    self.es_best = score
                    self.bad_validations = 0
                else:
                    self.bad_validations += 1
        self.epoch = epoch
        per_layer = self._per_layer_bits()
        self.history.append({"epoch": epoch, "layers": per_layer,
                             "realised": {n: dict(v) for n, v in realised.items()},
                             "converged": converged, "val_top1": val["top1"] if val else None,
                             "train_loss": train["loss"], "val_loss": val["loss"] if val else None})
        # Stop decisions are made before the checkpoint so that it records them.
        if self.bad_validations >= cfg.patience:
            self.stop_reason = "early_stopping"
        elif epoch >= cfg.max_epochs:
            self.stop_reason = "max_epochs"
        elif out_of_time:
            self.stop_reason = "max_minutes"
        mb = self._mean_bits()
        rmax_w = max((v["weight"] for v in realised.values() if v.get("weight") is not None), default=None)
        rmax_a = max((v["act"] for v in realised.values() if v.get("act") is not None), default=None)
        rec = {"kind": "epoch", "epoch": epoch, "step": self.global_step,
               "train_" + "loss": train["loss"],
               **{"train_" + k: v for k, v in train.items() if k not in ("loss", "batches")},
               "t": float(self.schedule.t), "lr": float(self.schedule.lr),
               "mean_weight_bits": mb["weight"], "mean_act_bits": mb["act"],
               "realised_weight_bits_max": rmax_w, "realised_act_bits_max": rmax_a,
               "converged": converged, "val_top1": val["top1"] if val else None,
               "val_loss": val["loss"] if val else None, "selected": selected,
               "bad_validations": self.bad_validations, "epoch_seconds": epoch_seconds,
               "wall_seconds": self._wall_seconds(), "per_layer_bits": per_layer,
               "realised_bits": realised}
        self._write_metrics(rec)
        if selected:
            self._save_best(epoch, val or {"top1": None, "loss": None, "n": 0, "act_bits_max": None}, realised)
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

    @torch.no_grad()
    def _probe_on(self, x) -> None:
        """One eval-mode forward on ``x`` (refreshes the activation quantizers' observed bits);
        under DDP the observed bits are then max-reduced over ranks."""
        was_training = self.student.training
        self.student.eval()
        try:
            self.student(x)
        finally:
            self.student.train(was_training)
        if gdist.is_distributed():
            for _, l in gstats.quantized_layers(self.student):
                aq = getattr(l, "act_quantizer", None)
                if aq is not None and aq.enabled:
                    aq.observed_bits.fill_(float(gdist.all_reduce_max(aq.observed_bits.float())))

    # ------------------------------------------------------------------ bits

    @torch.no_grad()
    def _mean_bits(self) -> dict:
        mb = gstats.mean_bits(self.student)
        return {k: (float(v) if v is not None else None) for k, v in mb.items()}

    @torch.no_grad()
    def _per_layer_bits(self) -> dict:
        """{layer: {"weight": mean continuous weight bits over channels, "act": continuous
        activation bits or None}} (what bits.png draws)."""
        return {n: {"weight": v["weight"], "act": v["act"]}
                for n, v in gstats.continuous_bits(self.student).items()}

    def _realised_bits(self, act_bits_max: Optional[dict] = None) -> dict:
        """{layer: {"weight": realised bits from the codes, "act": max observed activation bits
        over the evaluated pass (or the last eval batch when ``act_bits_max`` is None)}}."""
        realised = {n: dict(v) for n, v in gstats.realised_bits(self.student).items()}
        if act_bits_max:
            for n, v in act_bits_max.items():
                if n in realised and math.isfinite(v):
                    realised[n]["act"] = v
        return realised

    def _targets(self) -> dict:
        tw, ta = {}, {}
        for name, layer in gstats.quantized_layers(self.student):
            wq = getattr(layer, "weight_quantizer", None)
            if wq is not None:
                tw[name] = float(wq.target_bits)
            aq = getattr(layer, "act_quantizer", None)
            if aq is not None and aq.enabled:
                ta[name] = float(aq.target_bits)

        def collapse(d):
            vals = set(d.values())
            return None if not d else (vals.pop() if len(vals) == 1 else d)

        return {"weight": collapse(tw), "act": collapse(ta)}

    # ------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": _python_state_to_plain(random.getstate()),
            "train_generators": [g.get_state() for g in _loader_generators(self.train_loader)],
            "val_generators": [g.get_state() for g in _loader_generators(self.val_loader)],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        random.setstate(_python_state_from_plain(state["python"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        for key, loader in (("train_generators", self.train_loader), ("val_generators", self.val_loader)):
            gens = _loader_generators(loader)
            if len(gens) != len(state[key]):
                warnings.warn(f"Trainer resume: the {key.split('_')[0]} loader has {len(gens)} generator(s), the "
                              f"checkpoint {len(state[key])}; its shuffle order will differ from an uninterrupted run")
                continue
            for g, s in zip(gens, state[key]):
                g.set_state(s)

    def _trainer_state(self) -> dict:
        return {
            "converged": self.converged, "first_converged_epoch": self.first_converged_epoch,
            "best_val_top1": self.best_val_top1, "best_epoch": self.best_epoch,
            "es_best": self.es_best, "bad_validations": self.bad_validations,
            "stop_reason": self.stop_reason, "wall_seconds": self._wall_seconds(),
            "precision": self.precision, "precision_reason": self.precision_reason,
            "history": self.history, "last_val": self.last_val,
        }

    def _save_last(self) -> None:
        rng = gdist.all_gather_object(self._rng_state())
        metrics_offset = os.path.getsize(self.metrics_path) if self.is_main and os.path.exists(self.metrics_path) else 0
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
                "metrics_offset": metrics_offset,
                "config": self.cfg.to_dict(),
                "complete": True,  # written last: its presence marks a complete payload
            }
            save_checkpoint(ckpt, os.path.join(self.out_dir, LAST))
        gdist.barrier()

    def _save_best(self, epoch: int, val: dict, realised: dict) -> None:
        if not self.is_main:
            return
        ckpt = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": "best",
            "epoch": epoch, "val_top1": val["top1"], "val_loss": val["loss"], "val_n": val["n"],
            "realised_bits": self._realised_bits(val["act_bits_max"]),
            "student": self.student.state_dict(), "config": self.cfg.to_dict(), "complete": True,
        }
        save_checkpoint(ckpt, os.path.join(self.out_dir, BEST))

    def _load_last(self, path: str) -> None:
        ckpt = load_checkpoint(path, kind="last")
        old = ckpt["config"]
        new = self.cfg.to_dict()
        changed = sorted(k for k in new if k not in _RESUME_FREE_FIELDS and old.get(k) != new[k])
        if changed:
            warnings.warn(f"Trainer resume from {path}: config field(s) {changed} differ from the checkpoint's "
                          f"({ {k: old.get(k) for k in changed} }); the result will differ from an uninterrupted run")
        self.student.load_state_dict(ckpt["student"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.objective.load_state_dict(ckpt["objective"])
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            self._set_rng_state(rng[self.rank])
        else:
            warnings.warn(f"Trainer resume: checkpoint written by {len(rng)} rank(s), now {self.world_size}; "
                          "random streams are re-seeded, so the run will not be bit-identical")
        st = ckpt["trainer"]
        self.epoch = ckpt["epoch"]
        self.global_step = ckpt["global_step"]
        self.converged = st["converged"]
        self.first_converged_epoch = st["first_converged_epoch"]
        self.best_val_top1, self.best_epoch = st["best_val_top1"], st["best_epoch"]
        self.es_best, self.bad_validations = st["es_best"], st["bad_validations"]
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
        if self.is_main and os.path.exists(self.metrics_path):
            if os.path.getsize(self.metrics_path) > ckpt["metrics_offset"]:
                with open(self.metrics_path, "r+b") as f:
                    f.truncate(ckpt["metrics_offset"])

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
        running = time.monotonic() - self._fit_start if self._fit_start is not None else 0.0
        return self.wall_seconds_before + running

    def _log(self, msg: str) -> None:
        if self.is_main and self.cfg.progress:
            print(msg, file=sys.stderr, flush=True)

    def _write_metrics(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def _plot(self) -> None:
        if not self.history:
            return
        run = os.path.basename(os.path.abspath(self.out_dir))
        plot_bit_history(self.history, os.path.join(self.out_dir, "bits.png"), targets=self._targets(),
                         title=f"GDNSQ per-layer continuous bit-width ({run})")
        plot_curves(self.history, os.path.join(self.out_dir, "curves.png"),
                    title=f"GDNSQ loss and validation accuracy ({run})")

    def _selection(self) -> tuple:
        """(epoch, val top-1, file name, realised bits or None) of the checkpoint the report and
        :meth:`test` use: ``checkpoint_best.pt`` (the best converged epoch) when some epoch
        converged, else ``checkpoint_last.pt`` (the last epoch, not converged); all None before
        the first epoch."""
        best_path = os.path.join(self.out_dir, BEST)
        if os.path.exists(best_path):
            best = load_checkpoint(best_path, kind="best")
            return best["epoch"], best["val_top1"], BEST, best["realised_bits"]
        if self.epoch:
            val_top1 = self.last_val["top1"] if self.last_val and self.last_val["epoch"] == self.epoch else None
            return self.epoch, val_top1, LAST, None
        return None, None, None, None

    def _selection_text(self) -> str:
        epoch, val_top1, sel_file, _ = self._selection()
        if sel_file is None:
            return "nothing selected (no epoch run)"
        val = "-" if val_top1 is None else f"{val_top1:.2f} %"
        if sel_file == BEST:
            return f"selected epoch {epoch} (converged; val top-1 {val}; {BEST})"
        return f"no converged epoch: the last epoch {epoch} stands in (not converged; val top-1 {val}; {LAST})"

    def _build_report(self, test: Optional[dict] = None, realised: Optional[dict] = None) -> dict:
        selected_epoch, val_top1, sel_file, sel_realised = self._selection()
        if realised is None:
            realised = sel_realised if sel_realised is not None else self._realised_bits()
        targets = self._targets()
        rw = {n: v.get("weight") for n, v in realised.items() if v.get("weight") is not None}
        ra = {n: v.get("act") for n, v in realised.items() if v.get("act") is not None and math.isfinite(v.get("act"))}
        per_layer = self._per_layer_bits()
        cw = [v["weight"] for v in per_layer.values() if v["weight"] is not None]
        ca = [v["act"] for v in per_layer.values() if v["act"] is not None]
        return {
            "test_top1": test["top1"] if test else None,
            "test_n": test["n"] if test else None,
            "val_top1": val_top1,
            "selected_epoch": selected_epoch,
            "selected_checkpoint": sel_file,
            "converged": bool(sel_file == BEST),
            "first_converged_epoch": self.first_converged_epoch,
            "target_weight_bits": targets["weight"],
            "target_act_bits": targets["act"],
            "realised_weight_bits": rw,
            "realised_act_bits": ra,
            "realised_weight_bits_max": max(rw.values()) if rw else None,
            "realised_act_bits_max": max(ra.values()) if ra else None,
            "mean_realised_weight_bits": sum(rw.values()) / len(rw) if rw else None,
            "mean_realised_act_bits": sum(ra.values()) / len(ra) if ra else None,
            "mean_weight_bits": sum(cw) / len(cw) if cw else None,
            "mean_act_bits": sum(ca) / len(ca) if ca else None,
            "continuous_bits": per_layer,
            "epochs_run": self.epoch,
            "global_steps": self.global_step,
            "stop_reason": self.stop_reason,
            "wall_seconds": round(self._wall_seconds(), 3),
            "world_size": self.world_size,
            "precision": {"requested": self.cfg.precision, "used": self.precision,
                          "reason": self.precision_reason},
            "config": self.cfg.to_dict(),
            "command": self.command,
        }

    def _write_report(self, test: Optional[dict] = None, realised: Optional[dict] = None) -> dict:
        report = self._build_report(test, realised)
        if self.is_main:
            write_report(self.out_dir, report)
            self._plot()
        gdist.barrier()
        return report

