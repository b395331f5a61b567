"""Every quantizer backend against the reference: outputs and every gradient, awkward shapes.

On a CPU-only machine the Triton kernels run under the interpreter (tensors kept small); on a
CUDA machine the same tests run the compiled kernels (device "cuda").
"""
import pytest
import torch

from gdnsq_kernels import quantize as Q
from gdnsq_kernels.quantize import reference as R

from gdnsq_kernels.backend import triton_interpreter_enabled

# the "cpu" cases must reach the C++ kernels (conftest.assert_cpp_ran)
pytestmark = pytest.mark.usefixtures("assert_cpp_ran")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# 'triton' on CPU tensors is the interpreter: only where it is on (conftest turns it on when
# there is no CUDA); on a CUDA machine those cases would raise instead of testing anything.
CPU_BACKENDS = (("triton",) if triton_interpreter_enabled() else ()) + ("cpu", "torch")
CASES = [(d, b) for d in DEVICES for b in (CPU_BACKENDS if d == "cpu" else ("triton", "torch"))]
CASE_IDS = [f"{d}-{b}" for d, b in CASES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (log2_step, log2_range, offset): an exact power-of-two grid, and a non-integer one
ACT_PARAMS = [(-3.0, 1.0, -1.0), (-2.7, 0.6, -0.3)]


def _p(v, device, requires_grad=False):
    return torch.tensor(v, device=device, requires_grad=requires_grad)


def _close_y(actual, expected, backend=None):
    # forward: same arithmetic in every backend; the Triton kernels take s = 2**a from the
    # reference's own torch.exp2 and are bit-equal; others may differ by an ulp of exp2
    if backend == "triton":
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
        return
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-6, atol=1e-6, equal_nan=True)


def _close_sum(actual, expected, g):
    # parameter gradients are sums over elements: summation order differs between backends
    scale = float(g.detach().float().abs().sum()) + 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-4, atol=2e-6 * scale,
                               equal_nan=True)


def _act_check(x, params, backend, dither, seed=123):
    device = x.device
    a, gm, b = (_p(v, device) for v in params)
    yr = R.activation_forward(x, a, gm, b)
    y = Q.activation_forward(x, a, gm, b, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    _close_y(y, yr, backend)
    g = torch.randn(x.shape, device=device).to(x.dtype)
    ref = R.activation_backward(g, x, a, gm, b, seed, dither)
    out = Q.activation_backward(g, x, a, gm, b, seed, dither, backend=backend)
    assert out[0].dtype == x.dtype and out[0].shape == x.shape
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0, equal_nan=True)
    for o, r in zip(out[1:], ref[1:]):
        assert o.dim() == 0
        _close_sum(o, r, g)
    return out, ref


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (1025,), (2, 3, 5, 7), (3, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dither", [False, True], ids=["nodither", "dither"])
def test_activation_matches_reference(device, backend, shape, dither, poison_empty):
    x = torch.randn(shape, device=device) * 1.5
    for params in ACT_PARAMS:
        _act_check(x, params, backend, dither)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_activation_dtypes(device, backend, dtype, poison_empty):
    x = (torch.randn(3, 4, 5, 6, device=device) * 1.5).to(dtype)
    _act_check(x, ACT_PARAMS[0], backend, dither=True)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_activation_inf_nan(device, backend, poison_empty):
    x = torch.randn(40, device=device)
    x[3], x[7], x[11] = float("inf"), float("-inf"), float("nan")
    a, gm, b = (_p(v, device) for v in ACT_PARAMS[0])
    y = Q.activation_forward(x, a, gm, b, backend=backend)
    hi = -1.0 + 2.0 - 0.125
    assert y[3].item() == hi and y[7].item() == -1.0 and torch.isnan(y[11])
    assert torch.isfinite(y[torch.arange(40, device=device) != 11]).all()
    out, ref = _act_check(x, ACT_PARAMS[0], backend, dither=True)
    assert out[0][3] == 0 and out[0][7] == 0 and out[0][11] == 0
    assert torch.isnan(out[1]) and torch.isfinite(out[2]) and torch.isfinite(out[3])
    # without the NaN the step gradient is finite again
    x[11] = 0.0
    out, _ = _act_check(x, ACT_PARAMS[0], backend, dither=True)
    assert torch.isfinite(out[1])


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_activation_values_on_clamp_bounds(device, backend, poison_empty):
    """x exactly at lo and hi counts as inside (dx = g), as torch.clamp's gradient does."""
    x = torch.tensor([-1.0, 0.875, -1.0000001, 0.8750001, 0.0625, -0.9375], device=device)
    out, _ = _act_check(x, ACT_PARAMS[0], backend, dither=False)
    assert out[0][0] != 0 and out[0][1] != 0 and out[0][2] == 0 and out[0][3] == 0


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_activation_noncontiguous(device, backend, poison_empty):
    base = torch.randn(6, 9, device=device) * 1.5
    x = base.t()  # (9, 6), non-contiguous
    assert not x.is_contiguous()
    out, ref = _act_check(x, ACT_PARAMS[1], backend, dither=True)
    # the dither index is the logical row-major index: same as on a contiguous copy
    g = torch.ones_like(x)
    a, gm, b = (_p(v, device) for v in ACT_PARAMS[1])
    s1 = Q.activation_backward(g, x, a, gm, b, 9, True, backend=backend)[1]
    s2 = Q.activation_backward(g, x.contiguous(), a, gm, b, 9, True, backend=backend)[1]
    torch.testing.assert_close(s1, s2)


def _w_check(w, step, backend, dither, seed=77):
    yr, zr = R.weight_forward(w, step)
    y, z = Q.weight_forward(w, step, backend=backend)
    assert y.dtype == w.dtype and y.shape == w.shape and z.shape == (w.shape[0],)
    _close_y(y, yr, backend)
    torch.testing.assert_close(z.float(), zr.float(), rtol=0, atol=0, equal_nan=True)
    g = torch.randn(w.shape, device=w.device).to(w.dtype)
    gw_r, gs_r = R.weight_backward(g, w, step, zr, seed, dither)
    gw, gs = Q.weight_backward(g, w, step, z, seed, dither, backend=backend)
    torch.testing.assert_close(gw, g, rtol=0, atol=0)  # dw = g exactly
    assert gs.shape == step.shape
    scale = float(g.float().abs().sum()) + 1.0
    torch.testing.assert_close(gs.double(), gs_r.double(), rtol=1e-4, atol=2e-6 * scale,
                               equal_nan=True)
    return (y, z, gs), (yr, zr, gs_r)


W_SHAPES = [(1, 1), (5,), (3, 7), (4, 3, 3, 3), (2, 1100), (16, 8, 3, 3), (0, 3), (3, 0)]


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", W_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [True, False], ids=["perchannel", "pertensor"])
@pytest.mark.parametrize("dither", [False, True], ids=["nodither", "dither"])
def test_weight_matches_reference(device, backend, shape, per_channel, dither, poison_empty):
    w = torch.randn(shape, device=device) * 0.3
    c = shape[0]
    if per_channel:
        step = (-4.0 - torch.rand(c, device=device) * 2).to(torch.float32)
        step[: c // 2] = step[: c // 2].round()  # some exact powers of two, some not
    else:
        step = torch.tensor([-4.5], device=device)
    _w_check(w, step, backend, dither)
    _w_check(w, step.reshape(()) if not per_channel else step, backend, dither)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_dtypes(device, backend, dtype, poison_empty):
    w = (torch.randn(6, 4, 3, 3, device=device) * 0.3).to(dtype)
    _w_check(w, torch.full((6,), -4.0, device=device), backend, dither=True)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_weight_equal_valued_channel(device, backend, poison_empty):
    w = torch.randn(3, 2, 3, 3, device=device)
    w[1] = 0.37  # range 0: every code is 0, no division by zero, no NaN
    (y, z, gs), _ = _w_check(w, torch.full((3,), -3.0, device=device), backend, dither=True)
    assert torch.equal(y[1], w[1]) and z[1].item() == pytest.approx(0.37)
    assert torch.isfinite(y).all() and torch.isfinite(gs).all()


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_weight_nan_channel(device, backend, poison_empty):
    w = torch.randn(4, 40, device=device)
    w[2, 4] = float("nan")  # in the vectorised part of a 40-long row
    w[3, 38] = float("nan")  # in the scalar tail
    (y, z, gs), _ = _w_check(w, torch.full((4,), -3.0, device=device), backend, dither=False)
    assert torch.isnan(z[2:]).all() and torch.isnan(y[2:]).all() and torch.isnan(gs[2:]).all()
    assert torch.isfinite(y[:2]).all() and torch.isfinite(gs[:2]).all()


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_weight_noncontiguous(device, backend, poison_empty):
    w = (torch.randn(5, 4, 3, 3, device=device) * 0.3).permute(0, 2, 3, 1)
    assert not w.is_contiguous()
    _w_check(w, torch.full((5,), -4.0, device=device), backend, dither=True)


# grad_y in float32 for a half-precision input: the reference takes the gradient in the compute
# dtype, so a backend that first rounds it to x's dtype loses bits (bfloat16: 70000 + 2**-6
# becomes 70144) or overflows (float16: inf), and its parameter gradients differ.
MIXED_GRAD = 70000.015625


def _mixed_grad(shape, device):
    return torch.randint(0, 2, shape, device=device).float().mul(2).sub(1) * MIXED_GRAD


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # float16 dx is inf, as the reference's
def test_activation_float32_grad_of_half_input(device, backend, dtype, poison_empty):
    x = (torch.randn(2, 3, 5, 7, device=device) * 1.5).to(dtype)
    a, gm, b = (_p(v, device) for v in ACT_PARAMS[1])
    g = _mixed_grad(x.shape, device)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        ref = R.activation_backward(g, xl, a, gm, b, 5, True)
        out = Q.activation_backward(g, xl, a, gm, b, 5, True, backend=backend)
        assert out[0].dtype == dtype
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0, equal_nan=True)
        for o, r in zip(out[1:], ref[1:]):
            assert torch.isfinite(r)
            _close_sum(o, r, g)


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weight_float32_grad_of_half_input(device, backend, dtype, poison_empty):
    w = (torch.randn(6, 4, 3, 3, device=device) * 0.3).to(dtype)
    step = torch.full((6,), -4.0, device=device)
    g = _mixed_grad(w.shape, device)
    for layout in (torch.contiguous_format, torch.channels_last):
        wl = w.contiguous(memory_format=layout)
        zr = R.weight_forward(wl, step)[1]
        ref = R.weight_backward(g, wl, step, zr, 3, True)[1]
        out = Q.weight_backward(g, wl, step, zr, 3, True, backend=backend)[1]
        assert torch.isfinite(ref).all()
        # per channel: float32 summation error << 2**-9, the relative change from rounding g
        bound = 1e-5 * torch.exp2(step.double()) * g.double().abs().reshape(6, -1).sum(1)
        assert ((out.double() - ref.double()).abs() <= bound).all()


@pytest.mark.parametrize("device,backend", CASES, ids=CASE_IDS)
def test_dither_bit_exact(device, backend):
    """On-grid inputs make e = 0, so the step gradient is ln2*s^2*sum(g*r): one flipped
    dither sign would move it by 2*ln2*s^2*|r|*|g_i|, far above the float error."""
    n = 700
    s = 0.25
    k = torch.randint(0, 8, (n,), device=device).float()
    x = -1.0 + s * k  # on the activation grid of lo=-1, s=0.25, Q=2
    g = torch.randn(n, device=device).sign()
    a, gm, b = _p(-2.0, device), _p(1.0, device), _p(-1.0, device)
    for seed in (0, 1, 2**31 - 2):
        ref = R.activation_backward(g, x, a, gm, b, seed, True)[1]
        out = Q.activation_backward(g, x, a, gm, b, seed, True, backend=backend)[1]
        assert abs(float(out) - float(ref)) < 0.1 * 2 * 0.693 * s * s * 0.2887
    w = (s * torch.randint(0, 8, (7, 100), device=device)).float()
    w[:, 0] = 0.0  # zero point 0, every weight on the grid
    gw = torch.randn(7, 100, device=device).sign()
    step = torch.full((7,), -2.0, device=device)
    for seed in (5, 6):
        zr = torch.zeros(7, device=device)
        ref = R.weight_backward(gw, w, step, zr, seed, True)[1]
        out = Q.weight_backward(gw, w, step, zr, seed, True, backend=backend)[1]
        assert (out - ref).abs().max().item() < 0.1 * 2 * 0.693 * s * s * 0.2887


def test_cpu_isa_flags_follow_cpuinfo(monkeypatch):
    """The C++ quantizer is built for the widest vectors the CPU has, and plain without AVX2."""
    from gdnsq_kernels.quantize import cpu_quantize

    monkeypatch.setattr(cpu_quantize, "_cpu_flags", lambda: {"sse2"})
    assert cpu_quantize._isa_flags() == []
    monkeypatch.setattr(cpu_quantize, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert cpu_quantize._isa_flags() == ["-mavx2"]  # AVX-512 without BW/VL/DQ: 256-bit only
    full = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    monkeypatch.setattr(cpu_quantize, "_cpu_flags", lambda: full)
    flags = cpu_quantize._isa_flags()
    assert "-mavx512bw" in flags and "-mprefer-vector-width=512" in flags
    assert "-mavx512bf16" not in flags
    monkeypatch.setattr(cpu_quantize, "_cpu_flags", lambda: full | {"avx512_bf16"})
    assert "-mavx512bf16" in cpu_quantize._isa_flags()


@pytest.mark.parametrize("device,backend", [("cpu", "cpu"), ("cpu", "torch")], ids=["cpu-cpu", "cpu-torch"])
def test_activation_bfloat16_store_nan_and_denormal(device, backend, poison_empty):
    """bfloat16 outputs are rounded as the reference's float32 -> bfloat16 cast, bit for bit,
    also in vectors that hold a NaN or produce denormal values (which a hardware conversion
    that flushes denormals would turn into zeros)."""
    x = (torch.randn(70, device=device) * 1.5).to(torch.bfloat16)
    x[5], x[40] = float("nan"), float("-nan")
    for params in ACT_PARAMS:
        a, gm, b = (_p(v, device) for v in params)
        y = Q.activation_forward(x, a, gm, b, backend=backend)
        yr = R.activation_forward(x, a, gm, b)
        nan = torch.isnan(yr)
        assert torch.equal(torch.isnan(y), nan) and nan.sum() == 2  # NaN bits differ by backend
        assert torch.equal(y[~nan].view(torch.int16), yr[~nan].view(torch.int16))
    # a grid of denormal float32 steps: s = 2**-133, levels 0 .. 7s; x spans them
    tiny = torch.arange(-2, 40, device=device, dtype=torch.float32) * 2.0 ** -134
    xt = tiny.to(torch.bfloat16)
    a, gm, b = _p(-133.0, device), _p(-130.0, device), _p(0.0, device)
    y = Q.activation_forward(xt, a, gm, b, backend=backend)
    yr = R.activation_forward(xt, a, gm, b)
    assert (yr.float() != 0).any() and yr.float().abs().max() < 2.0 ** -126  # denormal levels
    assert torch.equal(y.view(torch.int16), yr.view(torch.int16))
