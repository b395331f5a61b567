"""The cosine anneal of GDNSQSchedule (shape="cosine") and TrainConfig.anneal_shape: the LR of
each batch against values written out by hand, the freeze on a failed check, the state round
trip, a raised planned length, and the errors."""
import io
import math

import pytest
import torch

from gdnsq import GDNSQSchedule, TrainConfig


def _opt(lr):
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr},
                            {"params": [torch.zeros(1, requires_grad=True)], "lr": 10 * lr}], lr=lr)


def _run(sch, opt, steps, converge_at=None, fail_at=None):
    """LR of group 0 for each batch n = 0 .. steps-1 (checks are made before batch n)."""
    lrs = []
    for n in range(steps):
        if n == converge_at:
            sch.set_converged(True)
        if n == fail_at:
            sch.set_converged(False)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    return lrs


def test_cosine_lr_per_batch():
    lr0 = 0.1
    opt = _opt(lr0)
    # warm-up 2 steps, converged before batch 4, 12 planned steps: annealing starts with the
    # step() after batch 4, so K = 12 - 4 = 8 and batch 4 + k runs at lr0 * (1 + cos(pi k / 8)) / 2.
    sch = GDNSQSchedule(opt, 2, anneal=0.5, shape="cosine", total_steps=12)
    lrs = _run(sch, opt, 12, converge_at=4)
    expected = [0.0, 0.05, 0.1, 0.1, 0.1]
    expected += [lr0 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(1, 8)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    # the last planned batch ran at lr0*(1+cos(7pi/8))/2 and the LR after it is exactly 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.0, abs=1e-15)
    # the quantizer group follows the same factor at its own peak
    # (group 1 at 10x): check one mid-anneal value through a fresh run
    opt2 = _opt(lr0)
    sch2 = GDNSQSchedule(opt2, 2, shape="cosine", total_steps=12)
    _run(sch2, opt2, 8, converge_at=4)
    assert opt2.param_groups[1]["lr"] == pytest.approx(10 * lr0 * (1 + math.cos(math.pi * 4 / 8)) / 2)
    # past the planned end the LR stays at 0 (it does not climb the cosine back up)
    _run(sch, opt, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


def test_failed_check_freezes_the_cosine():
    opt = _opt(1.0)
    sch = GDNSQSchedule(opt, 0, shape="cosine", total_steps=20)
    lrs = _run(sch, opt, 10, converge_at=0, fail_at=5)
    k_expected = [0, 1, 2, 3, 4, 5, 5, 5, 5, 5]  # annealed steps before each batch
    assert lrs[1:] == pytest.approx([(1 + math.cos(math.pi * k / 20)) / 2 for k in k_expected[1:]])
    sch.set_converged(True)  # resumes from k = 5, not from the step count
    opt.step(); sch.step()
    assert opt.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 6 / 20)) / 2)


def test_hold_delays_the_start_and_shortens_the_span():
    opt = _opt(1.0)
    sch = GDNSQSchedule(opt, 0, shape="cosine", total_steps=10, hold_epochs=1)
    lrs = []
    for n in range(10):
        if n in (2, 4):  # first passing check before batch 2, the hold ends at the second
            sch.set_converged(True)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(); sch.step()
    # anneal starts with the step after batch 4: K = 10 - 4 = 6
    assert lrs[1:5] == pytest.approx([1.0] * 4)
    assert lrs[5:] == pytest.approx([(1 + math.cos(math.pi * k / 6)) / 2 for k in range(1, 6)])


def test_state_round_trip_and_raised_length():
    opt = _opt(1.0)
    sch = GDNSQSchedule(opt, 0, shape="cosine", total_steps=10)
    _run(sch, opt, 6, converge_at=2)  # anneal_start 2, k = 4 after 6 batches
    state = sch.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state

    same = _opt(1.0)
    resumed = GDNSQSchedule(same, 0, shape="cosine", total_steps=10)
    resumed.load_state_dict(state)
    assert same.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 8)) / 2)

    longer = _opt(1.0)
    extended = GDNSQSchedule(longer, 0, shape="cosine", total_steps=18)  # a raised epoch limit
    extended.load_state_dict(state)
    assert longer.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 16)) / 2)
    extended.set_total_steps(10)
    assert longer.param_groups[0]["lr"] == pytest.approx((1 + math.cos(math.pi * 4 / 8)) / 2)


def test_exponential_is_unchanged_by_the_new_fields():
    opt = _opt(1.0)
    sch = GDNSQSchedule(opt, 0, anneal=0.5)
    lrs = _run(sch, opt, 5, converge_at=1)
    assert lrs[1:] == pytest.approx([1.0, 0.5, 0.25, 0.125])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="shape"):
        GDNSQSchedule(_opt(1.0), 0, shape="linear")
    with pytest.raises(ValueError, match="total_steps"):
        GDNSQSchedule(_opt(1.0), 0, shape="cosine")
    with pytest.raises(ValueError, match="anneal_shape"):
        TrainConfig(anneal_shape="step")
    assert TrainConfig().anneal_shape == "exponential"


def test_trainer_plans_the_cosine_over_max_epochs(tmp_path):
    import gdnsq
    from _method_models import TinyResNet
    torch.manual_seed(0)
    fp = TinyResNet()
    student = gdnsq.quantize_model(TinyResNet(), weight_bits=2, act_bits=2)
    student.load_state_dict(fp.state_dict(), strict=False)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    cfg = gdnsq.get_preset("cpu-fast", max_epochs=5, anneal_shape="cosine", progress=False, device="cpu")
    trainer = gdnsq.Trainer(student, fp, data, data[:1], config=cfg, out_dir=str(tmp_path))
    assert trainer.schedule.shape == "cosine" and trainer.schedule.total_steps == 15

    class NoLen:
        def __iter__(self):
            return iter(data)
    with pytest.raises(ValueError, match="anneal_shape='cosine' needs a train_loader with a length"):
        gdnsq.Trainer(student, fp, NoLen(), data[:1], config=cfg, out_dir=str(tmp_path / "b"))
