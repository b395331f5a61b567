"""The reference's closed-form backward, checked two independent ways in float64.

1. Autograd through the authors' eager composition (clamp, shift, divide, the rounding
   Function with ``d n/d s = r``, multiply, shift back) with the same dither ``r``.
2. Central finite differences of the STE surrogate. The true forward is piecewise constant
   in its inputs, so the GDNSQ gradient is the derivative of the surrogate
   ``y~ = lo + s * (v + e0 + r * (s - s0))``, ``v = (clamp(x, lo, hi) - lo) / s``, with the
   rounding error ``e0`` and ``s0`` frozen at the base point. It is smooth away from the clamp
   bounds, so finite differences of sum(g * y~) must reproduce d offset, d log2_range, the
   ``e`` (and ``e - 1``) terms and the dither term of d log2_step, and dx.
"""
import math

import pytest
import torch

from gdnsq_kernels.quantize import _composite
from gdnsq_kernels.quantize import reference as R
from gdnsq_kernels.quantize.dither import dither

D = torch.float64


def _act_setup(n=200, seed=11):
    x = torch.randn(n, dtype=D) * 1.5
    params = [torch.tensor(v, dtype=D) for v in (-2.7, 0.6, -0.3)]
    g = torch.randn(n, dtype=D)
    return x, params, g


@pytest.mark.parametrize("use_dither", [False, True])
def test_activation_closed_form_equals_composite_autograd(use_dither):
    x, (a, gm, b), g = _act_setup()
    x.requires_grad_(True)
    leaves = [p.clone().requires_grad_(True) for p in (a, gm, b)]
    r = dither(x.shape, 5, dtype=D) if use_dither else torch.zeros_like(x)
    y = _composite.composite_activation(x, *leaves, r=r)
    (y * g).sum().backward()
    ref = R.activation_backward(g, x.detach(), a, gm, b, 5, use_dither)
    torch.testing.assert_close(y.detach(), R.activation_forward(x.detach(), a, gm, b), rtol=0, atol=1e-12)
    torch.testing.assert_close(ref[0], x.grad, rtol=0, atol=1e-12)  # (v*s) rounding
    for got, leaf in zip(ref[1:], leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("use_dither", [False, True])
def test_weight_closed_form_equals_composite_autograd(per_channel, use_dither):
    w = (torch.randn(6, 3, 3, 3, dtype=D) * 0.2).requires_grad_(True)
    step = (torch.full((6,), -4.3, dtype=D) if per_channel else torch.tensor([-4.3], dtype=D))
    leaf = step.clone().requires_grad_(True)
    r = dither(w.shape, 9, dtype=D) if use_dither else torch.zeros_like(w)
    g = torch.randn_like(w)
    y = _composite.composite_weight(w, leaf, r=r)
    (y * g).sum().backward()
    yr, z = R.weight_forward(w.detach(), step)
    torch.testing.assert_close(y.detach(), yr, rtol=0, atol=1e-12)
    gw, gs = R.weight_backward(g, w.detach(), step, z, 9, use_dither)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=1e-12)  # zero-point path cancels
    torch.testing.assert_close(gs, leaf.grad, rtol=1e-10, atol=1e-10)


def _surrogate_act(x, a, gm, b, e0, r, s0):
    s = 2.0**a
    q = 2.0**gm
    lo, hi = b, b + q - s
    v = (torch.clamp(x, lo, hi) - lo) / s
    return lo + s * (v + e0 + r * (s - s0))


def _fd(f, h=1e-6):
    return (f(h) - f(-h)) / (2 * h)


@pytest.mark.parametrize("use_dither", [False, True])
def test_activation_finite_differences(use_dither):
    x, (a, gm, b), g = _act_setup(300)
    s0 = 2.0 ** a.item()
    lo, hi = b.item(), b.item() + 2.0 ** gm.item() - s0
    # keep away from the clamp kinks (|x - bound| > 1e-3) so the surrogate is smooth there
    x = torch.where(((x - lo).abs() < 1e-3) | ((x - hi).abs() < 1e-3), x + 0.01, x)
    assert (x < lo).any() and (x > hi).any() and ((x > lo) & (x < hi)).any()
    r = dither(x.shape, 3, dtype=D) if use_dither else torch.zeros_like(x)
    v0 = (torch.clamp(x, lo, hi) - lo) / s0
    e0 = torch.round(v0) - v0
    ref = R.activation_backward(g, x, a, gm, b, 3, use_dither)

    def loss(xx=x, aa=a, gg=gm, bb=b):
        return (g * _surrogate_act(xx, aa, gg, bb, e0, r, s0)).sum()

    torch.testing.assert_close(ref[1], _fd(lambda h: loss(aa=a + h)), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ref[2], _fd(lambda h: loss(gg=gm + h)), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ref[3], _fd(lambda h: loss(bb=b + h)), rtol=1e-6, atol=1e-8)
    for i in (0, 1, 2, 50, 299):
        dxi = _fd(lambda h: loss(xx=x + h * torch.nn.functional.one_hot(torch.tensor(i), 300)))
        torch.testing.assert_close(ref[0][i], dxi, rtol=1e-6, atol=1e-8)


def test_activation_step_terms_by_region():
    """Hand-computed per-region terms: below s*r, inside e + s*r, above e - 1 + s*r."""
    a, gm, b = (torch.tensor(v, dtype=D) for v in (-2.0, 1.0, -1.0))  # s=.25, hi=.75
    s = 0.25
    x = torch.tensor([-3.0, 0.1, 5.0], dtype=D)
    rr = dither(x.shape, 4, dtype=D)
    e_in = round(1.1 / s) - 1.1 / s
    e_top = round(1.75 / s) - 1.75 / s  # = 0
    ln2 = math.log(2.0)
    for i, term in enumerate([s * rr[0], e_in + s * rr[1], e_top - 1 + s * rr[2]]):
        g = torch.zeros(3, dtype=D)
        g[i] = 1.0
        got = R.activation_backward(g, x, a, gm, b, 4, True)
        assert got[1].item() == pytest.approx(ln2 * s * float(term), rel=1e-12, abs=1e-15)
        assert got[2].item() == pytest.approx(ln2 * 2.0 * (i == 2))
        assert got[3].item() == pytest.approx(float(i != 1))
        assert got[0].tolist() == [0.0, float(i == 1), 0.0]


def test_weight_finite_differences():
    w = torch.randn(4, 50, dtype=D) * 0.2
    step = torch.tensor([-4.3, -3.1, -5.0, -2.2], dtype=D)
    g = torch.randn_like(w)
    r = dither(w.shape, 8, dtype=D)
    yr, z = R.weight_forward(w, step)
    s0 = (2.0**step)[:, None]
    v0 = (w - z[:, None]) / s0
    e0 = torch.round(v0) - v0
    ref = R.weight_backward(g, w, step, z, 8, True)[1]

    def loss(st):
        s = (2.0**st)[:, None]
        return (g * (z[:, None] + s * ((w - z[:, None]) / s + e0 + r * (s - s0)))).sum()

    for c in range(4):
        fd = _fd(lambda h: loss(step + h * torch.nn.functional.one_hot(torch.tensor(c), 4)))
        torch.testing.assert_close(ref[c], fd, rtol=1e-6, atol=1e-9)


def test_forward_is_on_grid_and_round_half_even():
    a, gm, b = (torch.tensor(v) for v in (-1.0, 2.0, 0.0))  # s=.5, grid 0..3.5
    x = torch.tensor([0.25, 0.75, 1.25, -5.0, 9.0, 3.4])
    y = R.activation_forward(x, a, gm, b)
    # 0.25/0.5 = 0.5 -> 0 (even), 1.5 -> 2, 2.5 -> 2; clamps to 0 and 3.5
    assert y.tolist() == [0.0, 1.0, 1.0, 0.0, 3.5, 3.5]
    j = R.activation_codes(x, a, gm, b)
    assert j.dtype == torch.int32 and j.tolist() == [0, 2, 2, 0, 7, 7]
    torch.testing.assert_close(b + 0.5 * j.float(), y)


def test_weight_codes_match_forward():
    w = torch.randn(5, 2, 3, 3)
    step = torch.full((5,), -3.0)
    k, z = R.weight_codes(w, step)
    y, z2 = R.weight_forward(w, step)
    assert k.dtype == torch.int32 and k.min() == 0
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(z[:, None, None, None] + 0.125 * k.float(), y)
    # zero point = per-channel minimum, reached by code 0
    torch.testing.assert_close(z, w.reshape(5, -1).amin(1))


@pytest.mark.parametrize("seed,value", [(torch.tensor([9]), 9), (torch.tensor(9, dtype=torch.int32), 9),
                                        (torch.tensor([-7], dtype=torch.int32), -7)],
                         ids=["int64", "int32-0d", "int32-negative"])
def test_reference_backward_takes_every_seed_check_seed_accepts(seed, value):
    """``check_seed`` accepts a one-element int64/int32 tensor (what the gdnsq:: ops pass); the
    reference backward takes it too, with the dither of the int it holds."""
    from gdnsq_kernels.quantize import _checks

    _checks.check_seed(seed)
    x, params, g = _act_setup()
    got = R.activation_backward(g, x, *params, seed, True)
    want = R.activation_backward(g, x, *params, value, True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    w = torch.randn(4, 9, dtype=D)
    step = torch.full((4,), -3.0, dtype=D)
    _, z = R.weight_forward(w, step)
    assert torch.equal(R.weight_backward(g[:36].reshape(4, 9), w, step, z, seed, True)[1],
                       R.weight_backward(g[:36].reshape(4, 9), w, step, z, value, True)[1])
