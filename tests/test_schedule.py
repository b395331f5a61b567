"""GDNSQSchedule (an LRScheduler): LR warm-up / constant / hold / anneal per parameter group, the
penalty weight t, the state round trip; gdnsq.param_groups."""
import io
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from gdnsq import GDNSQSchedule, param_groups, quantize_model

from _method_models import TinyResNet


def _opt(lr, n_groups=1):
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr * (g + 1)} for g in range(n_groups)]
    return torch.optim.SGD(groups, lr=lr)


def _step(opt, sch):
    opt.step()
    sch.step()


def test_lr_and_t_sequence():
    lr0, warm = 0.002, 4
    opt = _opt(lr0)
    sch = GDNSQSchedule(opt, warm, t_scale=2.0, anneal=0.5)
    assert isinstance(sch, LRScheduler)
    lrs, ts = [], []
    converge_at = 7  # set_converged(True) before the step with n == 7
    for n in range(10):
        if n == converge_at:
            sch.set_converged(True)
        assert opt.param_groups[0]["lr"] == sch.lr  # the group holds the LR of the batch about to run
        lrs.append(sch.lr)
        ts.append(sch.t)
        _step(opt, sch)
    # n=0: LR 0 (the first step does nothing); linear warm-up to lr0 at n = warm
    assert lrs[:5] == pytest.approx([0.0, lr0 / 4, lr0 / 2, 3 * lr0 / 4, lr0])
    # constant until converged; the step() at n >= converge_at anneals the next LR
    assert lrs[5:8] == pytest.approx([lr0, lr0, lr0])
    assert lrs[8:] == pytest.approx([lr0 * 0.5, lr0 * 0.25])
    # t = 0 through warm-up, then + t_scale*lr0 per batch: t(n) = 2*lr0*(n - warm)
    assert ts == pytest.approx([0.0] * 5 + [2 * lr0 * k for k in range(1, 6)])
    # losing convergence freezes the LR (no re-warm), t keeps growing
    sch.set_converged(False)
    lr_before, t_before = sch.lr, sch.t
    _step(opt, sch)
    assert sch.lr == lr_before and sch.t == pytest.approx(t_before + 2 * lr0)


def test_every_group_follows_its_own_base_lr():
    opt = _opt(0.1, n_groups=2)  # groups at 0.1 and 0.2
    sch = GDNSQSchedule(opt, 2, anneal=0.5)
    seen = []
    for n in range(5):
        if n == 3:
            sch.set_converged(True)
        seen += [g["lr"] for g in opt.param_groups]
        _step(opt, sch)
    factors = [0.0, 0.5, 1.0, 1.0, 0.5]
    assert seen == pytest.approx([lr for f in factors for lr in (0.1 * f, 0.2 * f)])
    assert sch.get_last_lr() == pytest.approx([0.1 * 0.25, 0.2 * 0.25])
    assert sch.t == pytest.approx(2.0 * 0.1 * 3)  # t in units of the first group's LR


def test_hold_delays_annealing_by_convergence_checks():
    opt = _opt(1.0)
    sch = GDNSQSchedule(opt, 0, anneal=0.5, hold_epochs=2)
    _step(opt, sch)
    flags = [False, True, False, True, True]  # first pass at check 2; held from check 4 on
    states = []
    for flag in flags:
        sch.set_converged(flag)
        states.append((sch.converged, sch.held, sch.annealing))
        _step(opt, sch)
    assert states == [(False, False, False), (True, False, False), (False, False, False),
                      (True, True, True), (True, True, True)]
    assert sch.first_converged == 2 and sch.checks == 5
    assert sch.lr == pytest.approx(0.25)  # annealed on the two steps after checks 4 and 5


def test_param_groups_split_quantizer_parameters():
    student = quantize_model(TinyResNet(), 2, 2)
    groups = param_groups(student, 0.01, quantizer_lr_scale=4.0)
    assert [g["name"] for g in groups] == ["model", "quantizer"]
    assert [g["lr"] for g in groups] == [0.01, 0.04]
    quantizer = {id(p) for n, p in student.named_parameters() if "quantizer" in n and p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == quantizer
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in student.parameters() if p.requires_grad}
    opt = torch.optim.RAdam(groups, weight_decay=0.0)
    sch = GDNSQSchedule(opt, 1)
    _step(opt, sch)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.04] and sch.lr0 == 0.01
    with pytest.raises(ValueError, match="quantizer_lr_scale"):
        param_groups(student, 0.01, 0.0)
    with pytest.raises(TypeError, match="student"):
        param_groups([torch.zeros(1)], 0.01)


def test_state_dict_resume_is_exact_and_loads_weights_only():
    opt_a = _opt(3e-4, 2)
    a = GDNSQSchedule(opt_a, 3, anneal=0.9, hold_epochs=1)
    for n in range(6):
        if n >= 3:
            a.set_converged(True)
        _step(opt_a, a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["t"] == a.t and state["first_converged"] == 1
    opt_b = _opt(1.0, 2)
    b = GDNSQSchedule(opt_b, 100)
    b.load_state_dict(state)
    # loading writes the current LRs into the groups
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_a.param_groups]
    for _ in range(4):
        assert (b.lr, b.t, b.held, b.annealing) == (a.lr, a.t, a.held, a.annealing)
        _step(opt_a, a)
        _step(opt_b, b)
    assert b.state_dict() == a.state_dict()


def test_legacy_state_of_the_optimizer_less_schedule_loads():
    opt = _opt(0.5)
    sch = GDNSQSchedule(opt, 100)
    sch.load_state_dict({"n": 12, "t": 0.0, "rho": 0.25, "converged": True, "lr0": 0.5, "warmup_steps": 10,
                         "t_scale": 2.0, "anneal": 0.9})
    assert (sch.n, sch.warmup_steps, sch.annealing) == (12, 10, True)
    assert sch.lr == opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert sch.t == pytest.approx(2.0 * 0.5 * 2)
    with pytest.raises(ValueError, match="missing"):
        sch.load_state_dict({"n": 1})


def test_usual_call_order_gives_no_warning():
    opt = _opt(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = GDNSQSchedule(opt, 1)
        for _ in range(3):
            _step(opt, sch)


def test_errors():
    opt = _opt(0.1)
    with pytest.raises(TypeError, match="optimizer"):
        GDNSQSchedule(0.1, 10)
    with pytest.raises(ValueError, match="lr0"):
        GDNSQSchedule(opt, 10, lr0=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        GDNSQSchedule(opt, -1)
    with pytest.raises(ValueError, match="anneal"):
        GDNSQSchedule(opt, 1, anneal=1.5)
    with pytest.raises(ValueError, match="t_scale"):
        GDNSQSchedule(opt, 1, t_scale=-1)
    with pytest.raises(ValueError, match="hold_epochs"):
        GDNSQSchedule(opt, 1, hold_epochs=-1)
    with pytest.raises(TypeError, match="epoch"):
        GDNSQSchedule(opt, 1).step(3)
