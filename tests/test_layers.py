"""QConv2d / QLinear: the fused training path equals the plain composition
quantize_activation -> conv/linear(quantize_weight(w)) in output and every gradient."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdnsq import QConv2d, QLinear
from gdnsq_kernels import quantize_activation, quantize_weight
from gdnsq_kernels.quantize import new_seed_tensor


def _setup(layer, signed, act_bits=3.0):
    """Put the quantizers at a coarse grid so clamping and rounding are exercised."""
    with torch.no_grad():
        layer.weight_quantizer.log2_step.copy_(torch.linspace(-4, -2, layer.weight_quantizer.log2_step.numel()))
        if layer.act_quantizer is not None:
            aq = layer.act_quantizer
            aq.set_signed(signed)
            aq.log2_step.fill_(-2.0)
            aq.log2_range.fill_(-2.0 + act_bits)
            if signed:
                aq.offset.fill_(-0.7)


def _grads(out, tensors, seed_g):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed_g))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


def _params(layer):
    ps = [layer.weight, layer.weight_quantizer.log2_step]
    if layer.bias is not None:
        ps.append(layer.bias)
    if layer.act_quantizer is not None:
        aq = layer.act_quantizer
        ps += [aq.log2_step, aq.log2_range] + ([aq.offset] if aq.offset.requires_grad else [])
    return ps


def _composition(layer, x, sa, sw, dither):
    aq, wq = layer.act_quantizer, layer.weight_quantizer
    xq = quantize_activation(x, aq.log2_step, aq.log2_range, aq.offset, seed=sa, dither=dither) if aq else x
    wh = quantize_weight(layer.weight, wq.log2_step, seed=sw, dither=dither)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(xq, wh, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(xq, wh, layer.bias)


CONV_CASES = [
    # (cin, cout, k, stride, padding, dilation, groups, bias, signed, x shape)
    (3, 5, 3, 1, 1, 1, 1, False, False, (2, 3, 7, 6)),
    (4, 6, 3, 2, 0, 1, 2, True, True, (3, 4, 9, 9)),
    (2, 3, (3, 1), (1, 2), (1, 0), 2, 1, True, True, (1, 2, 8, 5)),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=["plain", "groups-stride-bias-signed", "rect-dilated"])
@pytest.mark.parametrize("dither", [True, False])
def test_qconv2d_fused_equals_composition(case, dither):
    cin, cout, k, stride, pad, dil, groups, bias, signed, xs = case
    layer = QConv2d(cin, cout, k, stride, pad, dil, groups, bias, weight_bits=2, act_bits=2, dither=dither)
    _setup(layer, signed)
    x = (torch.randn(xs) * 1.5 + (0 if signed else 0.4)).requires_grad_()
    if not signed:
        x = x.relu().detach().requires_grad_()
    torch.manual_seed(7)
    out = layer(x)
    got = _grads(out, [x] + _params(layer), 1)
    torch.manual_seed(7)
    sa, sw = (new_seed_tensor(), new_seed_tensor()) if dither else (0, 0)
    ref = _composition(layer, x, sa, sw, dither)
    want = _grads(ref, [x] + _params(layer), 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, i
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"gradient {i}")


@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 7)])
def test_qlinear_fused_equals_composition(x_shape):
    layer = QLinear(7, 4, bias=True, weight_bits=2, act_bits=2)
    _setup(layer, True)
    x = torch.randn(x_shape, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    got = _grads(out, [x] + _params(layer), 2)
    torch.manual_seed(3)
    sa, sw = new_seed_tensor(), new_seed_tensor()
    ref = _composition(layer, x, sa, sw, True)
    want = _grads(ref, [x] + _params(layer), 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_weights_only_layer_and_frozen_params():
    layer = QConv2d(3, 4, 3, padding=1, weight_bits=2, act_bits=None)
    assert layer.act_quantizer is None
    _setup(layer, False)
    layer.weight_quantizer.log2_step.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    torch.manual_seed(1)
    gx, gw = _grads(layer(x), [x, layer.weight], 4)
    torch.manual_seed(1)
    sw = new_seed_tensor()
    wh = quantize_weight(layer.weight, layer.weight_quantizer.log2_step, seed=sw)
    gx2, gw2 = _grads(F.conv2d(x, wh, None, 1, 1), [x, layer.weight], 4)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(gw, gw2)


def test_fused_aewgs_equals_unfused_aewgs():
    layer = QConv2d(3, 4, 3, padding=1, weight_bits=2, act_bits=2, estimator="aewgs")
    _setup(layer, False)
    x = torch.randn(2, 3, 6, 6).relu().requires_grad_()
    grads = []
    for fused in (True, False):
        layer.fused = fused
        torch.manual_seed(5)
        grads.append(_grads(layer(x), [x] + _params(layer), 3))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # AEWGS changes the weight gradient (it is not the STE identity here).
    layer.weight_quantizer.estimator = "ste"
    torch.manual_seed(5)
    ste = _grads(layer(x), [x] + _params(layer), 3)
    assert not torch.allclose(ste[1], grads[0][1])


def test_fused_saves_only_fp_input():
    """Bytes saved for backward: the fused layer keeps x (+ tiny tensors), not a second copy."""
    layer = QConv2d(8, 8, 3, padding=1, weight_bits=2, act_bits=2)
    _setup(layer, False)
    x = torch.randn(4, 8, 16, 16).relu().requires_grad_()
    x_bytes = x.numel() * x.element_size()
    w_bytes = layer.weight.numel() * layer.weight.element_size()
    for fused in (True, False):
        layer.fused = fused
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        saved = sum(seen.values())
        if fused:  # x, the weight and its quantized copy, O(C_out) extras
            assert saved <= x_bytes + 2 * w_bytes + 512, saved
        else:  # the composition also keeps the quantized input alive
            assert saved >= 2 * x_bytes, saved


def test_eval_records_observed_bits_and_no_grad_path():
    layer = QConv2d(2, 3, 3, weight_bits=2, act_bits=2)
    _setup(layer, False, act_bits=3.0)
    layer.eval()
    x = torch.rand(2, 2, 6, 6) * 10  # saturates the clamp: all 8 levels used
    with torch.no_grad():
        y = layer(x)
    assert float(layer.act_quantizer.observed_bits) == 3.0
    torch.testing.assert_close(y, _composition(layer, x, 0, 0, False))
    with torch.no_grad():
        layer(torch.zeros(1, 2, 6, 6))
    assert float(layer.act_quantizer.observed_bits) == 0.0


def test_from_float_shares_parameters_and_non_zero_padding():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    q = QConv2d.from_float(conv, weight_bits=3, act_bits=3, signed=True)
    assert q.weight is conv.weight and q.bias is conv.bias
    assert q.weight_quantizer.log2_step.device == conv.weight.device
    x = torch.randn(1, 3, 5, 5, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and q.weight.grad is not None
    lin = nn.Linear(5, 2)
    ql = QLinear.from_float(lin, weight_bits=2, act_bits=None)
    assert ql.weight is lin.weight and ql.act_quantizer is None
    with pytest.raises(TypeError, match="conv"):
        QConv2d.from_float(lin)
    with pytest.raises(ValueError, match="weight_bits"):
        QConv2d(1, 1, 3, weight_bits=0)


def test_fused_equals_composition_triton_interpreter(monkeypatch):
    """The same equality through the Triton kernels (interpreted on CPU tensors)."""
    from gdnsq_kernels.backend import triton_interpreter_enabled
    if not triton_interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    monkeypatch.setenv("GDNSQ_BACKEND", "triton")
    layer = QConv2d(2, 3, 3, 1, 1, weight_bits=2, act_bits=2)
    _setup(layer, True)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    torch.manual_seed(9)
    out = layer(x)
    got = _grads(out, [x] + _params(layer), 5)
    torch.manual_seed(9)
    sa, sw = new_seed_tensor(), new_seed_tensor()
    ref = _composition(layer, x, sa, sw, True)
    want = _grads(ref, [x] + _params(layer), 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("cast", [None, torch.bfloat16])
def test_eager_fused_path_equals_the_op(kind, cast, monkeypatch):
    """The eager autograd.Function path of fused_layer and the gdnsq:: op path (what compiled code
    gets) give the same output and gradients, bit for bit, for the same seeds."""
    from gdnsq_kernels.quantize import fused_layers

    torch.manual_seed(3)
    if kind == "conv":
        layer = QConv2d(5, 6, 3, 2, 1, bias=True, weight_bits=3, act_bits=3, estimator="aewgs")
        x0 = torch.randn(2, 5, 9, 7)
    else:
        layer = QLinear(7, 4, bias=True, weight_bits=3, act_bits=3)
        x0 = torch.randn(3, 2, 7)
    _setup(layer, False)
    results = []
    for eager in (True, False):
        calls = []
        real_eager = fused_layers._eager
        monkeypatch.setattr(fused_layers, "_eager", lambda *t: calls.append(1) or (eager and real_eager(*t)))
        x = x0.relu().requires_grad_()
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast is not None):
            out = layer(x)
        results.append([out.detach()] + list(_grads(out.float(), [x] + _params(layer), 1)))
        assert calls
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"output/gradient {i}")
