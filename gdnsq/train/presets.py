"""Training hyper-parameters (``TrainConfig``) and the named presets ``"paper"``, ``"cpu-fast"``,
``"cpu-long"`` and ``"cpu-8ep"``.

Units are part of every field's name or docstring: LR schedule lengths are counted in optimizer
steps (= batches per rank), validation cadence and patience in epochs / validations.

Example::

    cfg = get_preset("cpu-fast", max_epochs=4, seed=1)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..schedule import ANNEAL_SHAPES

ESTIMATORS = ("ste", "aewgs")
PRECISIONS = ("auto", "fp32", "bf16")


def half_life_to_anneal(half_life_epochs: float, batches_per_epoch: int) -> float:
    """The per-batch LR factor that halves the LR every ``half_life_epochs`` epochs."""
    if not half_life_epochs > 0:
        raise ValueError(f"half_life_epochs: expected a positive number of epochs, got {half_life_epochs!r}")
    if isinstance(batches_per_epoch, bool) or not isinstance(batches_per_epoch, int) or batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch: expected a positive int, got {batches_per_epoch!r}")
    return 0.5 ** (1.0 / (half_life_epochs * batches_per_epoch))


@dataclass
class TrainConfig:
    """Everything the :class:`gdnsq.Trainer` needs besides the model and the data.

    Schedule (METHOD.md Part B §3.3, §4.4):
        lr: initial (peak) learning rate of RAdam, lr0. Paper: 0.002 (CIFAR).
        warmup_steps: batches of linear LR warm-up from 0 to ``lr``, with penalty weight t = 0.
        t_scale: after warm-up, t grows by ``t_scale * lr`` per batch (paper: 2.0).
        anneal: per-batch LR factor applied once the realised bit-widths meet the targets (and
            ``hold_epochs`` have passed). ``half_life_to_anneal`` converts a half-life in epochs.
        anneal_shape: "exponential" (the LR x ``anneal`` per batch, the paper's) or "cosine"
            (the LR falls along a half cosine from its peak at the start of annealing to 0 at
            the end of ``max_epochs``; ``anneal`` is unused): for a fixed short budget.
        hold_epochs: epochs trained at the full LR after the first convergence before annealing
            starts (0: anneal from the first convergence on, as the paper). Early-stopping
            patience is counted only after the hold, so the stopping rule sees a plateau at the
            target bits rather than the first epoch there.
        quantizer_lr_scale: the quantizer parameters (log2 steps, log2 ranges, offsets) train at
            ``lr * quantizer_lr_scale`` in a second RAdam group (paper: 1.0, one LR for all).
    Stopping and selection (Part B §4.6):
        max_epochs: hard limit on training epochs.
        max_minutes: optional wall-clock budget in minutes of one segment (one ``fit()`` call,
            one command); the run pauses cleanly at the first epoch end past it, after
            validating and checkpointing, and the next segment continues from there.
        val_every: validate every this many epochs (the last epoch is always validated).
        patience: early stopping after this many validations without an improvement of more
            than ``min_delta`` percentage points, counted only after the first convergence.
        min_delta: minimum val top-1 improvement (percentage points) that resets patience.
    Start (applied by ``gdnsq quantize``'s calibration, :func:`gdnsq.calibrate`):
        start_bits: bit-width every quantizer starts at (paper: 10). A short run starts lower
            (e.g. 4) so that the descent to the target takes a fraction of an epoch.
        start_grid: "minmax" (the clamps span the calibration inputs) or "mse" (the activation
            clamp that minimises the squared quantization error at ``start_bits``).

    Other:
        batch_size: images per optimizer step per rank; used by loader helpers (the trainer
            itself takes ready-made loaders and only records this value).
        estimator: weight-gradient estimator, "ste" or "aewgs": the trainer sets it on every
            weight quantizer of the student. None keeps what ``quantize_model`` chose (STE
            unless ``estimator="aewgs"`` was passed there).
        epsilon: bit-width constraint margin of the penalty (bits <= target - epsilon).
        seed: seeds torch (+ rank), numpy and python's random when the trainer is built.
        device: "auto" (cuda:<local rank> when available, else cpu), or any torch device string.
        log_every: write a step record to metrics.jsonl every this many batches.
        num_workers: DataLoader workers for loader helpers.
        probe_batches: batches of the validation loader run in eval mode at train-epoch ends
            where no validation is due, to refresh the activation quantizers' observed bits
            before the convergence test.
        progress: show the progress bar on stderr (rank 0 only).
    Speed:
        precision: "auto" (default: bf16 where the hardware runs it natively, else fp32; see
            :mod:`gdnsq.train.precision`), "fp32", or "bf16": the teacher and student forward
            and the loss of each
            training step run under ``torch.autocast(dtype=torch.bfloat16)`` opened per step (the
            quantizers still compute in float32, METHOD Part A item 8; validation, test and
            export stay float32).
        channels_last: keep the models' 4-D tensors and the input batches in channels_last
            (NHWC) memory format; values are unchanged.
        label_weight: weight of the cross-entropy on the training labels added to the
            distillation loss, ``D = Jeffreys(teacher, student) + label_weight * CE(student,
            labels)`` (default 0: the paper's pure distillation). A recipe departure
            (METHOD Part A item 10) for short runs, where fitting the teacher alone also fits
            its memorisation of the training images.
        distill_temperature: temperature ``T`` of the Jeffreys distillation, ``D = T^2 *
            J(softmax(teacher/T), softmax(student/T))`` (default 1: the paper's). A recipe
            departure (METHOD Part A item 10) for a teacher that is nearly certain on the
            training images (one that trained on them): ``T = 4`` turns its almost one-hot
            outputs back into a distribution over the classes.
    """

    lr: float = 0.002
    warmup_steps: int = 1000
    t_scale: float = 2.0
    anneal: float = 0.9985
    anneal_shape: str = "exponential"
    hold_epochs: int = 0
    quantizer_lr_scale: float = 1.0
    max_epochs: int = 1000
    max_minutes: Optional[float] = None
    val_every: int = 2
    patience: int = 50
    min_delta: float = 1e-4
    batch_size: int = 1000
    estimator: Optional[str] = None
    epsilon: float = 1e-3
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    num_workers: int = 0
    probe_batches: int = 1
    progress: bool = True
    precision: str = "auto"
    channels_last: bool = False
    start_bits: float = 10.0
    start_grid: str = "minmax"
    label_weight: float = 0.0
    distill_temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ValueError/TypeError naming the first bad field; return self."""
        def positive(name, integer=False, allow_zero=False):
            v = getattr(self, name)
            kind = int if integer else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise TypeError(f"TrainConfig.{name}: expected {'an int' if integer else 'a number'}, got {v!r}")
            if v < 0 or (v == 0 and not allow_zero):
                raise ValueError(f"TrainConfig.{name}: expected a {'non-negative' if allow_zero else 'positive'} value, got {v!r}")

        positive("lr")
        positive("warmup_steps", integer=True, allow_zero=True)
        positive("t_scale", allow_zero=True)
        positive("quantizer_lr_scale")
        positive("max_epochs", integer=True)
        positive("val_every", integer=True)
        positive("patience", integer=True)
        positive("min_delta", allow_zero=True)
        positive("batch_size", integer=True)
        positive("epsilon", allow_zero=True)
        positive("log_every", integer=True)
        positive("num_workers", integer=True, allow_zero=True)
        positive("probe_batches", integer=True)
        positive("hold_epochs", integer=True, allow_zero=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision: expected one of {PRECISIONS}, got {self.precision!r}")
        positive("start_bits")
        positive("label_weight", allow_zero=True)
        if not math.isfinite(self.label_weight):
            raise ValueError(f"TrainConfig.label_weight: expected a finite number, got {self.label_weight!r}")
        positive("distill_temperature")
        if not math.isfinite(self.distill_temperature):
            raise ValueError(f"TrainConfig.distill_temperature: expected a finite number > 0, "
                             f"got {self.distill_temperature!r}")
        if self.anneal_shape not in ANNEAL_SHAPES:
            raise ValueError(f"TrainConfig.anneal_shape: expected one of {ANNEAL_SHAPES}, got {self.anneal_shape!r}")
        if self.start_grid not in ("minmax", "mse"):
            raise ValueError(f"TrainConfig.start_grid: expected 'minmax' or 'mse', got {self.start_grid!r}")
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"TrainConfig.channels_last: expected a bool, got {self.channels_last!r}")
        if isinstance(self.anneal, bool) or not isinstance(self.anneal, (int, float)) or not 0 < self.anneal <= 1:
            raise ValueError(f"TrainConfig.anneal: expected a per-batch factor in (0, 1], got {self.anneal!r}")
        if self.max_minutes is not None:
            positive("max_minutes")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"TrainConfig.estimator: expected None or one of {ESTIMATORS}, got {self.estimator!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"TrainConfig.seed: expected an int, got {self.seed!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"TrainConfig.device: expected a string such as 'auto', 'cpu' or 'cuda:0', got {self.device!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


# Batches per epoch on the default CIFAR split (45,000 training images after holding out 5,000
# for validation) at batch 128: ceil(45000 / 128) = 352.
_CPU_FAST_BATCHES_PER_EPOCH = 352

PRESETS = {
    # METHOD.md Part B §8 (CIFAR): batch 1000, RAdam lr 0.002, 1000 warm-up batches, t += 2*lr0
    # per batch, LR x0.9985 per batch after convergence, validation every 2 epochs, patience 50
    # validations, at most 1000 epochs.
    "paper": dict(
        lr=0.002, warmup_steps=1000, t_scale=2.0, anneal=0.9985, batch_size=1000,
        val_every=2, patience=50, min_delta=1e-4, max_epochs=1000, log_every=10,
    ),
    # A short fine-tune from a pretrained FP ResNet-20 on a 2-core CPU. RAdam moves each
    # log2 step by about its LR per batch once the penalty dominates, so the bit-widths fall at
    # roughly 2*lr_q bits per batch for activations and lr_q for weights, lr_q = lr *
    # quantizer_lr_scale = 0.01: 10 -> 4 bits within ~2 epochs of 352 batches, 10 -> 2 within
    # ~3. The weights of the pretrained model train at lr = 5e-4 (at 0.004 for everything the
    # distillation loss rose 100x during warm-up). t grows by 0.2 per batch, so the penalty
    # dominates the distillation gradient early. The LR then halves every epoch
    # (0.5 ** (1/352) = 0.99803 per batch).
    "cpu-fast": dict(
        lr=0.0005, quantizer_lr_scale=20.0, warmup_steps=100, t_scale=400.0,
        anneal=round(0.5 ** (1.0 / _CPU_FAST_BATCHES_PER_EPOCH), 5), batch_size=128,
        val_every=1, patience=3, min_delta=1e-4, max_epochs=8, log_every=20,
    ),
    # A 1-3 hour CPU run (RECIPE-NOTES): the bits descend near the paper's rate per batch, the
    # LR stays up at the target bits, and the stopping rule sees a plateau. Quantizer LR 2e-3
    # (the paper's) moves each log2 step ~2e-3 per batch: ~1 bit per epoch of 352 batches, so
    # 10 -> 1 bits takes ~10 epochs; t grows 0.025 per batch (the paper's 0.004 per batch of
    # 1000 images, scaled by ~6). Then 8 epochs at the full LR at the target, then the LR halves
    # every 6 epochs; patience 4 validations of 2 epochs after the hold.
    "cpu-long": dict(
        lr=0.0005, quantizer_lr_scale=4.0, warmup_steps=200, t_scale=50.0, hold_epochs=8,
        anneal=round(0.5 ** (1.0 / (6 * _CPU_FAST_BATCHES_PER_EPOCH)), 6), batch_size=128,
        val_every=2, patience=4, min_delta=0.05, max_epochs=60, log_every=20,
    ),
    # Eight epochs at W2A2 and similar (docs/results.md, the comparison with a plain LSQ
    # fine-tune): the weights at lr 1e-3, the quantizers at 14x that (the bits reach the target
    # in the second epoch), then the LR along a half cosine to 0 at the end of epoch 8, so the
    # last epoch is the selected one; no early stopping inside the budget. Distillation at
    # temperature 4, for a teacher that is nearly certain on its own training images.
    "cpu-8ep": dict(
        lr=0.001, quantizer_lr_scale=14.0, warmup_steps=100, t_scale=560.0, anneal_shape="cosine",
        batch_size=128, val_every=1, patience=100, min_delta=1e-4, max_epochs=8, log_every=20,
        distill_temperature=4.0,
    ),
}


def get_preset(name: str, **overrides) -> TrainConfig:
    """Return a fresh :class:`TrainConfig` for preset ``name`` with ``overrides`` applied.

    Raises ValueError for an unknown preset name or an unknown field in ``overrides``.
    """
    if name not in PRESETS:
        raise ValueError(f"get_preset: name must be one of {sorted(PRESETS)}, got {name!r}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"get_preset: unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    return TrainConfig(**values)


def _field_kind(name: str) -> str:
    """The annotation of TrainConfig field ``name`` as text ("float", "Optional[int]", ...)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    raise ValueError(f"unknown TrainConfig field {name!r}; known fields: "
                     f"{sorted(f.name for f in dataclasses.fields(TrainConfig))}")


def parse_field(name: str, value):
    """``value`` (text from ``--set``, or a value read from a YAML/JSON file) converted to the
    type of TrainConfig field ``name``: "0.002" or 0 -> float for a float field, "true" -> True
    for a bool, "none"/"null" -> None where the field is Optional. Raises ValueError naming the
    field for an unknown field or a value of the wrong kind (range checks are TrainConfig's)."""
    kind = _field_kind(name)
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    text = value.strip() if isinstance(value, str) else None
    if value is None or (text is not None and text.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name}: expected a {base}, got {value!r}")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in ("true", "yes", "1", "false", "no", "0"):
                return text.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(text) if text is not None else int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(text) if text is not None else float(value)
        if base == "str":
            return text if text is not None else str(value)
        if base == "dict":
            if isinstance(value, dict):
                return value
            import json
            parsed = json.loads(text)
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a {base}{' or none' if optional else ''}, got {value!r}") from None
    raise ValueError(f"{name}: fields of type {kind} cannot be set")  # pragma: no cover
