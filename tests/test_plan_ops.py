"""gdnsq_kernels.plan_ops (csrc/plan_ops.cpp) against its plain-PyTorch oracle
gdnsq_kernels.plan_reference, on awkward shapes and boundary values, for the default ISA build
and the scalar build (the vector loops' tails and the plain loops)."""
from __future__ import annotations

import math

import pytest
import torch

from gdnsq_kernels import plan_ops as P
from gdnsq_kernels import plan_reference as R
from gdnsq_kernels.cpu_deploy import default_isa, supported_isas

ISAS = sorted({default_isa(), "scalar"} & set(supported_isas()))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _boundary_inputs(s, lo, hi, C):
    """Values at every code's .5 rounding boundary, next to it, at the clamp ends, +-inf."""
    levels = int(round((hi - lo) / s))
    ks = torch.arange(-2, levels + 3, dtype=torch.float32)
    halves = lo + (ks + 0.5) * s  # float32: (x - lo) / s is exactly k + 0.5 for these
    vals = torch.cat([halves, torch.nextafter(halves, torch.tensor(math.inf)),
                      torch.nextafter(halves, torch.tensor(-math.inf)), lo + ks * s,
                      torch.tensor([lo, hi, math.inf, -math.inf, 0.0, -0.0, 3e38, -3e38])])
    n = -(-vals.numel() // C) * C
    return torch.cat([vals, torch.zeros(n - vals.numel())]).view(-1, C)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("C,groups", [(1, 1), (3, 3), (17, 1), (33, 3), (64, 4), (40, 0), (96, 96)])
@pytest.mark.parametrize("bits,lo", [(1, 0.0), (2, -0.3), (4, 0.0), (8, -1.5)])
def test_quantize_matches_reference(isa, C, groups, bits, lo):
    s = 2.0 ** -3
    hi = lo + (2**bits) * s - s
    x = torch.cat([torch.randn(37, C, generator=_gen()) * 2, _boundary_inputs(s, lo, hi, C)])
    codes, sums = P.quantize(x, s, lo, hi, groups, isa=isa)
    want_codes, want_sums = R.quantize(x, s, lo, hi, groups)
    assert torch.equal(codes, want_codes)
    assert torch.equal(sums, want_sums)
    # the same codes as the deployed layer's float_codes formula, and +-inf at the clamp ends
    f = torch.float32
    ref = torch.round((torch.clamp(x, torch.tensor(lo, dtype=f), torch.tensor(hi, dtype=f)) - lo) / torch.tensor(s))
    assert torch.equal(codes.float(), ref)
    inf = P.quantize(torch.tensor([[math.inf, -math.inf, math.nan]]), s, lo, hi, 0, isa=isa)[0]
    assert inf.tolist() == [[2**bits - 1, 0, 0]]


def test_quantize_rounds_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, 3.5, 0.49999997, 2.5000002]])
    assert P.quantize(x, 1.0, 0.0, 255.0, 0)[0].tolist() == [[0, 2, 2, 4, 0, 3]]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [
    # N, H, W, G, kernel, stride, padding, dilation
    (1, 7, 5, 1, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 9, 11, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (1, 8, 8, 16, (3, 3), (1, 2), (0, 1), (2, 1)),
    (3, 5, 6, 2, (1, 1), (2, 2), (0, 0), (1, 1)),
    (1, 4, 4, 1, (5, 3), (1, 1), (2, 2), (1, 1)),
    (1, 13, 3, 5, (7, 1), (3, 1), (3, 0), (1, 1)),
])
def test_box_sum_matches_reference(isa, case):
    N, H, W, G, k, st, pad, dil = case
    s = torch.randint(0, 2**20, (N, H, W, G), generator=_gen(1), dtype=torch.int32)
    assert torch.equal(P.box_sum(s, k, st, pad, dil, isa=isa), R.box_sum(s, k, st, pad, dil))


def _epilogue_inputs(M, O, G, P_, seed=2, big=False):
    g = _gen(seed)
    hi = 2**30 if big else 2**12
    acc = torch.randint(-hi, hi, (M, O), generator=g, dtype=torch.int32)
    sj = torch.randint(0, hi, (M, G), generator=g, dtype=torch.int32)
    a = torch.rand(O, generator=g, dtype=torch.float64) * 1e-3
    b = -torch.rand(O, generator=g, dtype=torch.float64) * 1e-2
    cst = torch.randn(P_, O, generator=g, dtype=torch.float64)
    return acc, sj, a, b, cst


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("M,O,G,P_,big", [(1, 1, 1, 1, False), (35, 17, 1, 7, False), (12, 64, 64, 3, True),
                                          (6, 48, 3, 6, False), (20, 19, 19, 1, True)])
def test_epilogue_float_matches_reference(isa, order, M, O, G, P_, big):
    args = _epilogue_inputs(M, O, G, P_, big=big)
    assert torch.equal(P.epilogue_float(*args, order, isa=isa), R.epilogue_float(*args, order))


@pytest.mark.parametrize("isa", ISAS)
def test_epilogue_orders_and_no_fma(isa):
    """The two orders are different functions and each is evaluated as written: with
    t = a*S_kj = 2**54, u = b*S_j = 1, c = -2**54, (t + u) + c = 0 but (t + c) + u = 1; and
    a*S_kj + c with a*S_kj inexact in float64 must not be fused (FMA would keep the low bits)."""
    acc = torch.tensor([[2**30, 3]], dtype=torch.int32)
    sj = torch.tensor([[1]], dtype=torch.int32)
    a = torch.tensor([2.0**24, 1.0 / 3.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    cst = torch.tensor([[-(2.0**54), -1.0]], dtype=torch.float64)
    for order, want0 in ((0, 0.0), (1, 1.0)):
        got = P.epilogue_float(acc, sj, a, b, cst, order, isa=isa)
        assert torch.equal(got, R.epilogue_float(acc, sj, a, b, cst, order))
        assert float(got[0, 0]) == want0
        # (1/3 rounded) * 3 = 1 exactly in float64, so the unfused result is 0; an FMA gives -2**-54
        assert float(got[0, 1]) == 0.0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,O,G,P_,L,G2", [(40, 17, 1, 5, 3, 1), (9, 64, 64, 3, 15, 64), (16, 24, 1, 1, 1, 0),
                                           (8, 12, 4, 8, 255, 3)])
def test_epilogue_codes_matches_reference(isa, M, O, G, P_, L, G2):
    acc, sj, a, b, cst = _epilogue_inputs(M, O, G, P_)
    y = R.epilogue_float(acc, sj, a, b, cst, 0)
    g = _gen(3)
    # per-channel sorted thresholds from the real values (some exactly at y), -inf / NaN levels
    thr = torch.sort(y[torch.randint(0, M, (L,), generator=g)].t(), dim=1).values.contiguous()
    direction = torch.where(torch.rand(O, generator=g) < 0.5, 1, -1).to(torch.int8)
    thr = torch.where(direction.view(-1, 1) > 0, thr, thr.flip(1))
    thr[0, 0] = -math.inf
    thr[1, -1] = math.nan
    got = P.epilogue_codes(acc, sj, a, b, cst, 0, thr, direction, G2, isa=isa)
    want = R.epilogue_codes(acc, sj, a, b, cst, 0, thr, direction, G2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K", [(1, 1), (3, 63), (5, 64), (2, 65), (7, 130)])
def test_pack_bits_and_channel_sums(isa, M, K):
    codes = torch.randint(0, 2, (M, K), generator=_gen(4)).to(torch.uint8)
    assert torch.equal(P.pack_bits(codes, isa=isa), R.pack_bits(codes))
    wide = torch.randint(0, 256, (M, 6 * K), generator=_gen(5)).to(torch.uint8)
    for groups in (1, 2, 3, 6):
        assert torch.equal(P.channel_sums(wide, groups, isa=isa), R.channel_sums(wide, groups))


def test_bad_arguments_raise_one_line_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(TypeError, match="x must be torch.float32"):
        P.quantize(x.double(), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="s must be > 0"):
        P.quantize(x, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="do not fit uint8"):
        P.quantize(x, 1.0, 0.0, 300.0)
    with pytest.raises(ValueError, match="groups=3 must divide"):
        P.quantize(x, 1.0, 0.0, 1.0, 3)
    with pytest.raises(ValueError, match="smaller than the window"):
        P.box_sum(torch.zeros(1, 2, 2, 1, dtype=torch.int32), 3)
    acc, sj, a, b, cst = _epilogue_inputs(6, 4, 1, 4)
    with pytest.raises(ValueError, match="positions P=4 must divide the rows M=6"):
        P.epilogue_float(acc, sj, a, b, cst)
    with pytest.raises(ValueError, match="order must be 0 or 1"):
        P.epilogue_float(acc, sj, a, b, cst[:3], 2)
    with pytest.raises(ValueError, match="direction must be"):
        P.epilogue_codes(acc, sj, a, b, cst[:3], 0, torch.zeros(4, 1), torch.zeros(4))
    with pytest.raises(ValueError, match="plan_ops: x must be a CPU tensor|x must be a CPU tensor"):
        P.quantize(torch.zeros(2, 4, device="meta"), 1.0, 0.0, 1.0)
