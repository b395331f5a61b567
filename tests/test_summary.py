"""gdnsq.summary: every layer listed with its placement, bits, parameters, MACs and bytes; the
totals; no effect on the model; the table; and `gdnsq quantize` printing it."""
import math

import pytest
import torch
from torch import nn

import gdnsq
from gdnsq.cli.quantize import print_summary


class Net(nn.Module):
    """3x3 stem, a grouped conv, a 1x1 residual projection, an attention, a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)                     # input layer: FP
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.proj = nn.Conv2d(8, 8, 1, stride=2)                       # residual projection: FP
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)                                      # classifier: FP

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.down(torch.relu(self.grouped(x))) + self.proj(x)      # (N, 8, 4, 4)
        tokens = x.flatten(2).transpose(1, 2)                          # (N, 16, 8)
        tokens = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.fc(tokens.mean(1))


def _student():
    torch.manual_seed(0)
    student = gdnsq.quantize_model(Net(), {"grouped": 3, "*": 2}, {"down": None, "*": 4})
    gdnsq.calibrate(student, [torch.randn(4, 3, 8, 8)], bits=6)
    return student


def test_rows_bits_macs_and_bytes():
    student = _student()
    x = torch.randn(2, 3, 8, 8)
    result = gdnsq.summary(student, x)
    rows = {r.name: r for r in result.layers}
    assert list(rows)[:3] == ["stem", "bn", "grouped"]
    for name in ("stem", "grouped", "proj", "down", "attn", "attn.q_proj", "attn.k_proj",
                 "attn.v_proj", "attn.out_proj", "fc", "bn"):
        assert name in rows, name
    # placement and the rule that kept a layer FP
    assert (rows["stem"].quantized, rows["stem"].rule) == (False, "input layer")
    assert (rows["proj"].quantized, rows["proj"].rule) == (False, "residual projection")
    assert (rows["fc"].quantized, rows["fc"].rule) == (False, "classifier")
    assert rows["grouped"].quantized and rows["attn.q_proj"].quantized and rows["down"].quantized
    # targets; realised bits after a 6-bit calibration; A32 layer
    g = rows["grouped"]
    assert (g.weight_target, g.act_target) == (3.0, 4.0)
    assert 5.0 < g.weight_bits <= 6.0 + 1e-6 and g.act_bits == pytest.approx(6.0)
    assert rows["down"].act_target is None and rows["down"].act_bits is None
    # MACs: out elements x (in/groups) x kernel taps, counted by hand
    assert g.macs == 2 * 8 * 8 * 8 * (4 * 3 * 3)
    assert rows["stem"].macs == 2 * 8 * 8 * 8 * (3 * 3 * 3)
    assert rows["proj"].macs == 2 * 8 * 4 * 4 * 8
    assert rows["attn.q_proj"].macs == 2 * 16 * 8 * 8
    assert rows["attn"].macs == 2 * (2 * 16 * 16 * 8)      # q k^T and the weighted sum
    assert rows["fc"].macs == 2 * 5 * 8
    # parameters: the layer's own weight and bias (quantizer parameters are not counted)
    assert g.params == 8 * 4 * 3 * 3 and rows["stem"].params == 8 * 3 * 3 * 3 + 8
    assert rows["bn"].params == 16
    # bytes as frozen: codes packed at ceil(realised) bits, float32 step + zero point per channel
    w_bits = math.ceil(g.weight_bits - 1e-9)
    assert g.bytes == w_bits * math.ceil(8 * 4 * 3 * 3 / 8) + 8 * 8 + 12
    assert rows["stem"].bytes == 4 * (8 * 3 * 3 * 3 + 8)
    assert rows["bn"].bytes == 4 * 4 * 8                     # weight, bias, running mean and var
    # bit-operations: MACs x weight bits x input bits (FP layers at 32 x 32)
    assert g.bops == g.macs * w_bits * 6
    assert rows["down"].bops == rows["down"].macs * math.ceil(rows["down"].weight_bits - 1e-9) * 32
    assert rows["stem"].bops == rows["stem"].macs * 32 * 32
    # totals
    assert result.params == sum(r.params for r in result.layers)
    assert result.macs == sum(r.macs for r in result.layers)
    assert result.bytes < result.fp32_bytes and result.bops < result.fp32_bops
    assert result.fp32_bops == result.macs * 1024
    d = result.to_dict()
    assert d["totals"]["quantized_layers"] == 6 and len(d["layers"]) == len(result.layers)


def test_table_lists_every_layer_and_the_totals():
    student = _student()
    text = str(gdnsq.summary(student, torch.randn(1, 3, 8, 8)))
    for name in ("stem", "grouped", "attn.v_proj", "fc"):
        assert f"\n{name} " in text
    assert "FP: input layer" in text and "FP: residual projection" in text and "FP: classifier" in text
    assert "quantized layers: 6 of 9" in text
    assert "bit-operations:" in text and "size:" in text


def test_no_effect_on_the_model_and_fp_models():
    student = _student()
    student.train()
    observed = {n: b.clone() for n, b in student.named_buffers()}
    gdnsq.summary(student, (torch.randn(1, 3, 8, 8),))
    assert student.training
    for n, b in student.named_buffers():
        assert torch.equal(b, observed[n]), n  # BN statistics, observed bits untouched
    assert not any(getattr(m, "_fp_passthrough", False) for m in student.modules())
    fp = gdnsq.summary(Net(), {"x": torch.randn(1, 3, 8, 8)})
    rows = {r.name: r for r in fp.layers}
    assert not any(r.quantized for r in fp.layers) and rows["attn"].weight_bits == 32
    # nn.MultiheadAttention is one row: projections and attention in its MACs
    assert rows["attn"].macs == 4 * 16 * 8 * 8 + 2 * 16 * 16 * 8 and "attn.out_proj" not in rows
    assert fp.bytes == fp.fp32_bytes
    with pytest.raises(TypeError, match="example_input"):
        gdnsq.summary(Net(), 3)
    with pytest.raises(TypeError, match="model"):
        gdnsq.summary("net", torch.randn(1))


def test_quantize_command_prints_the_summary_unless_json(capsys):
    student = _student()
    example = torch.zeros(1, 3, 8, 8)
    print_summary(student, example, quiet=True)
    assert capsys.readouterr().err == ""
    print_summary(student, example, quiet=False)
    err = capsys.readouterr().err
    assert "placement" in err and "attn.q_proj" in err and "bit-operations" in err
