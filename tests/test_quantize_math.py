"""Quantizer kernels against the reference where the small-tensor tests cannot reach.

* sizes that reach the C++ multi-chunk reduction (chunks of 16,384 elements), its parallel
  branch (> 65,536 elements, with two threads) and the Triton finish kernel's loop over partial
  sums (> 1024 programs of 1024 elements, i.e. > 1,048,576 elements; one case, the interpreter
  is slow);
* the ``need_grad_x=False`` / ``need_grad_params=False`` (``need_grad_w`` / ``need_grad_step``)
  branches, checked for values;
* grids with a fractional number of bits in (0, 1) and weight steps wider than the weight range;
* non-contiguous and expanded parameter tensors.
"""
import pytest
import torch

from gdnsq_kernels import quantize as Q
from gdnsq_kernels.quantize import reference as R

pytestmark = pytest.mark.usefixtures("assert_cpp_ran")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FAST = [(d, b) for d in DEVICES for b in (("cpu", "torch") if d == "cpu" else ("triton", "torch"))]
ALL = [(d, b) for d in DEVICES for b in (("triton", "cpu", "torch") if d == "cpu" else ("triton", "torch"))]


@pytest.fixture
def two_threads():
    """At least two intra-op threads, so that at::parallel_for really splits the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _act_params(device, step=-2.7, rng=0.6, off=-0.3):
    return [torch.tensor(v, device=device) for v in (step, rng, off)]


def _forward_rtol(x, backend):
    # The Triton interpreter casts float32 -> bfloat16 by truncation (triton.runtime.interpreter
    # cast_impl passes no rounding mode); compiled kernels round to nearest even like torch. So
    # under the interpreter a bfloat16 output may be one ulp (up to 2**-7 relative) off the reference.
    if backend == "triton" and not x.is_cuda and x.dtype == torch.bfloat16:
        return 2.0 ** -7
    return 1e-6


def _assert_act(x, params, backend, seed, dither, g=None, **need):
    g = torch.randn(x.shape, device=x.device, dtype=x.dtype) if g is None else g
    torch.testing.assert_close(Q.activation_forward(x, *params, backend=backend),
                               R.activation_forward(x, *params), rtol=_forward_rtol(x, backend), atol=1e-6)
    ref = R.activation_backward(g, x, *params, seed, dither)
    out = Q.activation_backward(g, x, *params, seed, dither, backend=backend, **need)
    want_x, want_p = need.get("need_grad_x", True), need.get("need_grad_params", True)
    if want_x:
        torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    else:
        assert out[0] is None
    scale = float(g.double().abs().sum()) + 1.0
    for o, r in zip(out[1:], ref[1:]):
        if want_p:
            # sums over up to ~1M float32 terms in a different order: relative to sum |g|
            torch.testing.assert_close(o.double(), r.double(), rtol=1e-5, atol=1e-6 * scale)
        else:
            assert o is None
    return out, ref


@pytest.mark.parametrize("device,backend", FAST, ids=[f"{d}-{b}" for d, b in FAST])
@pytest.mark.parametrize("n", [3 * 16384 + 77, 5 * 16384 + 1001], ids=["3chunks", "5chunks-parallel"])
@pytest.mark.parametrize("dither", [False, True], ids=["nodither", "dither"])
def test_activation_large_reductions(device, backend, n, dither, two_threads, poison_empty):
    x = torch.randn(n, device=device) * 1.5
    _assert_act(x, _act_params(device), backend, seed=2024, dither=dither)
    # the same elements as a 4-D tensor: the dither index is the flat row-major index
    _assert_act(x[: (n // 12) * 12].reshape(2, 3, 2, -1), _act_params(device), backend, seed=7, dither=dither)


@pytest.mark.parametrize("device,backend", [c for c in ALL if c[1] == "triton"],
                         ids=[f"{d}-{b}" for d, b in ALL if b == "triton"])
def test_triton_finish_kernel_loop(device, backend):
    # 1024 * 1024 + 3000 elements: 1027 partial-sum rows, two passes of the finish kernel's loop
    # (backward only: the interpreter takes ~20 s per pass over a million elements)
    n = 1024 * 1024 + 3000
    x = torch.randn(n, device=device) * 1.5
    g = torch.randn(n, device=device)
    params = _act_params(device)
    out = Q.activation_backward(g, x, *params, 99, True, backend=backend, need_grad_x=False)
    ref = R.activation_backward(g, x, *params, 99, True)
    scale = float(g.double().abs().sum())
    for o, r in zip(out[1:], ref[1:]):
        torch.testing.assert_close(o.double(), r.double(), rtol=1e-5, atol=1e-6 * scale)
    # the rows past the first 1024 partial sums must be counted: without them the sums move
    head = R.activation_backward(g[: 1024 * 1024], x[: 1024 * 1024], *params, 99, True)
    assert abs(float(out[3]) - float(head[3])) > 10 * abs(float(out[3]) - float(ref[3]))


@pytest.mark.parametrize("device,backend", FAST, ids=[f"{d}-{b}" for d, b in FAST])
@pytest.mark.parametrize("shape", [(3, 40000), (200, 700), (1, 70001)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [True, False], ids=["perchannel", "pertensor"])
def test_weight_large(device, backend, shape, per_channel, two_threads, poison_empty):
    w = torch.randn(shape, device=device) * 0.3
    c = shape[0]
    step = (-5.0 - torch.rand(c, device=device)) if per_channel else torch.tensor([-5.3], device=device)
    yr, zr = R.weight_forward(w, step)
    y, z = Q.weight_forward(w, step, backend=backend)
    torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, zr, rtol=0, atol=0)
    g = torch.randn(shape, device=device)
    for dither in (False, True):
        _, gs_r = R.weight_backward(g, w, step, zr, 31, dither)
        _, gs = Q.weight_backward(g, w, step, z, 31, dither, backend=backend)
        scale = float(g.double().abs().sum()) + 1.0
        torch.testing.assert_close(gs.double(), gs_r.double(), rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("device,backend", ALL, ids=[f"{d}-{b}" for d, b in ALL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_activation_need_grad_branches(device, backend, dtype, poison_empty):
    x = (torch.randn(3, 5, 7, device=device) * 1.5).to(dtype)
    g = torch.randn(x.shape, device=device).to(dtype)
    for dither in (False, True):
        _assert_act(x, _act_params(device), backend, 5, dither, g=g, need_grad_x=False)
        _assert_act(x, _act_params(device), backend, 5, dither, g=g, need_grad_params=False)
        _assert_act(x, _act_params(device), backend, 5, dither, g=g, need_grad_x=False,
                    need_grad_params=False)


@pytest.mark.parametrize("device,backend", ALL, ids=[f"{d}-{b}" for d, b in ALL])
def test_weight_need_grad_branches(device, backend, poison_empty):
    w = torch.randn(6, 3, 3, 3, device=device) * 0.3
    step = -4.0 - torch.rand(6, device=device)
    _, z = R.weight_forward(w, step)
    g = torch.randn(w.shape, device=device)
    _, gs_r = R.weight_backward(g, w, step, z, 3, True)
    gw, gs = Q.weight_backward(g, w, step, z, 3, True, backend=backend, need_grad_w=False)
    assert gw is None
    torch.testing.assert_close(gs, gs_r, rtol=1e-5, atol=1e-6)
    gw, gs = Q.weight_backward(g, w, step, z, 3, True, backend=backend, need_grad_step=False)
    assert gs is None
    torch.testing.assert_close(gw, g, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", ALL, ids=[f"{d}-{b}" for d, b in ALL])
@pytest.mark.parametrize("bits", [0.1, 0.5, 0.9])
def test_fractional_bits_below_one(device, backend, bits, poison_empty):
    # log2_range - log2_step = bits in (0, 1): between one and two levels; hi = lo + Q - s < lo + s
    x = torch.linspace(-2.0, 2.0, 301, device=device)
    params = _act_params(device, step=-1.3, rng=-1.3 + bits, off=-0.4)
    out, _ = _assert_act(x, params, backend, seed=11, dither=True)
    y = Q.activation_forward(x, *params, backend=backend)
    # METHOD Part B: codes j in {0, ..., round(Q/s - 1)}; with Q/s < 2 the levels are {lo} when
    # Q/s < 1.5 (bits < log2 1.5), else {lo, lo + s} (threshold lo + s/2 above the clamp top)
    s, q = 2.0 ** -1.3, 2.0 ** (-1.3 + bits)
    levels = sorted({round(v, 5) for v in y.tolist()})
    want = [-0.4] if q / s < 1.5 else [-0.4, -0.4 + s]
    assert levels == pytest.approx(want, abs=1e-5)
    # weights: steps wider than the channel's range round every weight to 0 or 1 code
    w = torch.randn(4, 50, device=device) * 0.1
    span = (w.amax(1) - w.amin(1))
    step = torch.log2(span / bits)  # range / s = bits < 1
    yr, zr = R.weight_forward(w, step)
    yq, zq = Q.weight_forward(w, step, backend=backend)
    torch.testing.assert_close(yq, yr, rtol=1e-6, atol=1e-6)
    codes = torch.round((yq - zq[:, None]) / torch.exp2(step)[:, None])
    assert set(codes.unique().tolist()) <= {0.0, 1.0}
    g = torch.randn(w.shape, device=device)
    torch.testing.assert_close(Q.weight_backward(g, w, step, zq, 4, True, backend=backend)[1],
                               R.weight_backward(g, w, step, zr, 4, True)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ALL, ids=[f"{d}-{b}" for d, b in ALL])
def test_noncontiguous_and_expanded_parameters(device, backend, poison_empty):
    x = torch.randn(4, 9, device=device) * 1.5
    g = torch.randn(4, 9, device=device)
    plain = _act_params(device)
    # each activation parameter as a one-element view: expanded from a 0-d (stride 0), the middle
    # of three elements (storage offset 1, stride 2: a kernel that reads the storage's start
    # instead of the view gets 9.0), shape (1,)
    nine = torch.tensor(9.0, device=device)
    odd = [plain[0].expand(1),
           torch.stack([nine, plain[1], nine])[1::2],
           plain[2].reshape(1)]
    torch.testing.assert_close(Q.activation_forward(x, *odd, backend=backend),
                               R.activation_forward(x, *plain), rtol=1e-6, atol=1e-6)  # an ulp from exp2 of a non-integer log2
    out = Q.activation_backward(g, x, *odd, 8, True, backend=backend)
    ref = R.activation_backward(g, x, *plain, 8, True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.reshape(r.shape), r, rtol=1e-5, atol=1e-6)
    # weight steps: an expanded scalar (stride 0) and a strided slice of a longer tensor that
    # starts at storage offset 1
    w = torch.randn(6, 2, 3, 3, device=device) * 0.3
    base = -4.0 - torch.rand(12, device=device)
    for step in (torch.tensor(-4.2, device=device).expand(6), base[1::2]):
        assert not step.is_contiguous()
        yr, zr = R.weight_forward(w, step.contiguous())
        y, z = Q.weight_forward(w, step, backend=backend)
        torch.testing.assert_close(y, yr, rtol=1e-6, atol=1e-6)  # an ulp from exp2 of a non-integer log2
        gw = torch.randn(w.shape, device=device)
        gs = Q.weight_backward(gw, w, step, z, 2, True, backend=backend)[1]
        gs_r = R.weight_backward(gw, w, step.contiguous(), zr, 2, True)[1]
        assert gs.shape == step.shape
        torch.testing.assert_close(gs, gs_r, rtol=1e-5, atol=1e-6)
    # a non-contiguous weight (channels_last) with a strided step
    wcl = w.to(memory_format=torch.channels_last)
    y, z = Q.weight_forward(wcl, base[1::2], backend=backend)
    torch.testing.assert_close(y, R.weight_forward(w, base[1::2].contiguous())[0], rtol=1e-6, atol=1e-6)  # an ulp from exp2 of a non-integer log2
