"""binary_conv2d / binary_linear vs F.conv2d / F.linear on the dequantized tensors."""
import pytest
import torch
import torch.nn.functional as F

from gdnsq_kernels import binary_conv2d, binary_linear
from gdnsq_kernels.backend import triton_interpreter_enabled
from gdnsq_kernels.binary import PackedBinaryWeight, pack_conv_weight, pack_linear_weight

# torch warns that its own padding='same' reference conv with an even kernel copies the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Triton on CPU tensors needs the interpreter (conftest enables it on machines without CUDA).
TRITON_DEVICES = (["cpu"] if triton_interpreter_enabled() else []) + (["cuda"] if CUDA else [])
CPU_BACKENDS = ("reference", "cpu", "torch")


def _affine(device, O, beta):
    s_c = (torch.rand(O, device=device) + 0.05) * 0.1
    m_c = -torch.rand(O, device=device) * 0.1
    return s_c, m_c, torch.tensor(0.37, device=device), torch.tensor(beta, device=device)


def _deq(j, k, s_a, beta, s_c, m_c):
    shape = (-1,) + (1,) * (k.dim() - 1)
    a = beta + s_a * j.to(s_a.dtype)
    w = m_c.reshape(shape) + s_c.reshape(shape) * k.to(s_c.dtype)
    return a, w


def _check_close(out, ref32, bound, taps):
    """Equal to the float32 op within float32 rounding.

    The float32 op itself (oneDNN may use Winograd) errs by up to ~sqrt(taps) eps sum|w||a| in
    practice, so the bound is 4 sqrt(taps) eps sum|w||a|; the strict check is against float64.
    """
    assert out.dtype == torch.float32 and out.shape == ref32.shape
    tol = 4 * taps ** 0.5 * torch.finfo(torch.float32).eps * bound + 1e-30
    err = (out.double() - ref32.double()).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g}, tol {tol.min().item():.3g}"


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 F.conv2d used as a reference must not run in TF32 on a GPU.

    Set through the public precision API and restored by hand: monkeypatching
    ``torch.backends.cuda.matmul.allow_tf32`` breaks on torch >= 2.13, which serves it through
    ``__getattr__`` (pytest's undo then tries to delete an attribute that does not exist).
    """
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _conv_case(device, backend, N, C, O, H, stride, padding, beta, dilation=1, kernel=3, bias=True):
    j = torch.randint(0, 2, (N, C, H, H), device=device, dtype=torch.uint8)
    k = torch.randint(0, 2, (O, C, kernel, kernel), device=device, dtype=torch.uint8)
    s_c, m_c, s_a, b = _affine(device, O, beta)
    bias_t = torch.randn(O, device=device) if bias else None
    a, w = _deq(j, k, s_a, b, s_c, m_c)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    out = binary_conv2d(j, s_a, b, k, s_c, m_c, bias_t, **kw, backend=backend)
    ref32 = F.conv2d(a, w, bias_t, **kw)
    bound = F.conv2d(a.abs(), w.abs(), None if bias_t is None else bias_t.abs(), **kw)
    _check_close(out, ref32, bound, C * kernel * kernel + 1)
    # The float64 oracle: the packed path is the exact value rounded once to float32
    # (within half an ulp, plus float64 noise from the cancelling correction terms).
    a64, w64 = _deq(j, k, s_a.double(), b.double(), s_c.double(), m_c.double())
    ref64 = F.conv2d(a64, w64, None if bias_t is None else bias_t.double(), **kw)
    err = (out.double() - ref64).abs()
    assert bool((err <= 0.5 * torch.finfo(torch.float32).eps * ref64.abs() + 1e-12 * bound.double()).all())
    return out


# ResNet-20 3x3 convs (CIFAR): 16->16 @32, 16->32 s2 @32, 32->32 @16, 32->64 s2 @16, 64->64 @8.
RESNET20 = [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("C,O,H,stride", RESNET20, ids=[f"{c}-{o}-{h}-s{s}" for c, o, h, s in RESNET20])
@pytest.mark.parametrize("beta", [0.0, -0.25])
def test_conv_resnet20_layers(device, backend, C, O, H, stride, beta, poison_empty):
    if device == "cuda" and backend == "cpu":
        pytest.skip("cpu backend takes CPU tensors only")
    _conv_case(device, backend, 2, C, O, H, stride, 1, beta)


@pytest.mark.parametrize("C,O,H,stride,padding", [(16, 32, 16, 2, 1), (33, 5, 6, 1, 1), (3, 4, 9, 1, "same")])
@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_conv_cpu_without_cpp(monkeypatch, C, O, H, stride, padding, beta):
    """The cpu backend's fallback (float conv of the codes, NumPy popcount) when no compiler."""
    from gdnsq_kernels.binary import _dispatch as binary_dispatch, conv2d

    monkeypatch.setattr(binary_dispatch, "cpp_gemm_available", lambda: False)
    _conv_case("cpu", "cpu", 2, C, O, H, stride, padding, beta, kernel=2 if padding == "same" else 3)
    _conv_case("cpu", "cpu", 1, C, O, 3, 1, 0, beta)  # 1 output position: the NumPy popcount branch
    monkeypatch.setattr(conv2d, "CPU_CONV_STRATEGY", "float")  # whatever the size rule says
    _conv_case("cpu", "cpu", 1, C, O, H, stride, padding, beta, kernel=2 if padding == "same" else 3)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("C,O,H,stride", [(16, 32, 8, 2), (33, 5, 6, 1)])
def test_conv_triton(device, C, O, H, stride, poison_empty):
    """The Triton GEMM inside the conv (interpreter on CPU: small shapes)."""
    _conv_case(device, "triton", 1, C, O, H, stride, 1, -0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride,padding,dilation,kernel", [
    ((2, 1), (2, 0), (1, 2), 3), (1, "same", 2, 2), (1, "valid", 1, 3), (3, 2, 1, 1), (1, (0, 3), 1, 5),
])
@pytest.mark.parametrize("beta", [0.0, 0.6, -1.3])
def test_conv_awkward(device, stride, padding, dilation, kernel, beta, poison_empty):
    _conv_case(device, "cpu" if device == "cpu" else "triton", 2, 3, 4, 9, stride, padding, beta,
               dilation=dilation, kernel=kernel, bias=False)


def test_conv_padding_is_the_value_zero_not_beta():
    """With beta != 0 a border output differs from the interior formula (guards the correction)."""
    j = torch.ones((1, 1, 3, 3), dtype=torch.uint8)
    k = torch.ones((1, 1, 3, 3), dtype=torch.uint8)
    out = binary_conv2d(j, 1.0, 1.0, k, torch.ones(1), torch.zeros(1), padding=1)
    # a = 2 everywhere, w = 1: an output sums 2 over its real taps (4 at a corner, 9 in the centre).
    assert out[0, 0, 0, 0].item() == 8.0 and out[0, 0, 1, 1].item() == 18.0 and out[0, 0, 0, 1].item() == 12.0


def test_packed_weight_reuse_and_round_trip(poison_empty):
    j = torch.randint(0, 2, (2, 40, 6, 6), dtype=torch.uint8)
    k = torch.randint(0, 2, (8, 40, 3, 3), dtype=torch.uint8)
    s_c, m_c, s_a, b = _affine("cpu", 8, 0.2)
    pw = pack_conv_weight(k, s_c, m_c)
    assert isinstance(pw, PackedBinaryWeight)
    assert pw.packed.dtype == torch.int32 and pw.packed.shape == (8, 9 * 2)
    assert pw.nbytes == 8 * 18 * 4
    assert torch.equal(pw.codes(), k)
    assert torch.equal(pw.ones, k.sum(dim=(1, 2, 3)).to(torch.int32))
    direct = binary_conv2d(j, s_a, b, k, s_c, m_c, padding=1, stride=2)
    reused = binary_conv2d(j, s_a, b, pw, padding=1, stride=2)
    assert torch.equal(direct, reused)
    ref = binary_conv2d(j, s_a, b, pw, padding=1, stride=2, backend="reference")
    assert torch.allclose(direct, ref, rtol=1e-6, atol=1e-6)
    # The weight caches per-geometry counts: other geometries and input sizes on the same
    # object must not reuse them.
    for kw, jj in ((dict(padding=0), j), (dict(padding=(2, 1), dilation=2), j), (dict(padding=1), j[:, :, :5, :4])):
        for backend in ("cpu", "torch"):
            got = binary_conv2d(jj, s_a, b, pw, **kw, backend=backend)
            want = binary_conv2d(jj, s_a, b, k, s_c, m_c, **kw, backend="reference")
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CPU_BACKENDS + ("triton",))
@pytest.mark.parametrize("lead,K,O", [((3,), 1, 4), ((2, 3), 33, 5), ((1,), 1000, 3), ((70,), 100, 9)])
@pytest.mark.parametrize("beta", [0.0, -0.4])
def test_linear(device, backend, lead, K, O, beta, poison_empty):
    if device == "cuda" and backend == "cpu":
        pytest.skip("cpu backend takes CPU tensors only")
    if backend == "triton" and device not in TRITON_DEVICES:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    if backend == "triton" and device == "cpu" and lead == (70,):
        pytest.skip("kept small under the interpreter")
    j = torch.randint(0, 2, lead + (K,), device=device, dtype=torch.bool)
    k = torch.randint(0, 2, (O, K), device=device, dtype=torch.int32)
    s_c, m_c, s_a, b = _affine(device, O, beta)
    bias = torch.randn(O, device=device)
    a, w = _deq(j, k, s_a, b, s_c, m_c)
    out = binary_linear(j, s_a, b, k, s_c, m_c, bias, backend=backend)
    assert out.shape == lead + (O,)
    _check_close(out, F.linear(a, w, bias), F.linear(a.abs(), w.abs(), bias.abs()), K + 1)
    pw = pack_linear_weight(k, s_c, m_c)
    assert torch.equal(binary_linear(j, s_a, b, pw, bias=bias, backend=backend), out)
    assert torch.equal(pw.codes(), k.to(torch.uint8))


def test_errors():
    j = torch.randint(0, 2, (1, 4, 5, 5))
    k = torch.randint(0, 2, (3, 4, 3, 3))
    s, m = torch.ones(3), torch.zeros(3)
    with pytest.raises(TypeError, match="act_codes must be a bool or integer"):
        binary_conv2d(j.float(), 1.0, 0.0, k, s, m)
    with pytest.raises(ValueError, match="act_codes must contain only 0 and 1"):
        binary_conv2d(j * 2, 1.0, 0.0, k, s, m)
    with pytest.raises(ValueError, match="act_codes has 5 channels but the weight expects 4"):
        binary_conv2d(torch.zeros(1, 5, 5, 5, dtype=torch.uint8), 1.0, 0.0, k, s, m)
    with pytest.raises(ValueError, match="weight_step must have shape"):
        binary_conv2d(j, 1.0, 0.0, k, torch.ones(2), m)
    with pytest.raises(ValueError, match="act_step must be a number or a 1-element tensor"):
        binary_conv2d(j, torch.ones(2), 0.0, k, s, m)
    pw = pack_conv_weight(k, s, m)
    with pytest.raises(ValueError, match="weight_step and weight_min must be None"):
        binary_conv2d(j, 1.0, 0.0, pw, s, m)
    with pytest.raises(ValueError, match="wrong kind"):
        binary_linear(torch.zeros(2, 36, dtype=torch.uint8), 1.0, 0.0, pw)
    with pytest.raises(ValueError, match="weight_step and weight_min are required"):
        binary_conv2d(j, 1.0, 0.0, k)
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        binary_conv2d(j, 1.0, 0.0, k, s, m, stride=2, padding="same")
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        binary_conv2d(j, 1.0, 0.0, k, s, m, stride=1.5)
    with pytest.raises(ValueError, match="too small"):
        binary_conv2d(torch.zeros(1, 4, 2, 2, dtype=torch.uint8), 1.0, 0.0, k, s, m)
    with pytest.raises(ValueError, match=r"act_codes must have shape \(\.\.\., 7\)"):
        binary_linear(torch.zeros(2, 6, dtype=torch.uint8), 1.0, 0.0, torch.ones(3, 7, dtype=torch.uint8), s, m)
    with pytest.raises(ValueError, match="bias must have shape"):
        binary_conv2d(j, 1.0, 0.0, k, s, m, bias=torch.zeros(2))
