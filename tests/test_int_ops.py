"""The exact integer kernels (gdnsq_kernels.int_ops + csrc/int_ops.cpp).

Oracle: gdnsq_kernels.int_reference (F.conv2d in float64 on the codes, int64 matmuls, unpacked
bits). Every ISA build this CPU can run is tested on awkward shapes, one and two threads must
give the same tensors, and bad arguments get one-line errors.
"""
from __future__ import annotations

import pytest
import torch

from gdnsq_kernels import cpu_deploy
from gdnsq_kernels import int_ops as I
from gdnsq_kernels import int_reference as R

ISAS = cpu_deploy.supported_isas()
ops = torch.ops.gdnsq


def _codes(shape, high, seed):
    return torch.randint(0, high, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _weights(shape, seed, low=-128, high=128):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed + 1))


def _words(shape, seed):
    return torch.randint(-2**63, 2**63 - 1, shape, dtype=torch.int64, generator=torch.Generator().manual_seed(seed))


# (N, H, W, C_in, C_out, k, stride, padding, dilation, groups, pad_code, code bound)
CONV_CASES = [
    (2, 7, 9, 5, 7, 3, 1, 1, 1, 1, 3, 16),        # odd channels, C_in not a multiple of 4, 4-bit codes
    (1, 8, 8, 16, 32, 1, 1, 0, 1, 1, 0, 16),      # 1x1 pointwise: the input is read in place
    (3, 9, 8, 12, 20, 3, 2, 1, 1, 2, 5, 256),     # batch 3, stride 2, groups 2, 8-bit codes
    (1, 15, 15, 3, 70, 7, 2, 3, 1, 1, 1, 256),    # 7x7 stem shape: 64 + 6 output channels
    (1, 10, 10, 65, 130, 3, 1, 1, 2, 1, 0, 256),  # C_in 65 (not a multiple of 64), dilation 2, 3 chunks
    (1, 6, 5, 8, 48, 3, 1, 1, 1, 1, 9, 16),       # 3 blocks of 16 (8-pixel tiles)
    (2, 5, 7, 4, 16, 3, 1, 1, 1, 1, 2, 256),      # 1 block of 16 (16-pixel tiles)
    (1, 6, 6, 6, 10, 3, 1, 0, 1, 2, 0, 200),      # groups with 3 channels each: re-laid-out input
    (1, 5, 6, 9, 6, 1, 2, 0, 1, 3, 0, 256),       # 1x1 stride 2, 3 groups
    (1, 11, 10, 8, 8, 3, 1, 1, 1, 8, 2, 16),      # depthwise, C < 16
    (2, 14, 13, 24, 24, 3, 2, 1, 1, 24, 7, 256),  # depthwise, stride 2, C = 16 + 8
    (1, 7, 7, 96, 96, 5, 1, 2, 1, 96, 9, 16),     # depthwise 5x5
    (1, 8, 8, 32, 32, 3, 1, 0, 1, 32, 0, 256),    # depthwise without padding: read in place
    (0, 5, 5, 4, 4, 3, 1, 1, 1, 1, 0, 16),        # empty batch
]


def _conv_id(case):
    n, h, w, c, o, k, s, p, d, g, pc, hi = case
    return f"n{n}-{h}x{w}-c{c}-o{o}-k{k}-s{s}-p{p}-d{d}-g{g}-pad{pc}-codes{hi}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_int_conv2d_matches_reference(isa, case):
    n, h, w, c, o, k, s, p, d, g, pad_code, hi = case
    x = _codes((n, h, w, c), hi, seed=len(_conv_id(case)))
    wt = _weights((o, k, k, c // g), seed=h)
    out = I.int_conv2d(x, wt, s, p, d, g, pad_code, isa=isa)
    assert out.dtype == torch.int32 and out.is_contiguous()
    assert torch.equal(out, R.int_conv2d(x, wt, s, p, d, g, pad_code))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("code, weight", [(255, -128), (255, 127), (128, -128), (127, -128)])
def test_int_conv2d_extreme_codes(isa, code, weight):
    """The largest |code x weight| pair sums: vpmaddubsw would saturate them (int16) above 127."""
    x = torch.full((1, 4, 5, 32), code, dtype=torch.uint8)
    wt = torch.full((17, 3, 3, 32), weight, dtype=torch.int8)
    out = I.int_conv2d(x, wt, padding=1, pad_code=code, isa=isa)
    assert torch.equal(out, torch.full_like(out, 9 * 32 * code * weight))
    assert torch.equal(out, R.int_conv2d(x, wt, padding=1, pad_code=code))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("lead, k, n", [((1,), 5, 3), ((7,), 64, 17), ((13,), 130, 100), ((2, 3), 768, 33),
                                        ((0,), 8, 8)])
def test_int_linear_matches_reference(isa, lead, k, n):
    x = _codes(lead + (k,), 256, seed=k)
    w = _weights((n, k), seed=n)
    out = I.int_linear(x, w, isa=isa)
    assert out.shape == lead + (n,) and out.dtype == torch.int32
    assert torch.equal(out, R.int_linear(x, w))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("xnor", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (5, 63, 9), (9, 64, 33), (17, 65, 8), (6, 777, 40), (0, 10, 3)])
def test_popcount_linear_matches_reference(isa, xnor, m, k, n):
    words = -(-k // 64)
    x, w = _words((m, words), seed=k), _words((n, words), seed=k + 1)  # bits past k are random too
    out = I.popcount_linear(x, w, k, xnor=xnor, isa=isa)
    assert out.shape == (m, n) and out.dtype == torch.int32
    assert torch.equal(out, R.popcount_linear(x, w, k, xnor))


# ----------------------------------------------------------------------------- threads, packing


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("isa", ISAS)
def test_two_threads_give_the_same_tensors(isa, two_threads):
    """Sizes above the per-thread work minimum, so that two threads really split each loop."""
    x = _codes((2, 16, 16, 64), 256, seed=1)
    dense, depthwise = _weights((96, 3, 3, 64), seed=2), _weights((64, 3, 3, 1), seed=3)
    xl, wl = _codes((40, 256), 256, seed=4), _weights((200, 256), seed=5)
    xb, wb = _words((64, 8), seed=6), _words((96, 8), seed=7)

    def run():
        return [I.int_conv2d(x, dense, padding=1, pad_code=3, isa=isa),
                I.int_conv2d(x, depthwise, stride=2, padding=1, groups=64, isa=isa),
                I.int_linear(xl, wl, isa=isa), I.popcount_linear(xb, wb, 500, xnor=True, isa=isa)]

    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(2)
    two = run()
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.equal(one[0], R.int_conv2d(x, dense, padding=1, pad_code=3))


def test_packed_weights_give_the_same_result():
    x = _codes((2, 6, 7, 12), 256, seed=8)
    w = _weights((20, 3, 3, 6), seed=9)
    packed = I.pack_int_conv_weight(w, groups=2)
    assert torch.equal(I.int_conv2d(x, packed, padding=1, groups=2), I.int_conv2d(x, w, padding=1, groups=2))
    wl = _weights((9, 12), seed=10)
    assert torch.equal(I.int_linear(x, I.pack_int_linear_weight(wl)), I.int_linear(x, wl))
    wb, xb = _words((5, 2), seed=11), _words((3, 2), seed=12)
    assert torch.equal(I.popcount_linear(xb, I.pack_popcount_weight(wb, 100), 100), I.popcount_linear(xb, wb, 100))
    assert I.pack_int_conv_weight(_weights((8, 3, 3, 1), seed=0), groups=8).depthwise


def test_packed_conv_layout():
    """Dense packing: [group][tap][C_in/4][16-padded C_out][4]."""
    w = _weights((3, 2, 1, 5), seed=13)  # O=3, kh=2, kw=1, Cg=5 -> Cq=2, Np=16
    p = I.pack_int_conv_weight(w).packed.view(1, 2, 2, 16, 4)
    for o in range(3):
        for t in range(2):
            for c in range(5):
                assert p[0, t, c // 4, o, c % 4] == w[o, t, 0, c]
    assert int(p[0, :, :, 3:].abs().sum()) == 0 and int(p[0, :, 1, :, 1:].abs().sum()) == 0


# ----------------------------------------------------------------------------- errors


def _x():
    return torch.zeros(1, 4, 4, 8, dtype=torch.uint8)


def _w():
    return torch.zeros(4, 3, 3, 8, dtype=torch.int8)


@pytest.mark.parametrize("call, err, match", [
    (lambda: I.int_conv2d(_x().float(), _w()), TypeError, "x must be torch.uint8"),
    (lambda: I.int_conv2d(_x(), _w().to(torch.uint8)), TypeError, "w must be torch.int8"),
    (lambda: I.int_conv2d(_x().to("meta"), _w()), ValueError, "x must be a CPU tensor"),
    (lambda: I.int_conv2d(_x()[0], _w()), ValueError, "x must be 4-D"),
    (lambda: I.int_conv2d(_x().transpose(1, 2), _w()), ValueError, "x must be contiguous"),
    (lambda: I.int_conv2d(_x(), _w()[..., :4]), ValueError, "x has C_in=8 channels"),
    (lambda: I.int_conv2d(_x(), _w(), pad_code=256), ValueError, "pad_code must be"),
    (lambda: I.int_conv2d(_x(), _w(), stride=0), ValueError, "stride must be >= 1"),
    (lambda: I.int_conv2d(_x(), _w(), padding=(1, 2, 3)), TypeError, "padding must be an int or a pair"),
    (lambda: I.int_conv2d(_x(), _w(), groups=3), ValueError, "divisible by groups=3"),
    (lambda: I.int_conv2d(_x(), I.pack_int_conv_weight(_w()), groups=2), ValueError, "packed for groups=1"),
    (lambda: I.int_conv2d(_x(), torch.zeros(4, 7, 7, 8, dtype=torch.int8)), ValueError, "smaller than"),
    (lambda: I.int_conv2d(_x(), _w(), isa="avx9"), ValueError, "isa must be one of"),
    (lambda: I.int_linear(torch.zeros(2, 5, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.int8)),
     ValueError, "K=4 features"),
    (lambda: I.int_linear(torch.tensor(3, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.int8)),
     ValueError, "x must be 1-D"),
    (lambda: I.int_linear([[1, 2]], torch.zeros(3, 2, dtype=torch.int8)), TypeError, "x must be a torch.Tensor"),
    (lambda: I.int_linear(torch.zeros(1, I.MAX_EXACT_K + 1, dtype=torch.uint8),
                          torch.zeros(1, I.MAX_EXACT_K + 1, dtype=torch.int8)), ValueError, "int32 sums could wrap"),
    (lambda: I.int_linear(torch.zeros(2, 4, dtype=torch.uint8), I.pack_int_conv_weight(_w())), ValueError,
     "pack_int_linear_weight"),
    (lambda: I.popcount_linear(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64), 200),
     ValueError, "ceil\\(k/64\\)=4 words"),
    (lambda: I.popcount_linear(torch.zeros(2, 1, dtype=torch.int32), torch.zeros(3, 1, dtype=torch.int64), 5),
     TypeError, "x_bits must be torch.int64"),
    (lambda: I.popcount_linear(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64), 0),
     ValueError, "k must be >= 1"),
])
def test_bad_arguments_get_one_line_errors(call, err, match):
    with pytest.raises(err, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_the_extension_checks_its_arguments():
    """The C++ entry points refuse what the Python checks would (for callers that skip them)."""
    ext = I.load_extension()
    x, w = _x(), I.pack_int_conv_weight(_w())
    with pytest.raises(RuntimeError, match="w_packed has"):
        ext.conv2d(x, w.packed[:-1].contiguous(), list(w.shape), [1, 1], [1, 1], [1, 1], 1, 0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.conv2d(x.transpose(1, 2), w.packed, list(w.shape), [1, 1], [1, 1], [1, 1], 1, 0)
    with pytest.raises(RuntimeError, match="pad_code"):
        ext.conv2d(x, w.packed, list(w.shape), [1, 1], [1, 1], [1, 1], 1, 300)
    with pytest.raises(RuntimeError, match="exceeds"):
        ext.conv2d(torch.zeros(1, 1, 1, I.MAX_EXACT_K + 1, dtype=torch.uint8), torch.zeros(1, dtype=torch.int8),
                   [1, 1, 1, I.MAX_EXACT_K + 1], [1, 1], [0, 0], [1, 1], 1, 0)
    with pytest.raises(RuntimeError, match="x_bits must be Long"):
        ext.popcount_linear(torch.zeros(2, 1, dtype=torch.int32), torch.zeros(8, dtype=torch.int64), 3, 5, False)
    assert ext.max_exact_k() == I.MAX_EXACT_K


# ----------------------------------------------------------------------------- custom ops


def test_opcheck_int_ops():
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    isa = cpu_deploy.default_isa()
    x, w = _codes((2, 5, 6, 6), 256, seed=14), I.pack_int_conv_weight(_weights((10, 3, 3, 3), seed=15), groups=2)
    torch.library.opcheck(ops.int_conv2d.default, (x, w.packed, list(w.shape), [2, 1], [1, 1], [1, 1], 2, 4, isa),
                          test_utils=tests)
    wl = I.pack_int_linear_weight(_weights((7, 6), seed=16))
    torch.library.opcheck(ops.int_linear.default, (x.view(-1, 6), wl.packed, 7, isa), test_utils=tests)
    wb = I.pack_popcount_weight(_words((5, 2), seed=17), 70)
    torch.library.opcheck(ops.popcount_linear.default, (_words((3, 2), seed=18), wb.packed, 5, 70, True, isa),
                          test_utils=tests)
