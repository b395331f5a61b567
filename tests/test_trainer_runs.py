"""Trainer behaviour at the edges of a run: the epoch a run stops on is validated, the JSON files
are strict JSON, and a Trainer keeps to its own random streams (the caller's generators are
neither reseeded nor advanced, and the run does not depend on them)."""
import json
import os
import random

import numpy as np
import pytest
import torch

import _trainer_tiny as tiny
from gdnsq.train.checkpoint import LAST, METRICS, load_checkpoint, save_checkpoint
from gdnsq.train.report import MetricsLog, write_report
from gdnsq.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _refuse_constant(token):
    raise ValueError(f"not strict JSON: {token}")


def _strict_records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=_refuse_constant) for line in f]


def _epochs(out_dir):
    return [r for r in _strict_records(os.path.join(out_dir, METRICS)) if r["kind"] == "epoch"]


def _trainer(out_dir, student_teacher=None, **overrides):
    train, val, _ = tiny.loaders()
    student, teacher = student_teacher or tiny.student_teacher(calib_loader=val)
    return Trainer(student, teacher, train, val, config=tiny.fast_config(**overrides), out_dir=str(out_dir))


def test_the_epoch_a_run_stops_on_is_validated(tmp_path):
    # max_epochs: epoch 2 is validated although val_every=4
    _trainer(tmp_path, max_epochs=2, val_every=4).fit()
    assert [r["val_top1"] is not None for r in _epochs(tmp_path)] == [False, True]
    # early stopping: patience already spent when the run resumes (patience may change on
    # resume); the run stops after epoch 3, which is validated although val_every=4
    path = str(tmp_path / LAST)
    ckpt = load_checkpoint(path)
    ckpt["trainer"].update(bad_validations=4, es_best=1000.0)  # a score no epoch beats
    ckpt["schedule"].update(first_converged=1, checks=2)  # converged at epoch 1: the hold is over
    save_checkpoint(ckpt, path)
    rep = _trainer(tmp_path, max_epochs=10, val_every=4, patience=4).fit()
    assert rep["stop_reason"] == "early_stopping" and rep["epochs_run"] == 3
    last = _epochs(tmp_path)[-1]
    assert last["epoch"] == 3 and last["val_top1"] is not None and last["bad_validations"] == 5


def test_report_and_metrics_are_strict_json(tmp_path):
    # write_report: non-finite numbers become null, in report.json and report.md alike
    report = {"test_top1": float("nan"), "test_n": 3, "val_top1": float("inf"), "selected_epoch": 1,
              "selected_checkpoint": LAST, "converged": False, "first_converged_epoch": None,
              "target_weight_bits": 2.0, "target_act_bits": None, "realised_weight_bits": {"a": 2.0},
              "realised_act_bits": {"a": float("-inf")}, "realised_weight_bits_max": 2.0,
              "realised_act_bits_max": None, "mean_realised_weight_bits": 2.0, "mean_realised_act_bits": None,
              "mean_weight_bits": 2.0, "mean_act_bits": float("nan"),
              "continuous_bits": {"a": {"weight": 2.0, "act": float("nan")}}, "epochs_run": 1, "global_steps": 2,
              "stop_reason": "max_epochs", "wall_seconds": 1.0, "world_size": 1, "config": {}, "command": "x"}
    write_report(str(tmp_path), report)
    with open(tmp_path / "report.json", encoding="utf-8") as f:
        on_disk = json.loads(f.read(), parse_constant=_refuse_constant)
    assert on_disk["test_top1"] is None and on_disk["val_top1"] is None
    assert on_disk["realised_act_bits"] == {"a": None} and on_disk["continuous_bits"]["a"]["act"] is None
    assert "nan" not in (tmp_path / "report.md").read_text().lower()
    log = MetricsLog(str(tmp_path / "m.jsonl"), enabled=True)
    log.append({"loss": float("nan"), "bits": [1.0, float("inf")]})
    assert _strict_records(tmp_path / "m.jsonl") == [{"loss": None, "bits": [1.0, None]}]
    # a weights-only student has no activation bits: its mean is NaN in memory, null on disk
    train, val, _ = tiny.loaders()
    weights_only = tiny.student_teacher(act_bits=None, calib_loader=val)
    rep = _trainer(tmp_path / "run", weights_only, max_epochs=1, log_every=1).fit()
    records = _strict_records(tmp_path / "run" / METRICS)
    assert records and all(r["mean_act_bits"] is None for r in records)
    with open(tmp_path / "run" / "report.json", encoding="utf-8") as f:
        assert json.loads(f.read(), parse_constant=_refuse_constant) == rep


def _draws():
    return torch.rand(3), np.random.rand(2), random.random()


def _seed_caller(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _assert_same_draws(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_a_trainer_keeps_to_its_own_random_streams(tmp_path):
    # (building a student draws initial weights from the global generator: done beforehand)
    st_a, st_a2, st_b = (tiny.student_teacher(calib_loader=tiny.loaders()[1]) for _ in range(3))
    _seed_caller(123)
    expected = _draws()
    # constructing (fresh and resuming) and fitting leave the caller's generators as they were
    _seed_caller(123)
    _trainer(tmp_path / "a", st_a, max_epochs=1).fit()
    again = _trainer(tmp_path / "a", st_a2, max_epochs=2)
    assert again.resumed_from == 1
    _assert_same_draws(_draws(), expected)
    # the run's random numbers come from its seed, not from the caller's state
    _seed_caller(999)
    _trainer(tmp_path / "b", st_b, max_epochs=1).fit()
    a = load_checkpoint(str(tmp_path / "a" / LAST))
    b = load_checkpoint(str(tmp_path / "b" / LAST))
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_the_bf16_measurement_leaves_the_global_generator_alone():
    from gdnsq.train.precision import measure_bf16_speedup
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    measure_bf16_speedup(repeats=1)  # what precision="auto" runs where the CPU flags are unknown
    assert torch.equal(torch.rand(2), expected)


def _as_version_1(ckpt):
    """The same checkpoint as gdnsq 0.1 wrote it: a schedule without optimizer or hold, the
    objective's running mean as plain numbers, the optimizer groups tagged with lr_scale."""
    sch = ckpt["schedule"]
    groups = ckpt["optimizer"]["param_groups"]
    base = groups[0]["initial_lr"]
    for g in groups:
        g["lr_scale"] = g.pop("initial_lr") / base
        g.pop("name")
    ckpt["schedule"] = {"n": sch["last_epoch"], "t": sch["t"], "rho": sch["rho"], "converged": sch["annealing"],
                        "lr0": sch["lr0"], "warmup_steps": sch["warmup_steps"], "t_scale": sch["t_scale"],
                        "anneal": sch["anneal"]}
    ckpt["objective"] = {"loss_sum": float(ckpt["objective"]["loss_sum"]), "count": int(ckpt["objective"]["count"])}
    ckpt["version"] = 1
    return ckpt


def test_a_version_1_checkpoint_resumes_like_the_current_one(tmp_path):
    _trainer(tmp_path / "new", max_epochs=3).fit()
    ckpt = load_checkpoint(str(tmp_path / "new" / LAST))
    os.makedirs(tmp_path / "old")
    save_checkpoint(_as_version_1(ckpt), str(tmp_path / "old" / LAST))
    new, old = _trainer(tmp_path / "new", max_epochs=4), _trainer(tmp_path / "old", max_epochs=4)
    for key in ("lr", "t", "rho", "checks", "first_converged", "converged", "annealing", "held"):
        assert getattr(old.schedule, key) == getattr(new.schedule, key), key
    assert [g["lr"] for g in old.optimizer.param_groups] == [g["lr"] for g in new.optimizer.param_groups]
    assert torch.equal(old.objective.mu, new.objective.mu)
    new.fit()
    old.fit()
    assert all(torch.equal(v, old.student.state_dict()[k]) for k, v in new.student.state_dict().items())
