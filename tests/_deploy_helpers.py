"""Helpers for the gdnsq.deploy tests: small quantized models with chosen bit-widths."""
from __future__ import annotations

import math

import torch
from torch import nn



class Scale(nn.Module):
    """A custom layer freeze does not know: it must pass through untouched."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n).view(1, n, 1, 1))

    def forward(self, x):
        return x * self.gain


class SmallNet(nn.Module):
    """conv(FP) -> BN -> ReLU -> qconv(stride 2) -> BN -> ReLU -> Scale -> qconv (signed input,
    no ReLU before it) -> ReLU -> pool -> qlinear -> fc(FP)."""

    def __init__(self, c=8, classes=10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.scale = Scale(2 * c)
        self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=True)
        self.hidden = nn.Linear(2 * c, 24)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.conv0(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.scale(x) - 0.3  # signed input for conv2: offset != 0, padding off the grid
        x = torch.relu(self.conv2(x))
        x = x.mean((2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def quantized_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and hasattr(m, "weight_quantizer")]


@torch.no_grad()
def set_bits(qmodel: nn.Module, x: torch.Tensor, wbits: int, abits: int | None) -> None:
    """Set every quantizer so that its realised levels are exactly 2**bits.

    Weights: ``s_c = range_c / (2**b - 1)`` (times 1+1e-6 so that the top code rounds to 2**b-1).
    Activations: offset = min of the layer's input on ``x`` if negative else 0, step such that
    the clamp top (offset + Q - s) is the input max, ``log2_range = log2_step + b``.
    """
    layers = quantized_layers(qmodel)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: inputs.__setitem__(n, inp[0].detach()))
             for n, m in layers]
    for _, m in layers:
        m._fp_passthrough = True
    qmodel.eval()(x)
    for _, m in layers:
        m._fp_passthrough = False
    for h in hooks:
        h.remove()
    for n, m in layers:
        w = m.weight.reshape(m.weight.shape[0], -1)
        span = (w.amax(1) - w.amin(1)).clamp_min(1e-8)
        m.weight_quantizer.log2_step.copy_(torch.log2(span / (2 ** wbits - 1) * (1 + 1e-6)))
        m.weight_quantizer.target_bits.fill_(wbits)
        aq = m.act_quantizer
        if aq is None:
            continue
        if abits is None:
            aq.enabled = False
            continue
        lo = min(float(inputs[n].min()), 0.0)
        hi = float(inputs[n].max()) * 0.8  # some inputs clamp at the top
        alpha = math.log2((hi - lo) / (2 ** abits - 1))
        aq.log2_step.copy_(torch.tensor(alpha))
        aq.log2_range.copy_(torch.tensor(alpha + abits))
        aq.offset.copy_(torch.tensor(lo))
        aq.target_bits.fill_(abits)


def make_qmodel(wbits, abits, seed=0, include_hidden=True):
    """SmallNet converted by quantize_model (conv0 and fc FP), quantizers set to the bits."""
    from gdnsq.convert import quantize_model

    torch.manual_seed(seed)
    fp = SmallNet()
    randomize_bn(fp)
    fp.eval()
    q = quantize_model(fp, weight_bits=wbits, act_bits=abits, signed=True)
    x = torch.randn(6, 3, 12, 12)
    set_bits(q, x, wbits, abits)
    return q.eval()


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
