"""The counter-based dither: hash correctness, reproducibility and statistics."""
import math
import random

import pytest
import torch

from gdnsq_kernels import dither as D


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


def test_new_seed_follows_manual_seed():
    torch.manual_seed(4)
    a = [D.new_seed() for _ in range(3)]
    torch.manual_seed(4)
    b = [D.new_seed() for _ in range(3)]
    assert a == b and len(set(a)) == 3 and all(0 <= s < 2**31 for s in a)
