"""gdnsq.deploy.integer_sums: the int path's sums are exact whatever algorithm torch would pick.

The oracle is torch's int64 convolution / matmul (integer arithmetic, no rounding at all).
"""
import pytest
import torch
import torch.nn.functional as F

from gdnsq.deploy import integer_sums
from gdnsq.deploy.integer_sums import conv2d_sums, fp32_at_full_precision, linear_sums
from gdnsq.deploy.layers import DeployedConv2d, DeployedLinear, pack_codes

BITS = 4
# 16 images: torch runs a float32 3x3 stride-1 conv of a batch >= 16 on NNPACK (Winograd) when
# oneDNN is off; 8 channels and 8x8 pixels are enough for it to round.
BATCH, CH, HW = 16, 8, 8


def _codes(shape, seed):
    return torch.randint(0, 2**BITS, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _int_conv_layer(k: torch.Tensor, weight_min: float, act_offset: float) -> DeployedConv2d:
    """A W4A4 3x3 ``int``-path conv whose float arithmetic is all integers: weight step 1 and zero
    point ``weight_min`` (w = weight_min + k), activation step 1 and offset ``act_offset``
    (a = act_offset + j, codes 0..15)."""
    out_ch, cin, kh, kw = k.shape
    layer = DeployedConv2d(dict(kind="conv2d", weight_shape=(out_ch, cin, kh, kw), stride=(1, 1),
                                padding=(1, 1), dilation=(1, 1), groups=1, bias=False,
                                weight_bits=BITS, act_bits=BITS, path="int"))
    layer.weight_packed.copy_(pack_codes(k, BITS))
    layer.weight_step.fill_(1.0)
    layer.weight_min.fill_(weight_min)
    layer.act_log2_step.fill_(0.0)
    layer.act_log2_range.fill_(float(BITS))
    layer.act_offset.fill_(act_offset)
    return layer


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="torch built without NNPACK")
def test_winograd_conv_rounds_and_the_int_path_stays_exact():
    j = _codes((BATCH, CH, HW, HW), seed=1)
    k = _codes((CH, CH, 3, 3), seed=2)
    exact = F.conv2d(j, k, None, 1, 1)  # int64
    with torch.backends.mkldnn.flags(enabled=False):
        backend = torch._C._select_conv_backend(j.float(), k.float(), None, [1, 1], [1, 1], [1, 1],
                                                False, [0, 0], 1)
        assert backend == torch._C._ConvBackend.NnpackSpatial
        # the premise: plain float32 F.conv2d of these integer codes is not exact here
        assert not torch.equal(F.conv2d(j.float(), k.float(), None, 1, 1).double(), exact.double())

        sums = conv2d_sums(j.float(), k.float(), (1, 1), (1, 1), (1, 1), 1, fp32_exact=True)
        assert torch.equal(sums.double(), exact.double())

        # the whole deployed layer, offsets included: y = conv(a, w) with a = j - 1, w = k - 2,
        # zero at the padded border; every value is an integer far below 2**24
        layer = _int_conv_layer(k, weight_min=-2.0, act_offset=-1.0)
        out = layer((j - 1).float())
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), F.conv2d(j - 1, k - 2, None, 1, 1).double())


def test_reduced_float32_precision_sums_in_float64():
    """TF32 / bf16 modes would round codes above 2**11 / 2**8 before multiplying them."""
    j = _codes((2, 3, 5, 5), seed=3)
    k = _codes((4, 3, 3, 3), seed=4)
    a, b = _codes((6, 20), seed=5), _codes((7, 20), seed=6)
    assert fp32_at_full_precision(torch.device("cpu"), "matmul")  # the default: float32 fast path
    assert conv2d_sums(j.float(), k.float(), (1, 1), (1, 1), (1, 1), 1, True).dtype == torch.float32
    assert linear_sums(a.float(), b.float(), True).dtype == torch.float32
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # bf16 matmuls allowed (oneDNN on a CPU)
    try:
        assert not fp32_at_full_precision(torch.device("cpu"), "matmul")
        sums = conv2d_sums(j.float(), k.float(), (1, 1), (1, 1), (1, 1), 1, True)
        lin = linear_sums(a.float(), b.float(), True)
    finally:
        torch.set_float32_matmul_precision(before)
    assert sums.dtype == torch.float64 and torch.equal(sums, F.conv2d(j, k, None, 1, 1).double())
    assert lin.dtype == torch.float64 and torch.equal(lin, (a @ b.t()).double())


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, "conv"), reason="torch < 2.9: no per-op fp32 precision")
def test_reduced_precision_conv_is_not_run_as_a_float32_conv(monkeypatch):
    """A bf16 oneDNN conv mode leaves matmuls exact: the sums run as im2col + float32 GEMM."""
    j = _codes((2, 3, 5, 5), seed=7)
    k = _codes((4, 3, 3, 3), seed=8)
    conv_dtypes = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(integer_sums.F, "conv2d", lambda x, *args: conv_dtypes.append(x.dtype) or real_conv2d(x, *args))
    before = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        sums = conv2d_sums(j.float(), k.float(), (1, 1), (1, 1), (1, 1), 1, True)
    finally:
        torch.backends.mkldnn.conv.fp32_precision = before
    assert conv_dtypes == [] and sums.dtype == torch.float32
    assert torch.equal(sums.double(), F.conv2d(j, k, None, 1, 1).double())


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 2), (3, 1, 1, 4)])
@pytest.mark.parametrize("fp32_exact", [True, False])
def test_im2col_gemm_equals_integer_conv(monkeypatch, stride, padding, dilation, groups, fp32_exact):
    """The route taken when torch would pick an inexact backend (cuDNN, NNPACK, ...)."""
    monkeypatch.setattr(integer_sums, "conv_backend_sums_directly", lambda *args: False)
    j = _codes((3, 8, 9, 10), seed=9)
    k = _codes((12, 8 // groups, 3, 3), seed=10)
    geom = (stride, stride), (padding, padding), (dilation, dilation)
    sums = conv2d_sums(j.float(), k.float(), *geom, groups, fp32_exact)
    assert sums.dtype == (torch.float32 if fp32_exact else torch.float64)
    assert torch.equal(sums.double(), F.conv2d(j, k, None, *geom, groups).double())


def test_layer_without_exact_float64_sums_has_no_int_path():
    """W16A16: taps * (2**16 - 1)**2 reaches 2**53 at 2**21 + 65 taps; float64 would round."""
    cfg = dict(kind="linear", bias=False, weight_bits=16, act_bits=16, path="float")
    assert "int" in DeployedLinear(dict(cfg, weight_shape=(1, 2**21 + 64))).allowed_paths()
    assert "int" not in DeployedLinear(dict(cfg, weight_shape=(1, 2**21 + 65))).allowed_paths()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_sums_exact_on_cuda(groups):
    """cuDNN may pick Winograd or FFT (and TF32): the sums go through im2col + GEMM instead."""
    j = _codes((BATCH, 2 * CH, 2 * HW, 2 * HW), seed=11)
    k = _codes((2 * CH, 2 * CH // groups, 3, 3), seed=12)
    exact = F.conv2d(j, k, None, 1, 1, 1, groups)  # int64 on the CPU
    sums = conv2d_sums(j.float().cuda(), k.float().cuda(), (1, 1), (1, 1), (1, 1), groups, True)
    assert sums.is_cuda and torch.equal(sums.cpu().double(), exact.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int_conv_layer_on_cuda_equals_the_integer_result():
    j = _codes((BATCH, 2 * CH, 2 * HW, 2 * HW), seed=13)
    k = _codes((2 * CH, 2 * CH, 3, 3), seed=14)
    layer = _int_conv_layer(k, weight_min=-2.0, act_offset=-1.0).cuda()
    out = layer((j - 1).float().cuda())
    assert out.is_cuda and torch.equal(out.cpu().double(), F.conv2d(j - 1, k - 2, None, 1, 1).double())
