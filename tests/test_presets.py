"""TrainConfig validation and the "paper" / "cpu-fast" presets."""
import dataclasses

import pytest
import torch

from gdnsq.train.presets import PRESETS, TrainConfig, get_preset
from gdnsq.schedule import GDNSQSchedule


def test_paper_preset_matches_method_part_b_section_8():
    cfg = get_preset("paper")
    assert (cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.t_scale, cfg.anneal) == (1000, 0.002, 1000, 2.0, 0.9985)
    assert (cfg.val_every, cfg.patience, cfg.min_delta, cfg.max_epochs) == (2, 50, 1e-4, 1000)
    assert cfg.estimator is None and cfg.epsilon == 1e-3  # None: keep the converted model's (STE)


def _optimizer(lr):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def test_cpu_fast_preset_schedule():
    cfg = get_preset("cpu-fast")
    assert cfg.batch_size == 128 and cfg.val_every == 1 and cfg.patience == 3 and 6 <= cfg.max_epochs <= 10
    assert 50 <= cfg.warmup_steps <= 200
    batches_per_epoch = -(-45000 // cfg.batch_size)
    assert batches_per_epoch == 352
    # After convergence the LR halves about once per epoch.
    sched = GDNSQSchedule(_optimizer(cfg.lr), cfg.warmup_steps, t_scale=cfg.t_scale, anneal=cfg.anneal)
    for _ in range(cfg.warmup_steps + 1):
        sched.step()
    lr_before = sched.lr
    sched.set_converged(True)
    for _ in range(batches_per_epoch):
        sched.step()
    assert sched.lr / lr_before == pytest.approx(0.5, abs=0.01)
    # t grows t_scale*lr per batch: large within the first epoch (the paper needs ~20 epochs
    # of 50 batches to reach t = 4).
    sched = GDNSQSchedule(_optimizer(cfg.lr), cfg.warmup_steps, t_scale=cfg.t_scale, anneal=cfg.anneal)
    for _ in range(batches_per_epoch):
        sched.step()
    assert sched.t == pytest.approx(cfg.t_scale * cfg.lr * (batches_per_epoch - cfg.warmup_steps))
    assert sched.t > 20


def test_overrides_and_fresh_objects():
    cfg = get_preset("paper", lr=0.01, max_minutes=30.0, seed=7)
    assert (cfg.lr, cfg.max_minutes, cfg.seed) == (0.01, 30.0, 7)
    assert get_preset("paper").lr == 0.002  # the preset table is not modified
    assert get_preset("paper") is not get_preset("paper")
    assert PRESETS["paper"]["lr"] == 0.002
    d = cfg.to_dict()
    assert TrainConfig.from_dict(d) == cfg
    assert set(d) == {f.name for f in dataclasses.fields(TrainConfig)}


def test_unknown_names_and_fields():
    with pytest.raises(ValueError, match="name must be one of"):
        get_preset("fastest")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        get_preset("paper", learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"lr": 0.1, "nope": 1})


@pytest.mark.parametrize("field, value, err", [
    ("lr", 0.0, ValueError), ("lr", -1.0, ValueError), ("lr", "0.1", TypeError),
    ("warmup_steps", -1, ValueError), ("warmup_steps", 1.5, TypeError),
    ("anneal", 0.0, ValueError), ("anneal", 1.5, ValueError),
    ("max_epochs", 0, ValueError), ("val_every", 0, ValueError), ("patience", 0, ValueError),
    ("max_minutes", -5.0, ValueError), ("estimator", "ewgs", ValueError), ("seed", 1.0, TypeError),
    ("batch_size", True, TypeError), ("device", 0, TypeError), ("probe_batches", 0, ValueError),
])
def test_bad_values_name_the_field(field, value, err):
    with pytest.raises(err, match=f"TrainConfig.{field}"):
        get_preset("cpu-fast", **{field: value})


def test_zero_warmup_and_zero_t_scale_are_allowed():
    cfg = get_preset("paper", warmup_steps=0, t_scale=0.0, anneal=1.0)
    assert cfg.warmup_steps == 0 and cfg.t_scale == 0.0 and cfg.anneal == 1.0
