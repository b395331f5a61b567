"""Realised / continuous bits, the convergence test, and a short hand-written GDNSQ loop that
reaches W2A2 on a tiny MLP."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdnsq import (ConvergenceTracker, GDNSQObjective, GDNSQSchedule, calibrate, param_groups, quantize_model, stats,
                   teacher_of)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))


def test_realised_bits_and_is_converged():
    st = quantize_model(_mlp(), 2, 2)
    (name, layer), = stats.quantized_layers(st)
    assert name == "2"
    with pytest.raises(ValueError, match="QConv2d"):
        stats.is_converged(_mlp())
    with torch.no_grad():
        w = layer.weight
        w.copy_(torch.arange(12.0).repeat(12, 1) % 4)  # every row spans 0..3
        layer.weight_quantizer.log2_step.fill_(0.0)  # step 1: 4 levels = 2 bits
        aq = layer.act_quantizer
        aq.set_signed(False)
        aq.log2_step.fill_(-1.0)
        aq.log2_range.fill_(1.0)  # 4 levels of 0.5 on [0, 1.5]
    assert not stats.is_converged(st)  # no eval batch observed yet (+inf)
    st.eval()

    def expected_act_bits(x):
        # independent of the quantizer's buffer: the layer's input through the FP layers before
        # it, codes j = round(clamp(h, 0, 1.5) / 0.5), bits = log2(j_max - j_min + 1)
        with torch.no_grad():
            h = st[1](st[0](x))
        j = torch.round(torch.clamp(h, 0.0, 1.5) / 0.5)
        return math.log2(float(j.max() - j.min()) + 1.0)

    g = torch.Generator().manual_seed(3)
    wide, narrow = torch.randn(64, 6, generator=g) * 10, torch.randn(64, 6, generator=g) * 0.05
    want_wide, want_narrow = expected_act_bits(wide), expected_act_bits(narrow)
    assert want_wide == 2.0 and want_narrow < 2.0  # the two batches tell observations apart
    with torch.no_grad():
        st(narrow)
    assert stats.realised_bits(st) == {"2": {"weight": 2.0, "act": want_narrow}}
    with torch.no_grad():
        st(wide)
    rb = stats.realised_bits(st)
    assert rb == {"2": {"weight": 2.0, "act": want_wide}}
    assert stats.is_converged(st)  # 2 bits observed against 2-bit targets
    cb = stats.continuous_bits(st)["2"]
    assert cb["weight"] == pytest.approx(math.log2(3 / 1 + 1)) and cb["act"] == pytest.approx(2.0)
    assert stats.mean_bits(st) == pytest.approx({"weight": 2.0, "act": 2.0})
    layer.weight_quantizer.target_bits.fill_(1.0)
    assert not stats.is_converged(st)
    layer.weight_quantizer.target_bits.fill_(2.0)
    aq.target_bits.fill_(1.0)
    assert not stats.is_converged(st)
    aq.pruned.fill_(True)  # pruned quantizers are out of the test
    assert stats.is_converged(st)


@pytest.fixture
def one_thread():
    # Tiny ops: on a loaded 2-core machine the intra-op thread pool costs ~1000x the math.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hand_written_gdnsq_loop_reaches_w2a2(one_thread):
    """convert -> calibrate -> objective + schedule + convergence step (the public pieces of
    docs/method.md): bits fall from 10 to the W2A2 target."""
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(150):  # a quick FP model
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    fp_acc = float((model(x).argmax(1) == y).float().mean())
    student = quantize_model(model, 2, 2)
    teacher = teacher_of(student)
    calibrate(student, [x[:128], x[128:]])
    assert stats.mean_bits(student)["act"] == pytest.approx(10.0, abs=1e-4)
    objective = GDNSQObjective(student)
    optimizer = torch.optim.RAdam(param_groups(student, lr=0.05))
    schedule = GDNSQSchedule(optimizer, warmup_steps=10, t_scale=20.0, anneal=0.98)
    convergence = ConvergenceTracker(student, schedule)
    for step in range(400):
        student.train()
        idx = torch.randint(0, 256, (64,))
        with torch.no_grad():
            t_logits = teacher(x[idx])
        loss, parts = objective(student(x[idx]), t_logits, schedule.t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 19:  # "epoch end": the convergence step probes on a batch, then tests
            status = convergence.step(x)
            if status.converged and step > 200:
                break
    student.eval()
    with torch.no_grad():
        acc = float((student(x).argmax(1) == y).float().mean())
    rb = stats.realised_bits(student)
    assert stats.is_converged(student), rb
    assert all(v["weight"] <= 2 and v["act"] <= 2 for v in rb.values())
    assert acc > 0.75 and fp_acc > 0.85, (acc, fp_acc, step)  # 3 classes: chance is ~0.45
