"""The fused deploy runtime (gdnsq.deploy.runtime + csrc/deploy_runtime.cpp).

Oracles: F.conv2d in float64 on the integer codes (the packed conv sums), the model's own
modules (thresholds), the frozen model's per-layer path and the exact fake-quant model
(end to end). Every ISA build this CPU can run is tested.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdnsq.calibrate import calibrate
from gdnsq.convert import quantize_model
from gdnsq.deploy import freeze
from gdnsq.deploy import runtime as R
from gdnsq.deploy.layers import build_layer, pack_codes
from gdnsq.layers import set_exact_inference
from gdnsq.models.resnet_cifar import CifarResNet
from gdnsq_kernels import cpu_deploy
from gdnsq_kernels.quantize.reference import activation_codes

from _deploy_helpers import set_bits

ISAS = cpu_deploy.supported_isas()


def _deployed_conv(cin, out, k, stride, pad, bw, ba, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = build_layer({"kind": "conv2d", "weight_shape": [out, cin, k, k], "bias": True, "weight_bits": bw,
                         "act_bits": ba, "stride": [stride, stride], "padding": [pad, pad], "dilation": [1, 1],
                         "groups": 1, "path": "int"})
    codes = torch.randint(0, 2**bw, (out, cin, k, k), generator=g)
    with torch.no_grad():
        layer.weight_packed.copy_(pack_codes(codes, bw))
        layer.weight_step.copy_(torch.rand(out, generator=g) * 0.1 + 0.01)
        layer.weight_min.copy_(-torch.rand(out, generator=g) * 0.2)
        layer.bias.copy_(torch.randn(out, generator=g) * 0.1)
        layer.act_log2_step.fill_(-3.0)
        layer.act_log2_range.fill_(-3.0 + ba)
        layer.act_offset.fill_(offset)
    return layer, codes


# (Cin, O, H, W, stride, pad, ba, bw, N): odd channel counts, 16/32/64/96, stride 2, batch 0/1
CONV_CASES = [
    (16, 16, 8, 8, 1, 1, 1, 1, 2),
    (3, 5, 7, 6, 2, 1, 2, 2, 1),
    (32, 33, 5, 5, 1, 1, 1, 1, 1),
    (64, 64, 4, 4, 2, 1, 4, 4, 1),
    (96, 17, 5, 4, 1, 0, 1, 2, 1),
    (17, 96, 3, 3, 1, 1, 3, 1, 0),
    (65, 31, 4, 5, 2, 2, 2, 3, 2),
    # bytes-format tiles: 64-channel chunks (96 = 64 + 32), 48 (3 blocks), pixel tails, 7-bit weights
    (96, 96, 9, 11, 1, 1, 4, 4, 1),
    (33, 48, 13, 7, 1, 1, 4, 4, 1),
    (16, 16, 12, 12, 2, 1, 8, 7, 1),
    (5, 64, 6, 17, 1, 1, 3, 5, 2),
]


@pytest.mark.parametrize("fmt", R.FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_sums_match_float64_conv(isa, case, fmt):
    cin, out, H, W, stride, pad, ba, bw, N = case
    ext = cpu_deploy.load_extension(isa)
    assert ext.isa() == {"avx512vnni": "avx512_vnni", "avx512": "avx512_vpopcntdq", "avx2": "avx2",
                         "scalar": "scalar"}[isa]
    layer, k = _deployed_conv(cin, out, 3, stride, pad, bw, ba)
    tables = R.conv_tables(layer, H, W, fmt)
    j = torch.randint(0, 2**ba, (N, cin, H, W), generator=torch.Generator().manual_seed(1))
    skj, sj = ext.conv_sums(j.permute(0, 2, 3, 1).contiguous().to(torch.int32), tables["meta"], tables["wT"])
    want = F.conv2d(j.double(), k.double(), stride=stride, padding=pad)
    want_j = F.conv2d(j.double().sum(1, keepdim=True), torch.ones(1, 1, 3, 3, dtype=torch.float64),
                      stride=stride, padding=pad)
    assert skj.shape == (N, tables["Ho"], tables["Wo"], out)
    assert torch.equal(skj.permute(0, 3, 1, 2).double(), want)
    assert torch.equal(sj.double(), want_j[:, 0])


def test_cpp_entry_points_check_device_geometry_and_codes(students):
    """The C++ entry points refuse what gdnsq.deploy.runtime never passes (a last line of
    defence): tensors off the CPU, a conv geometry that is not positive and self-consistent,
    codes outside [0, 2**act_bits)."""
    ext = cpu_deploy.load_extension()
    layer, _ = _deployed_conv(16, 16, 3, 1, 1, 2, 2)
    t = R.conv_tables(layer, 8, 8, "packed")
    codes = torch.zeros(1, 8, 8, 16, dtype=torch.int32)
    assert ext.conv_sums(codes, t["meta"], t["wT"])[0].shape == (1, 8, 8, 16)
    with pytest.raises(ValueError, match="codes must be a CPU tensor"):
        ext.conv_sums(codes.to("meta"), t["meta"], t["wT"])
    with pytest.raises(ValueError, match="conv tables must be a CPU tensor"):
        ext.conv_sums(codes, t["meta"], t["wT"].to("meta"))
    wrong = {10: (9, r"Ho, Wo = 9, 8 do not follow"), 0: (-16, r"must be in \[1, 1048576\], got -16"),
             12: (0, r"act_bits and weight_bits must be in \[1, 16\], got 0, 2"),
             6: (-1, r"padding must be in \[0, 1048576\], got -1, 1")}
    for index, (value, message) in wrong.items():
        meta = list(t["meta"])
        meta[index] = value
        with pytest.raises(ValueError, match=message):
            ext.conv_sums(codes, meta, t["wT"])
    codes[0, 3, 4, 5] = 4
    with pytest.raises(ValueError, match=r"codes must be in \[0, 2\^act_bits\), got \[0, 4\]"):
        ext.conv_sums(codes, t["meta"], t["wT"])
    rt = R.runtime(freeze(students[1]))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        rt(x)
    plan = rt._plan_for(x)
    with pytest.raises(ValueError, match="x must be a CPU tensor"):
        plan.rt.forward(torch.zeros(1, 32, 32, 16, device="meta"))
    with pytest.raises(ValueError, match="bn_fma arguments must be a CPU tensor"):
        ext.bn_fma(torch.zeros(2, 3, device="meta"), torch.ones(3), torch.zeros(3))


def test_float_keys_roundtrip_and_order():
    x = torch.tensor([-math.inf, -3e38, -1.0, -1e-45, 0.0, 1e-45, 1.0, 3e38, math.inf])
    keys = R.float_to_key(x)
    assert bool((keys[1:] > keys[:-1]).all())
    assert torch.equal(R.key_to_float(keys), x)
    assert int(R.float_to_key(torch.tensor([-0.0]))) == 0


@pytest.mark.parametrize("ba,offset,log2_step", [(1, 0.0, -2.0), (2, -0.3, -3.5), (4, 0.1, -5.0), (3, 0.0, 1.0)])
def test_per_tensor_thresholds_are_exact_boundaries(ba, offset, log2_step):
    layer, _ = _deployed_conv(4, 4, 3, 1, 1, 1, ba, offset=offset)
    with torch.no_grad():
        layer.act_log2_step.fill_(log2_step)
        layer.act_log2_range.fill_(log2_step + ba)
    params = R._act_params(layer)
    thr = R.per_tensor_thresholds(layer)
    assert thr.shape == (2**ba - 1,)
    for level, t in enumerate(thr.tolist(), start=1):
        t = torch.tensor([t])
        below = torch.nextafter(t, torch.tensor([-math.inf]))
        assert int(activation_codes(t, *params)) >= level
        assert int(activation_codes(below, *params)) < level


def test_monotone_thresholds_decreasing_and_constant_rows():
    # row 0 increasing, row 1 decreasing, row 2 constant 0, row 3 constant at the top
    def fn(y):
        out = torch.stack([(y[0] * 4).round().clamp(0, 3), (-y[1] * 2).round().clamp(0, 3),
                           torch.zeros_like(y[2]), torch.full_like(y[3], 3.0)])
        return out.to(torch.int64)

    thr, direction, g_min = R.monotone_thresholds(fn, 4, 3)
    assert direction.tolist() == [1, -1, 1, 1]
    y = torch.cat([thr[torch.isfinite(thr)], torch.nextafter(thr[torch.isfinite(thr)], torch.tensor(-math.inf)),
                   torch.nextafter(thr[torch.isfinite(thr)], torch.tensor(math.inf)), torch.randn(2000) * 3])
    Y = y.view(1, -1).expand(4, -1)
    got = R.codes_from_thresholds(Y.t(), thr, direction).t()
    assert torch.equal(got, fn(Y))


def test_fused_thresholds_match_bn_relu_codes_with_negative_and_zero_scales():
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -0.7, 0.0, 2.5, -1e-3, 0.3]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.05, -0.4, 0.3, 0.0]))
        bn.running_mean.copy_(torch.randn(6))
        bn.running_var.copy_(torch.rand(6) + 0.2)
    nxt, _ = _deployed_conv(6, 4, 3, 1, 1, 1, 2)
    thr, direction = R.fused_bn_relu_thresholds(bn, nxt, None)
    y = torch.randn(3, 6, 9, 9) * 4
    want = activation_codes(F.relu(bn(y)), *R._act_params(nxt)).permute(0, 2, 3, 1).reshape(-1, 6)
    got = R.codes_from_thresholds(y.permute(0, 2, 3, 1).reshape(-1, 6), thr, direction)
    assert torch.equal(got, want.to(got.dtype))


@pytest.mark.parametrize("isa", ISAS)
def test_bn_affine_matches_batchnorm(isa):
    ext = cpu_deploy.load_extension(isa)
    bn = nn.BatchNorm2d(10).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(10))
        bn.bias.copy_(torch.randn(10))
        bn.running_mean.copy_(torch.randn(10))
        bn.running_var.copy_(torch.rand(10) + 0.01)
    alpha, beta = R.bn_affine(bn, ext, None)
    y = torch.randn(5, 10, 7, 7) * 10
    got = ext.bn_fma(y.permute(0, 2, 3, 1).reshape(-1, 10).contiguous(), alpha, beta)
    assert torch.equal(got, bn(y).permute(0, 2, 3, 1).reshape(-1, 10))


# --------------------------------------------------------------------------------------------
# end to end on ResNets


def _student(blocks, wbits, abits, seed=0):
    torch.manual_seed(seed)
    fp = CifarResNet(blocks).eval()
    x = torch.randn(16, 3, 32, 32)
    q = quantize_model(fp, wbits, abits)
    calibrate(q, [x])
    set_bits(q, x, wbits, abits)
    return q.eval()


@pytest.fixture(scope="module")
def students():
    return {b: _student(1, b, b, seed=b) for b in (1, 2, 4)}


@pytest.mark.parametrize("fmt", R.FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_runtime_equals_per_layer_and_exact_fake_quant(students, isa, bits, fmt):
    q = students[bits]
    frozen = freeze(q)
    rt = R.runtime(frozen, isa=isa, example_input=torch.randn(4, 3, 32, 32), formats=fmt)
    assert rt.fallback_reason is None
    for shape in [(3, 3, 32, 32), (1, 3, 32, 32), (2, 3, 19, 22), (0, 3, 32, 32)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = rt(x)
            per_layer = frozen(x)
            set_exact_inference(q, True)
            exact = q(x)
            set_exact_inference(q, False)
        assert got.shape == per_layer.shape
        if bits == 1:  # same kernels' epilogue order: bit for bit
            assert torch.equal(got, per_layer)
        torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-5)
        if x.shape[0]:
            assert torch.equal(got.argmax(1), exact.argmax(1))
    plan = next(iter(rt._plans.values()))
    assert set(plan.formats) == {(fmt, fmt)}


def _trunk_outputs(rt, x):
    """The runtime's trunk output and the frozen model's (NCHW) on the same stem output."""
    stem = rt._stem(x)
    plan = rt._plan_for(x)
    got = plan.rt.forward(stem.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)
    m = rt.model
    want = m.layer3(m.layer2(m.layer1(stem)))
    return got, want


@pytest.mark.parametrize("isa", ISAS)
def test_mixed_formats_trunk_bit_for_bit(students, isa):
    """Every producer/consumer pair of formats (packed->bytes, bytes->packed, ...) in one trunk;
    W1A1: the trunk output equals the frozen per-layer model's bit for bit."""
    frozen = freeze(students[1])
    n = 2 * len(R.trunk_blocks(frozen))
    pattern = ["bytes", "packed", "packed", "bytes", "bytes", "bytes", "packed", "packed"]
    formats = [pattern[i % len(pattern)] for i in range(n)]
    rt = R.runtime(frozen, isa=isa, formats=formats)
    for shape in [(2, 3, 32, 32), (1, 3, 17, 9)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got, want = _trunk_outputs(rt, x)
            assert torch.equal(got, want)
            assert torch.equal(rt(x), frozen(x))
    plan = next(iter(rt._plans.values()))
    assert [f for pair in plan.formats for f in pair] == formats


@pytest.mark.parametrize("fmt", R.FORMATS)
def test_trunk_runs_in_image_chunks(students, fmt):
    """The trunk runs chunk_images images at a time through all blocks (buffers reused): a
    batch that is not a multiple of the chunk gives the per-layer model's logits bit for bit."""
    frozen = freeze(students[1])
    rt = R.runtime(frozen, formats=fmt)
    x = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        rt(x[:1])
        plan = rt._plan_for(x)
        assert plan.rt.chunk_images == 8
        for chunk in (1, 3, 7, 64):
            plan.rt.chunk_images = chunk
            assert torch.equal(rt(x), frozen(x))
        plan.rt.chunk_images = 0
        with pytest.raises(RuntimeError, match="chunk_images"):
            rt(x)


def test_format_rule():
    layer1, _ = _deployed_conv(16, 16, 3, 1, 1, 1, 1)
    layer4, _ = _deployed_conv(16, 16, 3, 1, 1, 4, 4)
    layer8, _ = _deployed_conv(16, 16, 3, 1, 1, 8, 4)  # 8-bit weights do not fit int8
    assert R.choose_format(layer1, "avx512vnni") == "bytes"
    assert R.choose_format(layer4, "avx512") == "packed"
    assert R.choose_format(layer1, "avx2") == "packed" and R.choose_format(layer4, "avx2") == "bytes"
    assert R.choose_format(layer8, "avx512vnni") == "packed"
    assert R.choose_format(layer8, "avx2", "bytes") == "packed"
    assert R.choose_format(layer1, "avx512", "bytes") == "bytes"
    with pytest.raises(R.PlanError):
        R.conv_tables(layer8, 8, 8, "bytes")
    with pytest.raises(ValueError, match="formats"):
        R.runtime(nn.Identity(), formats="int8")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", R.FORMATS)
def test_runtime_nonzero_offset_padding(students, fmt, isa):
    frozen = freeze(students[2])
    for name, m in frozen.named_modules():  # signed inputs: padding off the grid
        if name.endswith("conv1") and hasattr(m, "act_offset") and "layer" in name:
            with torch.no_grad():
                m.act_offset.fill_(-0.05)
            m._cache.clear()
    rt = R.runtime(frozen, isa=isa, formats=fmt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rt(x), frozen(x), rtol=1e-5, atol=1e-5)


def test_plan_rebuilt_after_load(tmp_path, students):
    from gdnsq.deploy import load, save

    frozen = freeze(students[1])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = R.runtime(frozen)(x)
    # artifact route: a skeleton of the same architecture, codes loaded from the file
    path = tmp_path / "m.gdnsq"
    save(frozen, str(path), architecture={"name": "custom", "kwargs": {}})
    loaded = load(str(path), model=freeze(_student(1, 1, 1, seed=7)))
    with torch.no_grad():
        assert torch.equal(R.runtime(loaded)(x), before)
    # state-dict route: a plan built for other weights is dropped and rebuilt
    rt = R.runtime(freeze(_student(1, 1, 1, seed=8)))
    with torch.no_grad():
        rt(x)
        assert rt._plans
        rt.load_state_dict(R.RuntimeModel(frozen).state_dict())
        assert not rt._plans
        assert torch.equal(rt(x), before)


def test_fallback_on_unknown_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    net = Net().eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rt = R.runtime(net)
    assert rt.fallback_reason and any("per-layer" in str(x.message) for x in w)
    x = torch.randn(3, 4)
    assert torch.equal(rt(x), net(x))
