"""quantize_model placement rules, overrides, errors, teacher."""
import pytest
import torch
from torch import nn

from gdnsq import QConv2d, QLinear, quantize_model, teacher_of
from gdnsq.stats import quantized_layers

from _method_models import TinyResNet, tiny_mlp, tiny_vgg

RESNET_Q = ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]


def test_resnet_default_placement():
    model = TinyResNet()
    student = quantize_model(model, 2, 3)
    assert [n for n, _ in quantized_layers(student)] == RESNET_Q
    # first conv, 1x1 shortcut and the classifier stay FP; BN kept
    assert type(student.conv1) is nn.Conv2d
    assert type(student.layer2.shortcut[0]) is nn.Conv2d
    assert type(student.linear) is nn.Linear
    assert isinstance(student.layer1.bn1, nn.BatchNorm2d)
    for _, layer in quantized_layers(student):
        assert float(layer.weight_quantizer.target_bits) == 2.0
        assert float(layer.act_quantizer.target_bits) == 3.0
        assert layer.act_quantizer.signed == "auto"
    # original model untouched; state_dict keys kept
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    keys = student.state_dict().keys()
    assert set(model.state_dict().keys()) <= set(keys)
    assert "layer1.conv1.weight_quantizer.log2_step" in keys
    assert "layer1.conv1.act_quantizer.offset" in keys
    x = torch.randn(2, 3, 8, 8)
    assert student(x).shape == (2, 10)


def test_teacher_is_frozen_copy_outside_state_dict():
    model = TinyResNet()
    student = quantize_model(model, 2, 2)
    teacher = teacher_of(student)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("_gdnsq") for k in student.state_dict())
    assert len(list(student.parameters())) > len(list(model.parameters()))
    sp = {id(p) for p in student.parameters()}
    assert not any(id(p) in sp for p in teacher.parameters())
    torch.testing.assert_close(teacher(torch.ones(1, 3, 8, 8)), model.eval()(torch.ones(1, 3, 8, 8)))
    with pytest.raises(ValueError, match="teacher"):
        teacher_of(model)


def test_vgg_and_mlp():
    vgg = quantize_model(tiny_vgg(), 2, 2)
    names = [n for n, _ in quantized_layers(vgg)]
    assert names == ["2", "6", "10"]  # first conv "0" and last linear "12" FP; linear "10" quantized
    assert isinstance(vgg[10], QLinear) and isinstance(vgg[2], QConv2d)
    out = vgg(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert vgg[10].act_quantizer.log2_step.grad is not None
    mlp = quantize_model(tiny_mlp(), 4, 4)
    assert [n for n, _ in quantized_layers(mlp)] == ["3"]
    assert mlp(torch.randn(3, 12)).shape == (3, 5)


def test_overrides_mixed_targets_and_weights_only():
    student = quantize_model(TinyResNet(), {"layer1.conv1": 4, "*": 2}, {"layer2.conv2": None, "*": 3},
                             exclude=["layer1.conv2"], include=["conv1", "layer2.shortcut.0"],
                             estimator="aewgs", signed=True)
    layers = dict(quantized_layers(student))
    assert sorted(layers) == sorted(["conv1", "layer1.conv1", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"])
    assert float(layers["layer1.conv1"].weight_quantizer.target_bits) == 4.0
    assert float(layers["layer2.conv1"].weight_quantizer.target_bits) == 2.0
    assert layers["layer2.conv2"].act_quantizer is None
    assert layers["conv1"].weight_quantizer.estimator == "aewgs"
    assert layers["conv1"].act_quantizer.signed is True
    # a container in exclude removes every layer under it
    s2 = quantize_model(TinyResNet(), 2, 2, exclude="layer2")
    assert [n for n, _ in quantized_layers(s2)] == ["layer1.conv1", "layer1.conv2"]
    s3 = quantize_model(TinyResNet(), 2, 2, keep_first=False, keep_last=False, keep_projections=False)
    assert len(quantized_layers(s3)) == 7


def test_errors():
    m = TinyResNet()
    with pytest.raises(ValueError, match="exclude.*'nope'"):
        quantize_model(m, 2, 2, exclude=["nope"])
    with pytest.raises(ValueError, match="include.*'layer9'"):
        quantize_model(m, 2, 2, include="layer9")
    with pytest.raises(ValueError, match="bn1"):
        quantize_model(m, 2, 2, exclude=["bn1"])
    with pytest.raises(ValueError, match="both"):
        quantize_model(m, 2, 2, exclude=["layer1.conv1"], include=["layer1.conv1"])
    with pytest.raises(ValueError, match="weight_bits.*not quantized"):
        quantize_model(m, {"conv1": 2, "*": 2}, 2)
    with pytest.raises(ValueError, match="act_bits.*no entry"):
        quantize_model(m, 2, {"layer1.conv1": 2})
    with pytest.raises(TypeError, match="weight_bits"):
        quantize_model(m, "2", 2)
    with pytest.raises(ValueError, match="act_bits"):
        quantize_model(m, 2, 0)
    with pytest.raises(ValueError, match="estimator"):
        quantize_model(m, 2, 2, estimator="ewgs")
    with pytest.raises(ValueError, match="signed"):
        quantize_model(m, 2, 2, signed="yes")
    with pytest.raises(TypeError, match="model"):
        quantize_model("resnet", 2, 2)
    with pytest.raises(ValueError, match="twice"):
        quantize_model(quantize_model(m, 2, 2), 2, 2)
