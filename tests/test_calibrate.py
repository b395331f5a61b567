"""calibrate: 10-bit min/max start, signedness decision, pruning, weights."""
import math

import pytest
import torch
from torch import nn

from gdnsq import calibrate, quantize_model, teacher_of
from gdnsq.stats import quantized_layers

from _method_models import TinyResNet, tiny_vgg


def _loader(n=3, bs=4, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn((bs,) + shape, generator=g), torch.zeros(bs, dtype=torch.long)) for _ in range(n)]


def test_calibrate_resnet_activations_and_weights():
    student = quantize_model(TinyResNet(), 2, 2)
    student.train()
    loader = _loader()
    # expected min/max of each quantized layer's input, from the FP teacher
    teacher = teacher_of(student)
    seen = {}
    hooks = [teacher.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: seen.setdefault(n, []).append((float(i[0].min()), float(i[0].max()))))
        for n, _ in quantized_layers(student)]
    with torch.no_grad():
        for x, _ in loader:
            teacher(x)
    for h in hooks:
        h.remove()
    report = calibrate(student, loader)
    assert student.training  # mode restored
    for name, layer in quantized_layers(student):
        lo = min(a for a, _ in seen[name])
        hi = max(b for _, b in seen[name])
        assert report[name]["min"] == pytest.approx(lo) and report[name]["max"] == pytest.approx(hi)
        aq = layer.act_quantizer
        assert lo >= 0 and aq.signed is False and not aq.offset.requires_grad  # all follow a ReLU
        assert float(aq.offset.detach()) == 0.0
        assert float(aq.log2_step.detach()) == pytest.approx(math.log2(hi / 1023), abs=1e-6)
        assert float((aq.log2_range - aq.log2_step).detach()) == pytest.approx(10.0, abs=1e-5)
        # the clamp top equals the observed max
        top = float((aq.offset + torch.exp2(aq.log2_range) - torch.exp2(aq.log2_step)).detach())
        assert top == pytest.approx(hi, rel=1e-5)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        expect = torch.log2((w.amax(1) - w.amin(1)) / 1023).clamp_min(-12)
        torch.testing.assert_close(layer.weight_quantizer.log2_step.detach(), expect)
    # after calibration an eval pass realises at most 10 bits everywhere
    student.eval()
    with torch.no_grad():
        student(loader[0][0])
    for _, layer in quantized_layers(student):
        assert float(layer.act_quantizer.observed_bits) <= 10.0
        assert layer.realised_weight_bits() <= 10.0


def test_signed_auto_negative_input_and_forced_switches():
    # VGG: layer "10" (a Linear) follows nothing non-negative once its input is shifted
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    loader = _loader(n=2)
    s = quantize_model(model, 2, 2)
    rep = calibrate(s, loader)
    assert rep["1"]["signed"] is True and s[1].act_quantizer.offset.requires_grad
    assert float(s[1].act_quantizer.offset.detach()) == pytest.approx(rep["1"]["min"])
    assert rep["3"]["signed"] is False and not s[3].act_quantizer.offset.requires_grad
    s_false = quantize_model(model, 2, 2, signed=False)
    calibrate(s_false, loader)
    aq = s_false[1].act_quantizer
    assert float(aq.offset.detach()) == 0.0 and not aq.offset.requires_grad
    assert float(aq.log2_step.detach()) == pytest.approx(math.log2(rep["1"]["max"] / 1023), abs=1e-6)
    s_true = quantize_model(model, 2, 2, signed=True)
    calibrate(s_true, loader)
    assert s_true[3].act_quantizer.offset.requires_grad
    assert float(s_true[3].act_quantizer.offset.detach()) == pytest.approx(rep["3"]["min"])


def test_zero_range_is_pruned_and_excluded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # the second conv's input is constant -1
    s = quantize_model(model, 2, 2)
    rep = calibrate(s, _loader(n=1))
    aq = s[1].act_quantizer
    assert rep["1"]["pruned"] and bool(aq.pruned)
    assert float(aq.log2_step.detach()) == 0.0 and float(aq.log2_range.detach()) == 0.0 and float(aq.offset.detach()) == -1.0
    assert not (aq.log2_step.requires_grad or aq.log2_range.requires_grad or aq.offset.requires_grad)
    from gdnsq import BitWidthPenalty
    assert BitWidthPenalty()(s)["count_a"] == 0


def test_calibrate_num_batches_and_errors():
    s = quantize_model(tiny_vgg(), 2, 2)
    calls = []

    class Loader:
        def __iter__(self):
            for x, y in _loader(n=5):
                calls.append(1)
                yield x, y

    calibrate(s, Loader(), num_batches=2)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="bits"):
        calibrate(s, _loader(), bits=0)
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(s, _loader(), num_batches=0)
    with pytest.raises(ValueError, match="quantize_model"):
        calibrate(tiny_vgg(), _loader())
    with pytest.raises(ValueError, match="no batches"):
        calibrate(s, [])
    with pytest.raises(TypeError, match="loader"):
        calibrate(s, ["text"])
