"""The counter-based dither: hash correctness, reproducibility and statistics."""
import math
import random

import pytest
import torch

from gdnsq_kernels.quantize import dither as D


def test_torch_hash_matches_python_int_hash():
    vals = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + [random.Random(3).getrandbits(32) for _ in range(200)]
    got = D.lowbias32_torch(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [D.lowbias32_int(v) for v in vals]
    assert all(0 <= h < 2**32 for h in got)


def test_hash_is_a_bijection_on_a_sample():
    idx = torch.arange(1 << 16, dtype=torch.int64)
    assert torch.unique(D.lowbias32_torch(idx)).numel() == idx.numel()


def test_values_and_reproducibility():
    r1 = D.dither((30, 7), seed=12)
    r2 = D.dither((30, 7), seed=12)
    r3 = D.dither((30, 7), seed=13)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    assert r1.unique().numel() == 2  # both signs occur
    torch.testing.assert_close(r1.abs(), torch.full_like(r1, 1 / (2 * math.sqrt(3))))
    # flat row-major index: the value of element (i, j) does not depend on the shape
    torch.testing.assert_close(D.dither((210,), seed=12), r1.reshape(-1))


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 2, 123456789])
def test_statistics(seed):
    n = 1 << 18
    r = D.dither((n,), seed=seed, dtype=torch.float64)
    tol = 5.0 / math.sqrt(n)  # 5 sigma of a mean of n signs
    # mean ~ 0 and variance 1/12 (E r^2 = 1/12 exactly, so the variance tests the mean too)
    assert abs(r.mean().item()) < tol * D.DITHER_MAGNITUDE
    assert r.var().item() == pytest.approx(1 / 12, rel=5 * tol)
    sgn = r.sign()
    # independent of neighbours (lag 1, 2, a row away) and of other seeds
    for lag in (1, 2, 32, 1024):
        assert abs((sgn[lag:] * sgn[:-lag]).mean().item()) < tol
    other = D.dither((n,), seed=seed + 1).sign().double()
    assert abs((sgn * other).mean().item()) < tol
    # every bit pattern of two neighbours equally likely (catches alternating patterns)
    pairs = ((sgn[:-1] > 0).long() * 2 + (sgn[1:] > 0).long()).bincount(minlength=4).double() / (n - 1)
    assert (pairs - 0.25).abs().max().item() < 2 * tol


def test_seed_key_and_type_errors():
    assert D.seed_key(0) != 0
    assert D.seed_key(5) == D.seed_key(5 + 2**32)  # only the low 32 bits matter
    assert -(2**31) <= D.seed_key_i32(7) < 2**31
    with pytest.raises(TypeError, match="seed"):
        D.seed_key(1.5)


def test_new_seed_tensor_follows_manual_seed():
    torch.manual_seed(4)
    a = [int(D.new_seed_tensor()[0]) for _ in range(3)]
    torch.manual_seed(4)
    b = [int(D.new_seed_tensor()[0]) for _ in range(3)]
    assert a == b and len(set(a)) == 3 and all(0 <= s < 2**31 for s in a)


# ---------------------------------------------------------------------------- known answers
# Written down once from the independent implementation below (Chris Wellons' published
# lowbias32: x ^= x>>16; x *= 0x7feb352d; x ^= x>>15; x *= 0x846ca68b; x ^= x>>16, on 32-bit
# words; key = lowbias32(seed ^ 0x9E3779B9); r_i > 0 iff bit 31 of lowbias32(i ^ key)). They pin
# the dither of every implementation: a changed constant, shift or index order fails here even
# if all implementations change together.

def _independent_lowbias32(x):
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x


KNOWN_HASHES = {0x0: 0x0, 0x1: 0x688990C0, 0x2: 0xD1132181, 0x7FFFFFFF: 0x8D29FFB8,
                0x80000000: 0xCC4B4124, 0xFFFFFFFF: 0x6768824A, 0x9E3779B9: 0x1FCE552,
                0x75BCD15: 0xA8F1DB88}
# seed -> (key, bit i of the mask = 1 where r_i = +DITHER_MAGNITUDE, for flat indices 0..63)
KNOWN_SIGNS = {0: (0x1FCE552, 0x3BE027503B0F5643), 1: (0xA4F7896C, 0x37EA9917A545DC07),
               12345: (0x6F6344E1, 0x482D6D349BE97A7), 2**31 - 1: (0xA3665213, 0x936FC5248D047BEC),
               2**32 + 7: (0xA715B186, 0xDBCDA6468F4EEE3)}


def test_known_answer_literals_match_the_independent_hash():
    # guards the literals themselves against a typo
    for x, want in KNOWN_HASHES.items():
        assert _independent_lowbias32(x) == want
    for seed, (key, mask) in KNOWN_SIGNS.items():
        assert _independent_lowbias32((seed & 0xFFFFFFFF) ^ 0x9E3779B9) == key
        assert sum(((_independent_lowbias32(i ^ key) >> 31) & 1) << i for i in range(64)) == mask


def test_reference_dither_known_answers():
    xs = list(KNOWN_HASHES)
    assert [D.lowbias32_int(x) for x in xs] == list(KNOWN_HASHES.values())
    assert D.lowbias32_torch(torch.tensor(xs, dtype=torch.int64)).tolist() == list(KNOWN_HASHES.values())
    for seed, (key, mask) in KNOWN_SIGNS.items():
        assert D.seed_key(seed) == key
        want = torch.tensor([(mask >> i) & 1 == 1 for i in range(64)])
        assert torch.equal(D.dither_bits(64, seed), want)
        r = D.dither((8, 8), seed)
        assert torch.equal(r.reshape(-1) > 0, want)


BACKENDS = ["reference", "torch", "cpu", "triton"]


@pytest.mark.usefixtures("assert_cpp_ran")
@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_dither_known_answers(backend):
    """Each backend's weight-step gradient exposes its dither sign: a (64, 1) weight has one
    element per channel, its own zero point, so e = 0 and d log2_step_c = ln2 * s_c * g_c * s_c * r_c
    with r_c the dither of flat index c."""
    from gdnsq_kernels import quantize as Q
    from gdnsq_kernels.quantize import reference as R

    if backend == "triton":
        from gdnsq_kernels.backend import triton_available, triton_interpreter_enabled

        if not (triton_available() and (torch.cuda.is_available() or triton_interpreter_enabled())):
            pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    w = torch.linspace(-1, 1, 64, device=device).reshape(64, 1)
    step = torch.zeros(64, device=device)  # s = 1
    g = torch.ones(64, 1, device=device)
    # the interpreter is slow: two seeds (one with bit 32 set) for Triton on CPU, all elsewhere
    seeds = [1, 2**32 + 7] if backend == "triton" and device == "cpu" else list(KNOWN_SIGNS)
    for seed in seeds:
        mask = KNOWN_SIGNS[seed][1]
        if backend == "reference":
            _, z = R.weight_forward(w, step)
            gs = R.weight_backward(g, w, step, z, seed, True)[1]
        else:
            _, z = Q.weight_forward(w, step, backend=backend)
            gs = Q.weight_backward(g, w, step, z, seed, True, backend=backend)[1]
        want = torch.tensor([1.0 if (mask >> i) & 1 else -1.0 for i in range(64)], dtype=torch.float64)
        torch.testing.assert_close(gs.double().cpu(), want * math.log(2) * D.DITHER_MAGNITUDE,
                                   rtol=1e-6, atol=0)
