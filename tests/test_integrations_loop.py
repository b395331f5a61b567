"""gdnsq.integrations.loop.GDNSQLoop without any framework: arguments, state round trip,
damaged state files, and that importing gdnsq imports no framework."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import gdnsq
from gdnsq.integrations.loop import GDNSQLoop, output_logits


def _loop(**kwargs):
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    student = gdnsq.quantize_model(fp, 2, 2)
    gdnsq.calibrate(student, [torch.randn(16, 6)])
    optimizer = torch.optim.RAdam(gdnsq.param_groups(student, lr=0.05))
    return GDNSQLoop(student, gdnsq.GDNSQSchedule(optimizer, warmup_steps=2, t_scale=20.0), **kwargs)


def _steps(loop, n):
    for _ in range(n):
        x = torch.randn(16, 6)
        loss, _ = loop.training_loss(loop.student(x), x)
        loop.schedule.optimizer.zero_grad()
        loss.backward()
        loop.schedule.optimizer.step()
        loop.schedule.step()
    return loop.epoch_end()


def test_state_round_trip_restores_mu_t_lr_and_hold(tmp_path):
    loop = _loop()
    _steps(loop, 5)
    loop.save(tmp_path / "state.pt")
    fresh = _loop()
    fresh.load(tmp_path / "state.pt")
    assert float(fresh.objective.mu) == float(loop.objective.mu) > 0
    assert (fresh.schedule.t, fresh.schedule.lr, fresh.schedule.checks) == (loop.schedule.t, loop.schedule.lr, 1)
    assert [g["lr"] for g in fresh.schedule.optimizer.param_groups] == [g["lr"] for g in loop.schedule.optimizer.param_groups]


def test_damaged_or_foreign_state_is_refused(tmp_path):
    loop = _loop()
    loop.save(tmp_path / "state.pt")
    data = bytearray((tmp_path / "state.pt").read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        loop.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="format"):
        loop.load_state_dict({"objective": {}, "schedule": {}})


def test_label_training_without_teacher():
    loop = _loop(teacher=False)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss, parts = loop.training_loss(loop.student(x), x, labels=y)
    torch.testing.assert_close(parts["distill"], nn.functional.cross_entropy(loop.student(x), y).detach())
    with pytest.raises(ValueError, match="task_loss or labels"):
        loop.training_loss(loop.student(x), x)


def test_bad_arguments():
    with pytest.raises(TypeError, match="schedule"):
        GDNSQLoop(nn.Linear(2, 2), object())
    with pytest.raises(TypeError, match="teacher"):
        _loop(teacher="yes")
    with pytest.raises(TypeError, match="logits"):
        output_logits(object())


def test_import_gdnsq_imports_no_framework():
    code = ("import sys, gdnsq, gdnsq.integrations, gdnsq.integrations.loop; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
