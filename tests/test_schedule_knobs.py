"""Issue-9 knobs: the hold at the target bits, bf16 training steps (autocast per step),
channels_last, the cpu-long preset, the CLI schedule flags, --act-bits 32 and --init-from."""
import json
import math
import os

import pytest
import torch

import _trainer_tiny as tiny
from gdnsq import cli
from gdnsq.train.presets import PRESETS, TrainConfig, get_preset, half_life_to_anneal
from gdnsq.train.checkpoint import LAST, METRICS, load_checkpoint
from gdnsq.train.trainer import Trainer


# the torch backend on one thread: the training tests run fast and alike on any machine
pytestmark = pytest.mark.usefixtures("fast_cpu")


def _epochs(out_dir):
    with open(os.path.join(out_dir, METRICS)) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "epoch"]


def test_half_life_to_anneal():
    a = half_life_to_anneal(6, 352)
    assert a ** (6 * 352) == pytest.approx(0.5, rel=1e-12)
    assert half_life_to_anneal(1, 1) == 0.5
    with pytest.raises(ValueError, match="half_life_epochs"):
        half_life_to_anneal(0, 352)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        half_life_to_anneal(2, 0)


def test_cpu_long_preset_and_new_fields_validate():
    cfg = get_preset("cpu-long")
    assert cfg.hold_epochs > 0 and cfg.quantizer_lr_scale * cfg.lr == pytest.approx(2e-3)
    assert cfg.anneal ** (6 * 352) == pytest.approx(0.5, rel=1e-3)
    for field, bad, err in [("precision", "fp16", ValueError), ("hold_epochs", -1, ValueError),
                            ("channels_last", 1, TypeError)]:
        with pytest.raises(err, match=f"TrainConfig.{field}"):
            TrainConfig(**{field: bad})
    assert set(PRESETS) >= {"paper", "cpu-fast", "cpu-long"}


def _run(tmp_path, name, **overrides):
    train, val, test = tiny.loaders()
    student, teacher = tiny.student_teacher(2, 2, calib_loader=val)
    cfg = tiny.fast_config(**overrides)
    trainer = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path / name))
    trainer.fit()
    return trainer, _epochs(str(tmp_path / name))


def test_hold_epochs_delays_annealing_and_patience(tmp_path):
    base, base_recs = _run(tmp_path, "base", max_epochs=8, patience=100)
    held, held_recs = _run(tmp_path, "held", max_epochs=8, patience=100, hold_epochs=2)
    first = base.first_converged_epoch
    assert first is not None and first <= 5, "the tiny run should converge early"
    assert held.first_converged_epoch == first  # the hold does not change the descent
    lr0 = base.cfg.lr
    # without the hold the LR falls from the epoch after the first convergence on ...
    assert base_recs[first]["lr"] < lr0
    # ... with it, the LR stays at lr0 for hold_epochs more epochs, then falls
    for r in held_recs[:first + 2]:
        assert r["lr"] == pytest.approx(lr0)
    assert held_recs[first + 2]["lr"] < lr0
    assert all(r["bad_validations"] == 0 for r in held_recs[:first + 1])


def test_bf16_channels_last_run_and_reloaded_checkpoint_agree(tmp_path):
    """The autocast trap: in-run validation must equal a fresh evaluation of the saved student."""
    trainer, recs = _run(tmp_path, "bf16", max_epochs=3, precision="bf16", channels_last=True)
    assert all(math.isfinite(r["train_loss"]) for r in recs)
    last = load_checkpoint(os.path.join(trainer.out_dir, LAST), kind="last")
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(2, 2, calib_loader=val)
    student.load_state_dict(last["student"])
    fresh = Trainer(student, teacher, train, val, config=tiny.fast_config(),
                    out_dir=str(tmp_path / "fresh"))
    assert recs[-1]["val_top1"] is not None
    assert fresh.evaluate(val)["top1"] == pytest.approx(recs[-1]["val_top1"])
    # channels_last reached the models' conv weights
    conv = next(m for m in trainer.student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_bf16_step_is_close_to_fp32(tmp_path):
    """bf16 optimizer steps move the parameters like fp32 steps from the same start.

    Two batches make two steps (the schedule's LR is 0 at the first). The two updates differ
    by about 4 % relative (bf16 forwards, quantizer codes flipping): a bf16 update that is
    wrong by a factor (a loss scale, a skipped step) differs by 50-100 %. The weights
    themselves move by only ~0.1 % of their norm, so comparing weights rather than updates
    would pass any such bug.
    """
    updates = {}
    for precision in ("fp32", "bf16"):
        train, val, _ = tiny.loaders(n_train=64)  # 2 batches of 32
        student, teacher = tiny.student_teacher(2, 2, calib_loader=val)
        before = torch.cat([p.detach().flatten() for p in student.parameters()])
        trainer = Trainer(student, teacher, train, val, config=tiny.fast_config(max_epochs=1, precision=precision),
                          out_dir=str(tmp_path / precision))
        trainer.fit()
        after = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        updates[precision] = after - before
    assert updates["fp32"].norm() > 0
    rel = float((updates["bf16"] - updates["fp32"]).norm() / updates["fp32"].norm())
    assert 0 < rel < 0.2  # 0: the bf16 run did not compute in bf16


# ------------------------------------------------------------------------------- CLI

def test_cli_act_bits_32_and_none_mean_float_activations():
    parser = cli.build_parser()
    for text in ("32", "none", "NONE"):
        args = parser.parse_args(["quantize", "--weight-bits", "1", "--act-bits", text, "--out", "x"])
        assert args.act_bits is None
    args = parser.parse_args(["quantize", "--weight-bits", "1", "--act-bits", "2", "--out", "x"])
    assert args.act_bits == 2


@pytest.mark.parametrize("extra,needle", [
    (["--anneal", "1.5"], "per-batch factor in (0, 1]"),
    (["--hold-epochs", "-1"], "non-negative integer"),
    (["--precision", "fp16"], "invalid choice"),
    (["--t-scale", "nan"], "non-negative number"),
])
def test_cli_schedule_flag_errors_exit_2(capsys, extra, needle):
    code = cli.main(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x"] + extra)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_cli_anneal_and_half_life_together_and_missing_init_from(capsys, tmp_path):
    from gdnsq.models import get_model, save_fp_checkpoint
    fp = tmp_path / "fp.pt"
    save_fp_checkpoint(fp, get_model("resnet20"), model_name="resnet20", num_classes=10,
                       normalization="imagenet")
    base = ["quantize", "--checkpoint", str(fp), "--weight-bits", "2", "--act-bits", "2",
            "--out", str(tmp_path / "q"), "--device", "cpu"]
    code = cli.main(base + ["--anneal", "0.99", "--anneal-half-life", "3"])
    assert code == 2 and "--anneal-half-life" in capsys.readouterr().err
    code = cli.main(base + ["--init-from", str(tmp_path / "nowhere")])
    assert code == 2 and "--init-from" in capsys.readouterr().err


def test_cli_chained_stage_and_weights_only_run(capsys, tmp_path):
    """4 -> 2 bits with --init-from (fresh schedule, not converged at once, knobs recorded), then
    a W2A32 run whose activations stay float."""
    from gdnsq.models import get_model, save_fp_checkpoint
    import numpy as np
    from test_cli import FIXTURE, write_python_folder
    rng = np.random.default_rng(0)
    z = np.load(FIXTURE)
    data = write_python_folder(tmp_path / "data", rng.integers(0, 256, (40, 32, 32, 3), np.uint8),
                               rng.integers(0, 10, 40), z["images"], z["labels"])
    fp = tmp_path / "fp.pt"
    save_fp_checkpoint(fp, get_model("resnet20"), model_name="resnet20", num_classes=10,
                       normalization="imagenet")
    common = ["--checkpoint", str(fp), "--data-dir", str(data), "--val-size", "8",
              "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--json"]
    stage1 = tmp_path / "w4a4"
    code = cli.main(["quantize", "--weight-bits", "4", "--act-bits", "4", "--out", str(stage1)] + common)
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    stage2 = tmp_path / "w2a2"
    code = cli.main(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", str(stage2),
                     "--init-from", str(stage1), "--hold-epochs", "3", "--t-scale", "7",
                     "--anneal-half-life", "2", "--precision", "bf16"] + common)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "initialised from the student" in err
    run = json.loads((stage2 / "run.json").read_text())
    assert run["init_from"].startswith(str(stage1))
    assert run["config"]["hold_epochs"] == 3 and run["config"]["t_scale"] == 7.0
    assert run["config"]["precision"] == "bf16"
    # half-life 2 epochs of 2 batches each (32 training images / 16)
    assert run["config"]["anneal"] ** (2 * 2) == pytest.approx(0.5)
    # the stage-2 student started from stage 1's trained weights, with its own targets
    s1 = load_checkpoint(str(stage1 / "checkpoint_last.pt"))["student"]
    rec = [json.loads(line) for line in open(stage2 / METRICS)]
    assert rec[-1]["kind"] == "epoch" and rec[-1]["converged"] is False
    s2 = load_checkpoint(str(stage2 / "checkpoint_last.pt"))["student"]
    key = next(k for k in s2 if k.endswith("weight_quantizer.target_bits"))
    assert float(s2[key]) == 2.0 and float(s1[key]) == 4.0
    capsys.readouterr()
    # weights only: the activation quantizers are absent
    # (a chained stage from the W2A2 student: its activation quantizers are dropped)
    wonly = tmp_path / "w2a32"
    code = cli.main(["quantize", "--weight-bits", "2", "--act-bits", "32", "--out", str(wonly),
                     "--init-from", str(stage2)] + common)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((wonly / "run.json").read_text())["act_bits"] is None
    sd = load_checkpoint(str(wonly / "checkpoint_last.pt"))["student"]
    assert not any("act_quantizer" in k for k in sd)
    assert "initialised from the student" in err
    code = cli.main(["evaluate", "--checkpoint", str(wonly), "--data-dir", str(data), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["act_bits"] is None
