"""GDNSQSchedule: LR warm-up / constant / anneal and the penalty weight t, state round trip."""
import pytest
import torch

from gdnsq import GDNSQSchedule


def test_lr_and_t_sequence():
    lr0, warm = 0.002, 4
    sch = GDNSQSchedule(lr0, warm, t_scale=2.0, anneal=0.5)
    lrs, ts = [], []
    converge_at = 7  # set_converged(True) before the step with n == 7
    for n in range(10):
        if n == converge_at:
            sch.set_converged(True)
        lrs.append(sch.lr)
        ts.append(sch.t)
        sch.step()
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
    sch.step()
    assert sch.lr == lr_before and sch.t == pytest.approx(t_before + 2 * lr0)


def test_zero_warmup_and_apply():
    sch = GDNSQSchedule(0.1, 0, t_scale=1.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5.0)
    assert sch.apply(opt) == 0.0 and opt.param_groups[0]["lr"] == 0.0
    sch.step()
    assert sch.t == pytest.approx(0.1) and sch.apply(opt) == pytest.approx(0.1)


def test_state_dict_resume_is_exact():
    a = GDNSQSchedule(3e-4, 3, anneal=0.9)
    for n in range(5):
        a.set_converged(n >= 4)
        a.step()
    b = GDNSQSchedule(1.0, 100)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert (b.lr, b.t) == (a.lr, a.t)
        a.step()
        b.step()
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"n": 1})


def test_errors():
    with pytest.raises(ValueError, match="lr0"):
        GDNSQSchedule(0.0, 10)
    with pytest.raises(TypeError, match="lr0"):
        GDNSQSchedule("1", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        GDNSQSchedule(0.1, -1)
    with pytest.raises(ValueError, match="anneal"):
        GDNSQSchedule(0.1, 1, anneal=1.5)
    with pytest.raises(ValueError, match="t_scale"):
        GDNSQSchedule(0.1, 1, t_scale=-1)
