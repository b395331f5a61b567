"""gdnsq.deploy.freeze: frozen integer-code layers reproduce the fake-quant model."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _deploy_helpers import Scale, make_qmodel, quantized_layers, rel_err
from gdnsq.deploy import DeployedConv2d, DeployedLinear, deployed_layers, freeze, layer_table, size_report
from gdnsq.deploy.layers import pack_codes, unpack_codes


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _x(n=5, hw=12, seed=3):
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(seed))


def _oracle(qlayer, x):
    """float64 conv/linear of the dequantized grid values, computed from the *trained* (fake-quant)
    layer's float weight and quantizer parameters with METHOD Part B's formulas written out here:
    nothing of the deployed layer (its codes, steps or zero points) and no gdnsq_kernels code.

    Weights: s_c = 2**log2_step (float32), z_c = min of channel c, k = round((w - z_c) / s_c) in
    float32. Activations: s = 2**log2_step, lo = offset, hi = lo + 2**log2_range - s,
    j = round((clamp(x, lo, hi) - lo) / s) in float32. Rounding is half to even (torch.round)."""
    wq, aq = qlayer.weight_quantizer, qlayer.act_quantizer
    w = qlayer.weight.detach().float()
    c_out = w.shape[0]
    w2 = w.reshape(c_out, -1)
    s_w = torch.exp2(wq.log2_step.detach().float()).reshape(-1)
    s_w = s_w.expand(c_out) if s_w.numel() == 1 else s_w
    z = w2.amin(1)
    k = torch.round((w2 - z[:, None]) / s_w[:, None])
    w64 = (z.double()[:, None] + s_w.double()[:, None] * k.double()).reshape(w.shape)
    s_a = torch.exp2(aq.log2_step.detach().float())
    lo = aq.offset.detach().float()
    hi = lo + torch.exp2(aq.log2_range.detach().float()) - s_a
    j = torch.round((torch.clamp(x.float(), lo, hi) - lo) / s_a)
    a64 = lo.double() + s_a.double() * j.double()
    b = None if qlayer.bias is None else qlayer.bias.detach().double()
    if isinstance(qlayer, nn.Conv2d):
        return F.conv2d(a64, w64, b, qlayer.stride, qlayer.padding, qlayer.dilation, qlayer.groups)
    return F.linear(a64, w64, b)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("path", ["int", "bitplane", "binary", "float"])
def test_freeze_matches_fake_quant(bits, path):
    q = make_qmodel(bits, bits)
    x = _x()
    ref = q(x)
    frozen = freeze(q, path=path)
    out = frozen(x)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out.argmax(1), ref.argmax(1))
    if path == "float":  # same float32 ops as the fake-quant model: bit for bit
        assert torch.equal(out, ref)
    layers = dict(deployed_layers(frozen))
    assert sorted(layers) == ["conv1", "conv2", "hidden"]
    for layer in layers.values():
        assert layer.config["weight_bits"] == bits and layer.config["act_bits"] == bits
        want = path if path in layer.allowed_paths() else ("binary" if bits == 1 else "int")
        assert layer.path == want
    # the qmodel is not modified, FP layers / BN / unknown layers pass through untouched
    assert len(quantized_layers(q)) == 3
    assert type(frozen.conv0) is nn.Conv2d and torch.equal(frozen.conv0.weight, q.conv0.weight)
    assert type(frozen.fc) is nn.Linear and isinstance(frozen.bn1, nn.BatchNorm2d)
    assert type(frozen.scale) is Scale and torch.equal(frozen.scale.gain, q.scale.gain)


@pytest.mark.parametrize("path", ["int", "bitplane", "binary", "float"])
def test_each_layer_matches_float64_oracle(path):
    q = make_qmodel(1 if path == "binary" else 3, 1 if path == "binary" else 2)
    frozen = freeze(q, path=path)
    captured = {}
    for n, m in deployed_layers(frozen):
        m.register_forward_pre_hook(lambda mod, inp, n=n: captured.__setitem__(n, inp[0]))
    frozen(_x(hw=11))  # odd size: stride-2 border
    for n, m in deployed_layers(frozen):
        assert m.path == path
        ref = _oracle(q.get_submodule(n), captured[n])
        # integer paths: correctly rounded (float64 epilogue); float: float32 accumulation
        assert rel_err(m(captured[n]).double(), ref) < (1e-5 if path == "float" else 1e-6), n


def test_auto_measures_and_w1a1_uses_binary():
    for bits in (1, 2):
        q = make_qmodel(bits, bits)
        x = _x()
        frozen = freeze(q, example_input=x, reps=1)
        for row in layer_table(frozen):
            if bits == 1:
                assert row["path"] == "binary"
            else:
                assert row["chosen_by"] == "measured"
                assert set(row["timings_ms"]) == {"int", "bitplane"}
                assert row["path"] == min(row["timings_ms"], key=row["timings_ms"].get)
        assert rel_err(frozen(x), q(x)) < 1e-5


def test_mixed_bits_and_weight_only_layers():
    q = make_qmodel(2, 4)
    q.hidden.act_quantizer.enabled = False  # A32 layer: weights only
    x = _x()
    frozen = freeze(q)
    assert frozen.hidden.path == "dequant" and frozen.hidden.config["act_bits"] is None
    assert frozen.conv1.config["weight_bits"] == 2 and frozen.conv1.config["act_bits"] == 4
    assert rel_err(frozen(x), q(x)) < 1e-5


def test_wide_codes_switch_to_float64():
    q = make_qmodel(10, 10)
    frozen = freeze(q)
    assert frozen.conv2.config["act_bits"] == 10
    # 16 channels * 9 taps * 1023 * 1023 > 2**24: float32 would round the integer sums
    assert not frozen.conv2._fp32_fits()
    x = _x()
    assert rel_err(frozen(x), q(x)) < 1e-5


def test_realised_bits_above_target_warn_or_raise():
    q = make_qmodel(2, 2)
    q.conv1.weight_quantizer.target_bits.fill_(1)  # realised 2 bits > target 1
    with pytest.warns(UserWarning, match="conv1: realised bits exceed"):
        frozen = freeze(q)
    assert frozen.conv1.config["weight_bits"] == 2
    with pytest.raises(ValueError, match="conv1.*strict"):
        freeze(q, strict=True)
    q2 = make_qmodel(2, 2)
    q2.conv2.act_quantizer.target_bits.fill_(1)
    with pytest.raises(ValueError, match="conv2: realised bits exceed.*activation"):
        freeze(q2, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        freeze(make_qmodel(2, 2), strict=True)  # at target: no warning, no error


def test_bad_arguments():
    with pytest.raises(TypeError, match="qmodel"):
        freeze("model")
    with pytest.raises(ValueError, match="path"):
        freeze(make_qmodel(2, 2), path="fast")
    frozen = freeze(make_qmodel(2, 2))
    with pytest.raises(ValueError, match="x must be"):
        frozen.conv1(torch.randn(3, 8))
    with pytest.raises(ValueError, match="path must be one of"):
        frozen.conv1.set_path("binary")


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_pack_codes_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (7, 3, 5), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (bits, math.ceil(105 / 8))
    assert torch.equal(unpack_codes(packed, bits, (7, 3, 5)), codes.to(torch.int32))
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(codes + 2**bits, bits)
    with pytest.raises(ValueError, match="packed must be uint8"):
        unpack_codes(packed, bits, (7, 3, 6))


def test_size_report_counts_bytes():
    frozen = freeze(make_qmodel(1, 1))
    rep = size_report(frozen)
    conv1 = next(r for r in rep["layers"] if r["name"] == "conv1")
    assert conv1["fp32_bytes"] == 4 * 16 * 8 * 9
    # 1 bit per weight + step and min (4 bytes each per channel) + 3 activation parameters
    assert conv1["deployed_bytes"] == math.ceil(16 * 8 * 9 / 8) + 2 * 16 * 4 + 3 * 4
    assert rep["total_fp32_bytes"] > rep["total_deployed_bytes"]
    assert rep["total_fp32_bytes"] - rep["quantized_fp32_bytes"] == rep["other_fp32_bytes"]


def test_moves_to_device_and_back():
    q = make_qmodel(2, 2)
    frozen = freeze(q, path="bitplane")
    x = _x()
    before = frozen(x)
    frozen.to(torch.float32)  # _apply clears the derived caches; results unchanged
    assert torch.equal(frozen(x), before)
    assert isinstance(frozen.hidden, DeployedLinear)


def test_float_codes_equal_reference_codes():
    frozen = freeze(make_qmodel(2, 4))
    layer = frozen.conv2  # signed: offset != 0
    s = float(torch.exp2(layer.act_log2_step))
    lo = float(layer.act_offset)
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(4000, generator=g) * 3,
                   lo + s * (torch.arange(-3, 20).float() + 0.5),  # ties: round half to even
                   torch.tensor([float("inf"), -float("inf"), 1e30])])
    assert torch.equal(layer.float_codes(x).to(torch.int32), layer.codes_of(x))


@pytest.mark.parametrize("conv_args", [dict(groups=2, dilation=2, padding=3), dict(padding=2, stride=3)])
def test_conv_geometry_grouped_dilated_wide_padding(conv_args):
    from gdnsq.layers import QConv2d
    from _deploy_helpers import set_bits

    conv = nn.Conv2d(4, 6, 3, bias=True, **conv_args)
    model = nn.Sequential(QConv2d.from_float(conv, weight_bits=3, act_bits=3, signed=True))
    x = torch.randn(2, 4, 9, 10)
    set_bits(model, x, 3, 3)
    ref = model(x)
    frozen = freeze(model)
    assert frozen[0].allowed_paths()[0] == ("int" if "groups" in conv_args else "bitplane")
    for path in frozen[0].allowed_paths():
        frozen[0].set_path(path)
        assert rel_err(frozen(x), ref) < 1e-5, path
        assert rel_err(frozen[0](x).double(), _oracle(model[0], x)) < 1e-5, path


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_integer_paths_equal_exact_fake_quant(bits):
    """With exact inference the fake-quant model computes what the integer kernels compute:
    each layer's exact value rounded once, so no code of a later quantizer can flip and the
    end-to-end logits agree to float32 rounding (unlike the float32-accumulating fake-quant)."""
    from gdnsq.layers import set_exact_inference

    qmodel = make_qmodel(bits, bits)
    x = _x(n=8)
    frozen = freeze(qmodel, path="auto" if bits > 1 else "binary")
    set_exact_inference(qmodel, True)
    try:
        ref = qmodel(x)
    finally:
        set_exact_inference(qmodel, False)
    out = frozen(x)
    assert rel_err(out, ref) < 1e-6
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # Per layer, on the same input, the deployed layer and the exact fake-quant layer agree to
    # one float32 rounding (both round the exact value once; float64 error may move a tie).
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: inputs.__setitem__(n, a[0]))
             for n, m in quantized_layers(qmodel)]
    try:
        qmodel(x)
    finally:
        for h in hooks:
            h.remove()
    deployed = dict(deployed_layers(frozen))
    for name, layer in quantized_layers(qmodel):
        layer.exact_inference = True
        try:
            exact = layer(inputs[name])
        finally:
            layer.exact_inference = False
        assert rel_err(deployed[name](inputs[name]), exact) < 2 ** -23, name
