"""Default placement from the model's structure (gdnsq.placement through quantize_model):
input layers, classifiers and residual 1x1 projections stay FP; everything else is quantized;
the name-based fallback when tracing fails; the rule recorded on each FP layer."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gdnsq
from gdnsq import QConv2d, QLinear, QMultiheadAttention
from gdnsq.placement import RULE_CLASSIFIER, RULE_EXCLUDED, RULE_INPUT, RULE_PROJECTION
from gdnsq.stats import quantized_layers

from _arch_models import MobileNetV2, ResNet18, TinyViT


def _quantized(student):
    return {n for n, _ in quantized_layers(student)}


def _rule(student, name):
    return getattr(student.get_submodule(name), "_gdnsq_fp_rule", None)


def test_mobilenet_v2_pointwise_and_depthwise_convs_are_quantized():
    fp = MobileNetV2()
    student = gdnsq.quantize_model(fp, 2, 2)
    convs = {n: m for n, m in fp.named_modules() if isinstance(m, nn.Conv2d)}
    pointwise = [n for n, m in convs.items() if m.kernel_size == (1, 1)]
    depthwise = [n for n, m in convs.items() if m.groups > 1]
    assert len(pointwise) == 34 and len(depthwise) == 17
    assert set(pointwise) | set(depthwise) <= _quantized(student)
    assert set(convs) - _quantized(student) == {"features.0.0"}
    assert _rule(student, "features.0.0") == RULE_INPUT
    assert _rule(student, "classifier.1") == RULE_CLASSIFIER
    assert student(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_downsample_projections_stay_fp():
    student = gdnsq.quantize_model(ResNet18(), 2, 2)
    for stage in (2, 3, 4):
        name = f"layer{stage}.0.downsample.0"
        assert type(student.get_submodule(name)) is nn.Conv2d and _rule(student, name) == RULE_PROJECTION
    assert _rule(student, "conv1") == RULE_INPUT and _rule(student, "fc") == RULE_CLASSIFIER
    assert len(_quantized(student)) == 16  # every 3x3 conv of the 8 blocks
    everything = gdnsq.quantize_model(ResNet18(), 2, 2, keep_projections=False)
    assert "layer2.0.downsample.0" in _quantized(everything)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 reduce, 3x3, 1x1 expand (in the branch), 1x1 downsample."""

    def __init__(self, cin, width, cout):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += self.downsample(x)
        return F.relu(out)


class BottleneckNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Bottleneck(8, 4, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)).view(x.size(0), -1))


def test_bottleneck_branch_1x1_convs_are_quantized_and_the_projection_is_not():
    student = gdnsq.quantize_model(BottleneckNet(), 2, 2)
    assert _quantized(student) == {"block.conv1", "block.conv2", "block.conv3"}
    assert _rule(student, "block.downsample.0") == RULE_PROJECTION


class Untraceable(nn.Module):
    """Data-dependent control flow at the top: the blocks are traced one by one instead; a
    block that does not trace either falls back to the names."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Bottleneck(8, 4, 8)                  # traces: its graph decides
        self.block.downsample = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.odd = OddBlock()                              # does not trace: names decide
        self.fc = nn.Linear(8, 5)
        self.aux = nn.Linear(8, 5)

    def forward(self, x):
        x = self.odd(self.block(F.relu(self.stem(x))))
        if x.sum() > 0:  # not symbolically traceable
            x = x * 1.0
        return self.fc(x.mean((2, 3))) + 0 * self.aux(x.mean((2, 3)))


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.shortcut = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        if x.mean() > 100:
            return x
        return F.relu(self.pointwise(x)) + self.shortcut(x)


def test_fallback_when_the_model_does_not_trace():
    student = gdnsq.quantize_model(Untraceable(), 2, 2)
    assert _rule(student, "block.downsample.0") == RULE_PROJECTION   # from the block's graph
    assert _rule(student, "odd.shortcut") == RULE_PROJECTION         # from its name
    assert isinstance(student.odd.pointwise, QConv2d)
    # registration order: the first candidate and the last Linear
    assert _rule(student, "stem") == RULE_INPUT and _rule(student, "aux") == RULE_CLASSIFIER
    assert isinstance(student.fc, QLinear)


class TwoInputsTwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3)
        self.extra = nn.Linear(6, 4)
        self.mix = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 2)

    def forward(self, img, feats):
        a = F.relu(self.image(img)).mean((2, 3))
        h = F.relu(self.mix(torch.cat([a, self.extra(feats)], 1)))
        return {"a": self.head_a(h), "b": self.head_b(h).view(h.size(0), -1)}


def test_every_input_layer_and_every_head_stays_fp():
    student = gdnsq.quantize_model(TwoInputsTwoHeads(), 2, 2)
    assert _quantized(student) == {"mix"}
    assert {_rule(student, n) for n in ("image", "extra")} == {RULE_INPUT}
    assert {_rule(student, n) for n in ("head_a", "head_b")} == {RULE_CLASSIFIER}


def test_vit_attention_projections_are_quantized():
    student = gdnsq.quantize_model(TinyViT(), 2, 2)
    for i in range(2):
        attn = student.encoder.layers[i].self_attn
        assert isinstance(attn, QMultiheadAttention)
        assert all(isinstance(getattr(attn, p), QLinear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    assert _rule(student, "conv_proj") == RULE_INPUT and _rule(student, "head") == RULE_CLASSIFIER
    assert len(_quantized(student)) == 12


class TokenModel(nn.Module):
    """Embedding first: the embedding is the input layer, no projection is kept FP for it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class UntraceableTokenModel(TokenModel):
    def forward(self, tokens):
        if tokens.max() >= 20:  # not symbolically traceable: the registration-order fallback
            raise ValueError("token out of range")
        return super().forward(tokens)


@pytest.mark.parametrize("model", [TokenModel, UntraceableTokenModel])
def test_token_model_keeps_no_projection_fp_for_the_input(model):
    student = gdnsq.quantize_model(model(), 2, 2)
    assert _quantized(student) == {f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert _rule(student, "head") == RULE_CLASSIFIER


def test_attention_names_in_overrides():
    s2 = gdnsq.quantize_model(TokenModel(), {"attn.q_proj": 4, "*": 2}, 3,
                              exclude=["attn.out_proj"], include=["head"])
    assert _quantized(s2) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "head"}
    assert float(s2.attn.q_proj.weight_quantizer.target_bits) == 4.0
    assert _rule(s2, "attn.out_proj") == RULE_EXCLUDED
    s3 = gdnsq.quantize_model(TokenModel(), 2, 2, exclude="attn")
    assert type(s3.attn) is nn.MultiheadAttention and _rule(s3, "attn") == RULE_EXCLUDED
    with pytest.raises(ValueError, match="exclude.*'attn.w_proj'"):
        gdnsq.quantize_model(TokenModel(), 2, 2, exclude=["attn.w_proj"])


class HFStyleAttention(nn.Module):
    """Attention built from nn.Linear (Hugging Face style): plain linear candidates."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(5, dim)
        self.query, self.key, self.value, self.output = (nn.Linear(dim, dim) for _ in range(4))
        self.classifier = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        b, t, d = h.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.classifier(self.output(a).mean(1))


def test_hf_style_attention_from_linear_layers():
    student = gdnsq.quantize_model(HFStyleAttention(), 2, 2)
    assert _quantized(student) == {"query", "key", "value", "output"}
    x = torch.randn(2, 4, 5)
    gdnsq.calibrate(student, [x])
    student.train()
    student(x).sum().backward()
    assert student.query.weight_quantizer.log2_step.grad is not None


class ReadsWeightDirectly(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.tied = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.linear(F.relu(self.first(x)), self.tied.weight))


def test_calibrate_names_a_layer_that_forward_never_calls():
    student = gdnsq.quantize_model(ReadsWeightDirectly(), 2, 2)
    assert isinstance(student.tied, QLinear)
    message = r"layer 'tied' was never called during calibration.*weight read directly"
    with pytest.raises(ValueError, match=message):
        gdnsq.calibrate(student, [torch.randn(3, 4)])
    weights_only = gdnsq.quantize_model(ReadsWeightDirectly(), 2, None)  # A32: weights need no data pass
    gdnsq.calibrate(weights_only, [torch.randn(3, 4)])
