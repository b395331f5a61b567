"""QConv2d / QLinear values where the fused-vs-composition tests do not look: autocast gradients
against float32, the non-fused padding modes, empty batches (also through deployed layers),
channels_last inputs and weights, float16 / bfloat16 parameters."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdnsq import QConv2d, QLinear


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("GDNSQ_BACKEND", "cpu")


def _setup(layer, signed=True, act_bits=3.0):
    with torch.no_grad():
        n = layer.weight_quantizer.log2_step.numel()
        layer.weight_quantizer.log2_step.copy_(torch.linspace(-4, -2.5, n))
        aq = layer.act_quantizer
        aq.set_signed(signed)
        aq.log2_step.fill_(-2.3)
        aq.log2_range.fill_(-2.3 + act_bits)
        if signed:
            aq.offset.fill_(-0.7)
    return layer


def _params(layer):
    aq = layer.act_quantizer
    ps = [layer.weight, layer.weight_quantizer.log2_step, aq.log2_step, aq.log2_range]
    ps += [aq.offset] if aq.offset.requires_grad else []
    return ps + ([layer.bias] if layer.bias is not None else [])


def _run(layer, x, seed, g_seed=1, cast=None):
    """Output and gradients (x first, then _params) with dither seeds drawn after manual_seed."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    if cast is None:
        out = layer(x)
    else:
        with torch.autocast("cpu", dtype=cast):
            out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(g_seed)).to(out.dtype)
    grads = torch.autograd.grad(out, [x] + _params(layer), g)
    return out, grads


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_autocast_gradients_match_float32(cast, kind, signed):
    """Under autocast only the conv/linear runs in 16 bits: output and every gradient stay within
    16-bit rounding of the float32 layer with the same dither seeds (a wrong scale, a missing
    term or a gradient in the wrong dtype would be far outside: an output 3 % too large fails)."""
    torch.manual_seed(0)
    if kind == "conv":
        layer = _setup(QConv2d(4, 6, 3, padding=1, bias=True, weight_bits=3, act_bits=3), signed)
        x = torch.randn(3, 4, 7, 7)
    else:
        layer = _setup(QLinear(20, 7, bias=True, weight_bits=3, act_bits=3), signed)
        x = torch.randn(5, 20)
    out16, g16 = _run(layer, x, seed=4, cast=cast)
    out32, g32 = _run(layer, x, seed=4)
    assert out16.dtype == cast and out32.dtype == torch.float32
    tol = 2e-2 if cast == torch.bfloat16 else 4e-3  # ~2 * 2**-8 / 2**-11 relative, summed
    assert _rel(out16, out32) < tol
    names = ["x", "weight", "w_step", "a_step", "a_range"] + ["a_offset"] * signed + ["bias"]
    assert len(g16) == len(names)
    for name, a, b in zip(names, g16, g32):
        assert a.dtype == b.dtype == torch.float32, name
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < 5 * tol, (name, _rel(a, b))
    # and the 16-bit run differs from float32 at all (autocast really ran the conv in 16 bits)
    assert _rel(out16, out32) > 0


def _oracle_conv(layer, x, mode):
    """Quantize (dither off, values only), pad with ``mode``, then a plain conv: the definition."""
    aq, wq = layer.act_quantizer, layer.weight_quantizer
    s = torch.exp2(aq.log2_step.detach())
    lo = aq.offset.detach()
    hi = lo + torch.exp2(aq.log2_range.detach()) - s
    xq = lo + s * torch.round((torch.clamp(x, lo, hi) - lo) / s)
    w = layer.weight.detach()
    sw = torch.exp2(wq.log2_step.detach()).view(-1, 1, 1, 1)
    z = w.amin((1, 2, 3), keepdim=True)
    wq_ = z + sw * torch.round((w - z) / sw)
    if mode == "same":
        return F.conv2d(xq, wq_, layer.bias, layer.stride, "same", layer.dilation, layer.groups)
    ph, pw = layer.padding
    return F.conv2d(F.pad(xq, (pw, pw, ph, ph), mode=mode), wq_, layer.bias, layer.stride, 0,
                    layer.dilation, layer.groups)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "same"])
def test_non_fused_padding_modes_values_and_gradients(mode):
    torch.manual_seed(1)
    if mode == "same":
        layer = QConv2d(3, 4, 3, padding="same", dilation=2, weight_bits=3, act_bits=3)
    else:
        layer = QConv2d(3, 4, 3, padding=(1, 2), padding_mode=mode, weight_bits=3, act_bits=3)
    # "same" zero-pads the quantized input; the fused twin below zero-pads x before quantizing,
    # which agrees only when 0 is on the grid (unsigned, offset 0)
    signed = mode != "same"
    _setup(layer, signed=signed)
    layer.act_quantizer.dither = layer.weight_quantizer.dither = False
    x = torch.randn(2, 3, 7, 8) * 1.5
    out, grads = _run(layer, x, seed=0)
    torch.testing.assert_close(out, _oracle_conv(layer, x, mode), rtol=1e-5, atol=1e-5)
    # gradients: the fused zero-padding layer on the explicitly padded input, which is the same
    # function (quantization is element-wise, so it commutes with padding; the parameter
    # gradients of duplicated border elements add up to those of the originals)
    fused = QConv2d(3, 4, 3, padding=0, dilation=layer.dilation, weight_bits=3, act_bits=3)
    fused.load_state_dict(layer.state_dict())
    fused.act_quantizer.set_signed(signed)
    fused.act_quantizer.dither = fused.weight_quantizer.dither = False
    if mode == "same":
        pad = (2, 2, 2, 2)  # dilation 2, kernel 3: 2 on each side
        xp = F.pad(x, pad)  # zeros
    else:
        xp = F.pad(x, (2, 2, 1, 1), mode=mode)
    xp = xp.detach().requires_grad_(True)
    out_f = fused(xp)
    g = torch.randn(out_f.shape, generator=torch.Generator().manual_seed(1))
    gf = torch.autograd.grad(out_f, [xp] + _params(fused), g)
    torch.testing.assert_close(out, out_f, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["weight", "w_step", "a_step", "a_range", "a_offset", "bias"], grads[1:], gf[1:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    if mode != "same":  # x gradient: the padded gradient folded back by the padding's adjoint
        xx = x.detach().clone().requires_grad_(True)
        back = torch.autograd.grad(F.pad(xx, (2, 2, 1, 1), mode=mode), xx, gf[0])[0]
        mask = ((x >= fused.act_quantizer.offset) &
                (x <= fused.act_quantizer.offset + torch.exp2(fused.act_quantizer.log2_range)
                 - torch.exp2(fused.act_quantizer.log2_step))).float()
        torch.testing.assert_close(grads[0], back, rtol=1e-5, atol=1e-5)
        assert torch.equal(grads[0] * (1 - mask), torch.zeros_like(x))  # clamped inputs get none


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_through_qconv2d_and_qlinear(train):
    conv = _setup(QConv2d(3, 4, 3, padding=1, weight_bits=2, act_bits=2))
    lin = _setup(QLinear(6, 5, weight_bits=2, act_bits=2))
    for layer, x in ((conv, torch.randn(0, 3, 5, 5)), (lin, torch.randn(0, 6))):
        layer.train(train)
        before = float(layer.act_quantizer.observed_bits)
        x.requires_grad_(True)
        out = layer(x)
        assert out.shape == ((0, 4, 5, 5) if layer is conv else (0, 5))
        out.sum().backward()
        for p in _params(layer):
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), p.shape
        assert x.grad.shape == x.shape
        # an empty eval batch observes nothing
        assert float(layer.act_quantizer.observed_bits) == before or before != before


def test_empty_batch_through_deployed_layers():
    from _deploy_helpers import make_qmodel
    from gdnsq.deploy import deployed_layers, freeze

    for bits in (1, 2, 4):
        frozen = freeze(make_qmodel(bits, bits))
        for name, layer in deployed_layers(frozen):
            for path in layer.allowed_paths():
                layer.set_path(path)
                with torch.no_grad():
                    out = frozen(torch.randn(0, 3, 12, 12))
                assert out.shape == (0, 10), (bits, name, path)


def test_channels_last_matches_contiguous():
    torch.manual_seed(2)
    layer = _setup(QConv2d(4, 6, 3, stride=2, padding=1, weight_bits=3, act_bits=3))
    x = torch.randn(2, 4, 9, 9)
    out, grads = _run(layer, x, seed=3)
    cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    assert cl.weight.is_contiguous(memory_format=torch.channels_last) and not cl.weight.is_contiguous()
    out_cl, grads_cl = _run(cl, x.to(memory_format=torch.channels_last), seed=3)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-5)
    # same dither (logical row-major index), so every gradient agrees to summation order
    for a, b in zip(grads_cl, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # eval: the observed bits and the output too
    layer.eval(), cl.eval()
    with torch.no_grad():
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), layer(x), rtol=1e-5, atol=1e-5)
    assert float(cl.act_quantizer.observed_bits) == float(layer.act_quantizer.observed_bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_half_precision_parameters(dtype, kind):
    """A layer converted with .to(dtype): every parameter and the input in 16 bits. Output and
    gradients keep the parameters' dtypes and stay within 16-bit rounding of a float32 layer
    holding the same (16-bit-representable) values."""
    torch.manual_seed(3)
    if kind == "conv":
        layer = _setup(QConv2d(4, 5, 3, padding=1, weight_bits=3, act_bits=3))
        x = torch.randn(2, 4, 6, 6)
    else:
        layer = _setup(QLinear(12, 5, weight_bits=3, act_bits=3))
        x = torch.randn(4, 12)
    half = copy.deepcopy(layer).to(dtype)
    with torch.no_grad():  # the float32 twin holds exactly the 16-bit values
        for p32, p16 in zip(layer.parameters(), half.parameters()):
            p32.copy_(p16.float())
    x = x.to(dtype).float()
    out32, g32 = _run(layer, x, seed=5)
    out16, g16 = _run(half, x.to(dtype), seed=5)
    assert out16.dtype == dtype
    for p, g in zip([x.to(dtype)] + _params(half), g16):
        assert g.dtype == p.dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert _rel(out16, out32) < tol
    for name, a, b in zip(["x", "weight", "w_step", "a_step", "a_range", "a_offset", "bias"], g16, g32):
        assert torch.isfinite(a.float()).all(), name
        assert _rel(a, b) < 5 * tol, (name, _rel(a, b))
