"""The exact integer kernels (gdnsq_kernels.int_ops + csrc/int_ops.cpp).

Oracle: gdnsq_kernels.int_reference (F.conv2d in float64 on the codes, int64 matmuls, unpacked
bits; the 1-bit conv is F.conv2d of the unpacked 0/1 values). Every ISA build this CPU can run is tested on awkward shapes, one and two threads must
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
    (1, 9, 7, 128, 128, 3, 1, 0, 1, 128, 0, 256), # depthwise, C = 2 x 64 without padding: read in place
    (3, 9, 11, 200, 200, 3, 2, 1, 1, 200, 4, 256),# depthwise, 3 blocks of 64 + 8, stride 2, tail tiles
    (1, 12, 12, 70, 70, 3, 1, 2, 2, 70, 1, 256),  # depthwise, dilation 2
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


# (N, H, W, C, O, k, stride, padding, dilation)
POPCOUNT_CONV_CASES = [
    (1, 9, 7, 100, 37, 3, 1, 1, 1),    # C not a multiple of 64 (tight rows), odd H/W, O not a multiple of 8
    (3, 8, 8, 16, 16, 3, 1, 1, 1),     # batch 3, CIFAR-ResNet 16 channels: 3 words per pixel
    (1, 15, 13, 3, 70, 7, 2, 3, 1),    # 7x7 stride 2 pad 3, 3 channels (147 bits in 3 words)
    (2, 9, 9, 64, 64, 3, 2, 1, 1),     # 3x3 stride 2, C = 64: per-tap words read from the padded image
    (1, 10, 10, 130, 20, 3, 1, 1, 2),  # dilation 2, C = 2 x 64 + 2
    (1, 5, 6, 65, 9, 1, 2, 0, 1),      # 1x1 stride 2 (per tap, in place)
    (2, 6, 6, 32, 130, 3, 1, 0, 1),    # no padding, tight, 17 blocks of 8 outputs
    (1, 7, 7, 128, 200, 3, 1, 1, 1),   # per tap, 2 words per tap, 7x7 map: tail tiles
    (3, 5, 9, 64, 8, 5, 1, 2, 1),      # 5x5, one block of 8 outputs (16-row tiles)
    (0, 5, 5, 64, 8, 3, 1, 1, 1),      # empty batch
]


def _pc_id(case):
    n, h, w, c, o, k, s, p, d = case
    return f"n{n}-{h}x{w}-c{c}-o{o}-k{k}-s{s}-p{p}-d{d}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", POPCOUNT_CONV_CASES, ids=_pc_id)
def test_popcount_conv2d_matches_reference(isa, case):
    n, h, w, c, o, k, s, p, d = case
    x = _words((n, h, w, -(-c // 64)), seed=len(_pc_id(case)))  # bits past C are random too
    w01 = torch.randint(0, 2, (o, k, k, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(o))
    out, sums = I.popcount_conv2d(x, w01, s, p, d, with_sums=True, isa=isa)
    ref_out, ref_sums = R.popcount_conv2d(x, w01, s, p, d)
    assert out.dtype == torch.int32 and sums.dtype == torch.int32
    assert torch.equal(out, ref_out) and torch.equal(sums, ref_sums)
    assert torch.equal(I.popcount_conv2d(x, I.pack_popcount_conv_weight(w01), s, p, d, isa=isa), ref_out)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("c", [40, 64])
def test_popcount_conv2d_pairs(isa, c):
    """Non-square kernel, (h, w) stride / padding / dilation pairs: vertical dilation with
    horizontal runs (tight rows from bit streams), and the per-tap layout."""
    x = _words((2, 9, 10, 1), seed=c)
    w01 = torch.randint(0, 2, (12, 3, 5, c), dtype=torch.uint8, generator=torch.Generator().manual_seed(c))
    for stride, padding, dilation in (((2, 1), (1, 2), (2, 1)), ((1, 3), (0, 1), (1, 2))):
        out, sums = I.popcount_conv2d(x, w01, stride, padding, dilation, with_sums=True, isa=isa)
        ref_out, ref_sums = R.popcount_conv2d(x, w01, stride, padding, dilation)
        assert torch.equal(out, ref_out) and torch.equal(sums, ref_sums)


@pytest.mark.parametrize("isa", ISAS)
def test_popcount_conv2d_from_codes(isa):
    """The W1A1 path end to end: 0/1 codes -> pack_channel_bits -> popcount_conv2d = the integer
    conv of the same codes (zero padding: pad_code 0)."""
    x = torch.randint(0, 2, (2, 11, 9, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    w01 = torch.randint(0, 2, (24, 3, 3, 80), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    out = I.popcount_conv2d(I.pack_channel_bits(x, isa=isa), w01, stride=2, padding=1, isa=isa)
    assert torch.equal(out, I.int_conv2d(x, w01, stride=2, padding=1, isa=isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 130), (4, 64), (1, 1), (3, 200), (2, 0, 7)])
def test_pack_channel_bits_matches_reference(isa, shape):
    codes = torch.randint(0, 4, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(sum(shape)))
    out = I.pack_channel_bits(codes, isa=isa)
    assert out.shape == shape[:-1] + (-(-shape[-1] // 64),) and out.dtype == torch.int64
    assert torch.equal(out, R.pack_channel_bits(codes))


def test_popcount_conv_weight_layouts():
    """Per tap when C is a multiple of 64 (or no word is saved), tight rows otherwise."""
    w = torch.randint(0, 2, (3, 3, 3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    tight = I.pack_popcount_conv_weight(w)
    assert tight.tight and tight.packed.numel() == 3 * 8  # ceil(9 * 16 / 64) = 3 words, 8 columns
    words = tight.packed.view(3, 8)
    for o in range(3):
        for t in range(9):
            for c in range(16):
                bit = t * 16 + c
                assert (int(words[bit // 64, o]) >> (bit % 64)) & 1 == int(w[o, t // 3, t % 3, c])
    assert int(words[:, 3:].abs().sum()) == 0
    assert not I.pack_popcount_conv_weight(torch.ones(2, 3, 3, 64, dtype=torch.uint8)).tight
    assert not I.pack_popcount_conv_weight(torch.ones(2, 1, 1, 100, dtype=torch.uint8)).tight
    two_taps = I.pack_popcount_conv_weight(torch.ones(1, 1, 2, 70, dtype=torch.bool))  # 140 bits: 3 words < 4
    assert two_taps.tight and int(two_taps.packed.view(3, 8)[2, 0]) == (1 << 12) - 1


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
    xb, wb = _words((200, 8), seed=6), _words((96, 8), seed=7)
    xc = _words((2, 16, 16, 1), seed=8)
    pc_tap, pc_tight = _weights((64, 3, 3, 64), seed=9, low=0, high=2), _weights((48, 3, 3, 40), seed=10, low=0, high=2)

    def run():
        return [I.int_conv2d(x, dense, padding=1, pad_code=3, isa=isa),
                I.int_conv2d(x, depthwise, stride=2, padding=1, groups=64, isa=isa),
                I.int_linear(xl, wl, isa=isa), I.popcount_linear(xb, wb, 500, xnor=True, isa=isa),
                *I.popcount_conv2d(xc, pc_tap, padding=1, with_sums=True, isa=isa),
                I.popcount_conv2d(xc, pc_tight, padding=1, isa=isa), I.pack_channel_bits(x, isa=isa)]

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
    (lambda: I.popcount_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int32), torch.ones(2, 3, 3, 8, dtype=torch.uint8)),
     TypeError, "x_bits must be torch.int64"),
    (lambda: I.popcount_conv2d(torch.zeros(1, 4, 4, 2, dtype=torch.int64), torch.ones(2, 3, 3, 8, dtype=torch.uint8)),
     ValueError, "ceil\\(C/64\\)=1 words per pixel"),
    (lambda: I.popcount_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int64), torch.ones(2, 3, 3, 8)),
     TypeError, "w01 must be an integer or bool"),
    (lambda: I.popcount_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int64), torch.ones(2, 3, 8, dtype=torch.uint8)),
     ValueError, "w01 must be 4-D"),
    (lambda: I.popcount_conv2d(torch.zeros(1, 2, 2, 1, dtype=torch.int64), torch.ones(2, 3, 3, 8, dtype=torch.uint8)),
     ValueError, "smaller than"),
    (lambda: I.popcount_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int64), torch.ones(2, 3, 3, 8, dtype=torch.uint8),
                               with_sums=1), TypeError, "with_sums must be a bool"),
    (lambda: I.pack_channel_bits(torch.zeros(2, 3)), TypeError, "codes must be torch.uint8"),
    (lambda: I.pack_channel_bits(torch.zeros(2, 0, dtype=torch.uint8)), ValueError, "at least one channel"),
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
    wp = I.pack_popcount_conv_weight(torch.ones(4, 3, 3, 8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="w_packed has"):
        ext.popcount_conv2d(torch.zeros(1, 4, 4, 1, dtype=torch.int64), wp.packed, list(wp.shape), [1, 1], [1, 1],
                            [1, 1], not wp.tight, False)
    with pytest.raises(RuntimeError, match="words per pixel"):
        ext.popcount_conv2d(torch.zeros(1, 4, 4, 2, dtype=torch.int64), wp.packed, list(wp.shape), [1, 1], [1, 1],
                            [1, 1], wp.tight, False)
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
    wc = I.pack_popcount_conv_weight(_weights((5, 3, 3, 20), seed=19, low=0, high=2))
    for with_sums in (False, True):
        torch.library.opcheck(ops.popcount_conv2d.default, (_words((2, 5, 6, 1), seed=20), wc.packed, list(wc.shape),
                                                            [2, 1], [1, 1], [1, 1], wc.tight, with_sums, isa),
                              test_utils=tests)
    torch.library.opcheck(ops.pack_channel_bits.default, (x.view(-1, 6), isa), test_utils=tests)
