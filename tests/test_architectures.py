"""The architectures people bring, converted with the defaults and taken to deployment.

Each model: ``quantize_model`` with the defaults, the placement checked, ``calibrate``, a few
GDNSQ steps through the public pieces (teacher logits, ``GDNSQObjective``, an optimizer),
``freeze``, and the deployed logits compared with the exact fake-quant model
(``set_exact_inference``). The torch-only definitions of tests/_arch_models.py have
torchvision's layer structure; the same checks run on torchvision's own models where
torchvision imports (its wheels on this package index are CUDA builds that do not import beside
the CPU torch build, so they are skipped here).
"""
import warnings

import pytest
import torch
from torch import nn

import gdnsq
from gdnsq import QConv2d, QLinear, QMultiheadAttention
from gdnsq.deploy import freeze
from gdnsq.stats import quantized_layers

from _arch_models import MobileNetV2, ResNet18, TinyViT


def _check_resnet18(student):
    downsample = [n for n, m in student.named_modules() if n.endswith("downsample.0")]
    assert len(downsample) == 3 and all(type(student.get_submodule(n)) is nn.Conv2d for n in downsample)
    assert type(student.conv1) is nn.Conv2d and type(student.fc) is nn.Linear
    assert sum(isinstance(m, QConv2d) for m in student.modules()) == 16


def _check_mobilenet_v2(student):
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    pointwise = [m for m in convs if m.kernel_size == (1, 1)]
    depthwise = [m for m in convs if m.groups > 1]
    assert len(pointwise) == 34 and all(isinstance(m, QConv2d) for m in pointwise)
    assert len(depthwise) == 17 and all(isinstance(m, QConv2d) for m in depthwise)
    assert type(student.features[0][0]) is nn.Conv2d and type(student.classifier[1]) is nn.Linear


def _check_vit(student):
    attention = [m for m in student.modules() if isinstance(m, QMultiheadAttention)]
    assert attention and all(isinstance(getattr(a, p), QLinear) for a in attention
                             for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in student.modules())
    assert type(student.conv_proj) is nn.Conv2d


def _torchvision(name):
    tv = pytest.importorskip("torchvision", reason="torchvision does not import here")
    models = tv.models
    if name == "resnet18":
        return models.resnet18(num_classes=10)
    if name == "mobilenet_v2":
        return models.mobilenet_v2(num_classes=10, width_mult=0.25)
    vit = models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                   hidden_dim=16, mlp_dim=32, num_classes=10)
    # torchvision initialises the head at zero: constant logits would give no training signal
    nn.init.normal_(vit.heads.head.weight, std=0.1)
    return vit


ARCHITECTURES = {
    "resnet18": (ResNet18, _check_resnet18, (3, 32, 32)),
    "mobilenet_v2": (MobileNetV2, _check_mobilenet_v2, (3, 32, 32)),
    "vit": (TinyViT, _check_vit, (3, 16, 16)),
}


def _convert_train_freeze(fp, check, image_shape, steps=3):
    torch.manual_seed(0)
    student = gdnsq.quantize_model(fp, weight_bits=2, act_bits=2)
    check(student)
    teacher = gdnsq.teacher_of(student)
    data = [torch.randn(4, *image_shape) for _ in range(3)]
    gdnsq.calibrate(student, data)
    objective = gdnsq.GDNSQObjective(student)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    student.train()
    for step in range(steps):
        x = data[step % len(data)]
        with torch.no_grad():
            t_logits = teacher(x)
        loss, _ = objective(student(x), t_logits, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    # every quantizer trained
    for name, layer in quantized_layers(student):
        step = layer.weight_quantizer.log2_step
        assert not torch.equal(step, before[f"{name}.weight_quantizer.log2_step"]), name
    student.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few steps leave the bits above the W2A2 targets
        frozen = freeze(student)
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in frozen.modules())
    gdnsq.set_exact_inference(student)
    with torch.no_grad():
        for x in data[:2]:
            want = student(x)
            torch.testing.assert_close(frozen(x), want, rtol=1e-5, atol=1e-5)
            assert torch.equal(frozen(x).argmax(1), want.argmax(1))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_converts_trains_and_deploys(arch):
    build, check, image_shape = ARCHITECTURES[arch]
    _convert_train_freeze(build(), check, image_shape)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_torchvision_architecture_converts_trains_and_deploys(arch):
    _, check, image_shape = ARCHITECTURES[arch]
    _convert_train_freeze(_torchvision(arch), check, image_shape)
