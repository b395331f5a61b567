"""``precision="auto"``: bf16 only where the hardware runs it natively (gdnsq.train.precision)."""
import warnings

import pytest
import torch

import _trainer_tiny as tiny
from gdnsq.train.precision import measure_bf16_speedup, resolve_precision
from gdnsq.train.presets import TrainConfig
from gdnsq.train.trainer import Trainer

CPU = torch.device("cpu")


def _never_measure():
    raise AssertionError("no measurement may run when the CPU flags decide")


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512_bf16"}, "bf16"),          # Zen 4, Cooper Lake
    ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
    ({"avx512f", "avx512_vnni"}, "fp32"),           # Cascade Lake / Ice Lake: emulated bf16
    ({"avx2", "fma"}, "fp32"),
])
def test_auto_follows_the_cpu_flags(flags, expected):
    used, reason = resolve_precision("auto", CPU, cpu_flags=flags, measure=_never_measure)
    assert used == expected and reason.startswith("auto")
    assert ("natively" in reason) == (expected == "bf16")


def test_auto_measures_when_the_flags_are_unknown():
    assert resolve_precision("auto", CPU, cpu_flags=set(), measure=lambda: 1.5)[0] == "bf16"
    used, reason = resolve_precision("auto", CPU, cpu_flags=set(), measure=lambda: 0.5)
    assert used == "fp32" and "0.50x" in reason


def test_explicit_precision_is_kept_and_bad_values_refused():
    assert resolve_precision("bf16", CPU, cpu_flags={"avx2"}, measure=_never_measure) == ("bf16", "requested")
    assert resolve_precision("fp32", CPU, cpu_flags={"avx512_bf16"}, measure=_never_measure)[0] == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="TrainConfig.precision"):
        TrainConfig(precision="half")


def test_auto_is_the_default():
    assert TrainConfig().precision == "auto"


def test_measurement_uses_the_injected_clock():
    ticks = iter(range(1000))
    # every timed call takes one tick in both precisions: a speed-up of exactly 1
    assert measure_bf16_speedup(repeats=2, clock=lambda: float(next(ticks))) == pytest.approx(1.0)


def test_report_records_the_precision_and_a_resume_keeps_the_started_one(tmp_path, monkeypatch):
    import gdnsq.train.trainer as trainer_mod
    train, val, _ = tiny.loaders()
    monkeypatch.setattr(trainer_mod, "resolve_precision",
                        lambda requested, device: ("fp32", "auto: test machine without bf16"))
    student, teacher = tiny.student_teacher(calib_loader=val)
    cfg = tiny.fast_config(precision="auto", max_epochs=1)
    rep = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path)).fit()
    assert rep["precision"] == {"requested": "auto", "used": "fp32", "reason": "auto: test machine without bf16"}
    # the same run resumed where "auto" would pick bf16 continues in fp32, and says so
    monkeypatch.setattr(trainer_mod, "resolve_precision",
                        lambda requested, device: ("bf16", "auto: native"))
    student, teacher = tiny.student_teacher(calib_loader=val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Trainer(student, teacher, train, val, config=tiny.fast_config(precision="auto", max_epochs=2),
                    out_dir=str(tmp_path))
    assert t.precision == "fp32"
    assert any("continues in fp32" in str(w.message) for w in caught)
