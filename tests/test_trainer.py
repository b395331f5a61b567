"""gdnsq.Trainer: end-to-end W2A2 run, schedule wiring, convergence/selection/early stopping,
files written, errors. Tiny model and synthetic data (tests/_trainer_tiny.py).

The quantizer ops run on the eager ``torch`` backend here: the kernels have their own tests,
and this keeps the trainer tests free of compile steps. One intra-op thread: on the shared
2-core machine that is several times faster for these tiny tensors.
"""
import json
import math
import os

import pytest
import torch
from PIL import Image

import _trainer_tiny as tiny
from gdnsq.train.report import report_markdown
from gdnsq.train.checkpoint import BEST, LAST, METRICS, load_checkpoint
from gdnsq.train.trainer import Trainer


# the torch backend on one thread: the training tests run fast and alike on any machine
pytestmark = pytest.mark.usefixtures("fast_cpu")


def _records(out_dir):
    with open(os.path.join(out_dir, METRICS)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def w2a2_run(tmp_path_factory):
    """One end-to-end run shared by the tests that inspect its outputs."""
    previous = os.environ.get("GDNSQ_BACKEND")
    os.environ["GDNSQ_BACKEND"] = "torch"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = str(tmp_path_factory.mktemp("w2a2"))
        train, val, test = tiny.loaders()
        student, teacher = tiny.student_teacher(2, 2, calib_loader=val)
        trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(max_epochs=10, log_every=1),
                          out_dir=out, command="pytest w2a2")
        fit_report = trainer.fit()
        report = trainer.test(test)
        x, y = tiny.make_data(128, 3)
        return {"out": out, "fit": fit_report, "report": report, "trainer": trainer,
                "fp_top1": tiny.fp_accuracy(tiny.fp_model(), x, y)}
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop("GDNSQ_BACKEND", None)
        else:
            os.environ["GDNSQ_BACKEND"] = previous


def test_end_to_end_reaches_w2a2_above_chance(w2a2_run):
    rep = w2a2_run["report"]
    assert rep["converged"] is True
    assert rep["target_weight_bits"] == 2.0 and rep["target_act_bits"] == 2.0
    # Realised bits of the selected checkpoint: weights from codes, activations over the test pass.
    assert set(rep["realised_weight_bits"]) == {"conv2", "conv3"}
    assert set(rep["realised_act_bits"]) == {"conv2", "conv3"}
    assert rep["realised_weight_bits_max"] <= 2.0 + 1e-6
    assert rep["realised_act_bits_max"] <= 2.0 + 1e-6
    assert rep["realised_weight_bits_max"] == max(rep["realised_weight_bits"].values())
    assert rep["test_top1"] > 80.0, rep  # chance is 25 %
    assert w2a2_run["fp_top1"] > 90.0
    assert rep["test_n"] == 128
    assert rep["epochs_run"] <= 10 and rep["wall_seconds"] > 0
    assert rep["command"] == "pytest w2a2"
    assert rep["config"]["lr"] == 0.2
    # The fit() report describes the same selection, before the test pass.
    fit = w2a2_run["fit"]
    assert fit["test_top1"] is None
    assert fit["selected_epoch"] == rep["selected_epoch"] and fit["val_top1"] == rep["val_top1"]


def test_files_written(w2a2_run):
    out = w2a2_run["out"]
    for name in (LAST, BEST, METRICS, "report.json", "report.md", "bits.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert on_disk["test_top1"] == w2a2_run["report"]["test_top1"]
    md = open(os.path.join(out, "report.md")).read()
    assert "| test top-1 (%) |" in md and f"{on_disk['test_top1']:.2f}" in md
    assert "| conv2 |" in md and "| conv3 |" in md
    assert md == report_markdown(on_disk)
    with Image.open(os.path.join(out, "bits.png")) as img:
        assert img.size == (1400, 900)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    last = load_checkpoint(os.path.join(out, LAST), kind="last")
    hist = last["trainer"]["history"]  # what bits.png draws: epoch 0 = calibrated start
    assert [h["epoch"] for h in hist] == list(range(0, on_disk["epochs_run"] + 1))
    assert hist[0]["layers"]["conv2"]["act"] == pytest.approx(4.0, abs=1e-4)
    assert hist[-1]["layers"]["conv2"]["weight"] < 2.0
    best = load_checkpoint(os.path.join(out, BEST), kind="best")
    assert last["epoch"] == on_disk["epochs_run"]
    assert best["epoch"] == on_disk["selected_epoch"]
    # The selected weights are what the trainer holds after test().
    state = w2a2_run["trainer"].student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in best["student"].items())


def test_metrics_records(w2a2_run):
    recs = _records(w2a2_run["out"])
    steps = [r for r in recs if r["kind"] == "step"]
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, w2a2_run["report"]["epochs_run"] + 1))
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # log_every=1
    for key in ("loss", "distill", "penalty_w", "penalty_a", "t", "lr", "mean_weight_bits", "mean_act_bits",
                "realised_weight_bits_max"):
        assert all(isinstance(r[key], float) for r in steps), key
    for key in ("train_loss", "val_top1", "converged", "realised_weight_bits_max", "realised_act_bits_max",
                "mean_weight_bits", "mean_act_bits", "per_layer_bits", "lr", "t"):
        assert all(key in r for r in epochs), key
    # Bits go down from the 4-bit calibration to the 2-bit targets.
    assert epochs[0]["mean_weight_bits"] > epochs[-1]["mean_weight_bits"]
    assert steps[0]["mean_act_bits"] == pytest.approx(4.0, abs=0.05)
    assert set(epochs[0]["per_layer_bits"]) == {"conv2", "conv3"}
    assert steps[-1]["realised_weight_bits_max"] <= 2.0 + 1e-6 < steps[0]["realised_weight_bits_max"]


def test_schedule_wiring_matches_method(w2a2_run):
    """LR and t per batch recomputed from METHOD Part B §3.3/§4.4 and the epoch-end
    convergence flags in metrics.jsonl: 0 on the first batch, linear warm-up, constant until
    the first converged epoch end, then x anneal per batch; t grows t_scale*lr0 per batch."""
    cfg = w2a2_run["trainer"].cfg
    n, rho, t, conv = 0, 1.0, 0.0, False
    for rec in _records(w2a2_run["out"]):
        if rec["kind"] == "epoch":
            conv = rec["converged"]
            continue
        if n == 0:
            lr = 0.0
        elif n <= cfg.warmup_steps:
            lr = cfg.lr * n / cfg.warmup_steps
        else:
            lr = cfg.lr * rho
        assert rec["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-15), rec["step"]
        assert rec["t"] == pytest.approx(t, rel=1e-12, abs=1e-15), rec["step"]
        n += 1
        if n > cfg.warmup_steps:
            t += cfg.t_scale * cfg.lr
            if conv:
                rho *= cfg.anneal
    assert rho < 1.0  # annealing did happen


def test_selection_and_early_stopping(w2a2_run):
    """Selected epoch = best val top-1 among converged epochs; early stopping counted only
    after the first convergence, patience in validations."""
    cfg = w2a2_run["trainer"].cfg
    epochs = [r for r in _records(w2a2_run["out"]) if r["kind"] == "epoch"]
    conv = [r for r in epochs if r["converged"] and r["val_top1"] is not None]
    assert conv, "the run never converged"
    best = max(r["val_top1"] for r in conv)
    first_best = next(r["epoch"] for r in conv if r["val_top1"] == best)
    rep = w2a2_run["report"]
    assert rep["val_top1"] == best and rep["selected_epoch"] == first_best
    assert [r["epoch"] for r in epochs if r["selected"]][-1] == first_best
    # Recompute the stopping epoch.
    started, es_best, bad, stop = False, None, 0, None
    for r in epochs:
        started = started or r["converged"]
        if started and r["val_top1"] is not None:
            score = r["val_top1"] if r["converged"] else 0.0
            if es_best is None or score > es_best + cfg.min_delta:
                es_best, bad = score, 0
            else:
                bad += 1
        if bad >= cfg.patience:
            stop = r["epoch"]
            break
    if stop is not None:
        assert rep["stop_reason"] == "early_stopping" and rep["epochs_run"] == stop
    else:
        assert rep["stop_reason"] == "max_epochs" and rep["epochs_run"] == cfg.max_epochs
    assert rep["first_converged_epoch"] == next(r["epoch"] for r in epochs if r["converged"])


def test_probe_between_validations_and_no_convergence(tmp_path):
    """val_every=2: odd epochs have no val accuracy but still a convergence decision (probe
    batch). An unreachable target (1 bit at a tiny LR) never converges: no best checkpoint,
    no early stopping although patience is 1, the report says not converged."""
    train, val, test = tiny.loaders()
    student, teacher = tiny.student_teacher(1, 1, calib_loader=val)
    cfg = tiny.fast_config(lr=1e-4, val_every=2, patience=1, max_epochs=3, log_every=100)
    trainer = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path))
    rep = trainer.fit()
    epochs = [r for r in _records(str(tmp_path)) if r["kind"] == "epoch"]
    assert [r["val_top1"] is None for r in epochs] == [True, False, False]  # epoch 3 = max_epochs
    assert all(r["converged"] is False for r in epochs)
    assert all(math.isfinite(r["realised_act_bits_max"]) for r in epochs)  # observed by the probe
    assert rep["stop_reason"] == "max_epochs" and rep["epochs_run"] == 3
    assert rep["converged"] is False and rep["selected_checkpoint"] == LAST and rep["selected_epoch"] == 3
    assert not os.path.exists(tmp_path / BEST)
    rep = trainer.test(test)
    assert rep["test_top1"] is not None and rep["converged"] is False


def test_max_minutes_pauses_a_segment_after_validating_and_the_same_call_continues(tmp_path):
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(calib_loader=val)
    # val_every=3: epoch 1 is validated only because the segment pauses on it
    cfg = tiny.fast_config(max_minutes=1e-6, max_epochs=3, val_every=3)
    rep = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path)).fit()
    assert rep["stop_reason"] == "max_minutes" and rep["epochs_run"] == 1
    assert load_checkpoint(str(tmp_path / LAST))["trainer"]["stop_reason"] == "max_minutes"
    epochs = [json.loads(l) for l in open(tmp_path / METRICS) if '"kind": "epoch"' in l]
    assert [r["epoch"] for r in epochs] == [1] and epochs[0]["val_top1"] is not None
    # max_minutes is a per-segment budget: the same config continues, one epoch per segment
    student, teacher = tiny.student_teacher(calib_loader=val)
    rep = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path)).fit()
    assert rep["epochs_run"] == 2 and rep["stop_reason"] == "max_minutes"
    student, teacher = tiny.student_teacher(calib_loader=val)
    rep = Trainer(student, teacher, train, val, config=tiny.fast_config(max_epochs=3, val_every=3),
                  out_dir=str(tmp_path)).fit()
    assert rep["epochs_run"] == 3 and rep["stop_reason"] == "max_epochs"
    student, teacher = tiny.student_teacher(calib_loader=val)
    rep = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path)).fit()
    assert rep["epochs_run"] == 3  # finished: nothing to do


def test_bad_arguments(tmp_path):
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(calib_loader=val)
    with pytest.raises(TypeError, match="config"):
        Trainer(student, teacher, train, val, config={"lr": 1}, out_dir=str(tmp_path))
    with pytest.raises(TypeError, match="teacher"):
        Trainer(student, None, train, val, config=tiny.fast_config(), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no quantized layers"):
        Trainer(tiny.fp_model(), teacher, train, val, config=tiny.fast_config(), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="device"):
        Trainer(student, teacher, train, val, config=tiny.fast_config(device="nonsense"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="fit"):
        Trainer(student, teacher, train, val, config=tiny.fast_config(), out_dir=str(tmp_path / "empty")).test(val)
    # control: the same arguments with a valid config build a Trainer, and its schedule and
    # optimizer use that config (so each error above comes from its one bad argument)
    trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(lr=0.123, warmup_steps=7),
                      out_dir=str(tmp_path / "ok"))
    assert trainer.schedule.lr0 == 0.123 and trainer.schedule.warmup_steps == 7
    assert trainer.optimizer.defaults["lr"] == 0.123


def test_non_finite_loss_is_reported(tmp_path):
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(calib_loader=val)
    with torch.no_grad():
        student.conv2.weight[0, 0, 0, 0] = float("nan")
    trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(), out_dir=str(tmp_path))
    with pytest.raises(FloatingPointError, match="epoch 1"):
        trainer.fit()


def test_estimator_from_config_is_applied(tmp_path):
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(calib_loader=val)
    assert {student.conv2.weight_quantizer.estimator, student.conv3.weight_quantizer.estimator} == {"ste"}
    Trainer(student, teacher, train, val, config=tiny.fast_config(), out_dir=str(tmp_path / "a"))
    assert student.conv2.weight_quantizer.estimator == "ste"  # None keeps the conversion's choice
    trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(estimator="aewgs", max_epochs=1),
                      out_dir=str(tmp_path / "b"))
    assert {student.conv2.weight_quantizer.estimator, student.conv3.weight_quantizer.estimator} == {"aewgs"}
    trainer.fit()  # one AEWGS epoch runs
    assert trainer.global_step == len(train)
