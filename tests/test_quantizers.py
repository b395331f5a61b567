"""WeightQuantizer / ActivationQuantizer modules, and AEWGS against a plain autograd reference."""
import math

import pytest
import torch

from gdnsq import ActivationQuantizer, WeightQuantizer
from gdnsq_kernels import quantize_activation, quantize_weight
from gdnsq_kernels.quantize import new_seed_tensor


class _N(torch.autograd.Function):
    """METHOD Part B §2.1 noise function N(v, s) = round(v) - v with the AEWGS backward (r = 0)."""

    @staticmethod
    def forward(ctx, v, s):
        ctx.save_for_backward(v)
        return torch.round(v) - v

    @staticmethod
    def backward(ctx, G):
        (v,) = ctx.saved_tensors
        e = torch.round(v) - v
        dims = tuple(range(1, v.dim()))
        sg = torch.sign(G)
        num = (sg * e).mean(dims, keepdim=True)
        var = (e * e).mean(dims, keepdim=True) - e.mean(dims, keepdim=True) ** 2
        delta = num / var.clamp_min(1e-3)
        mu = torch.clamp_max(delta * sg * e, 0.99)
        return -G * mu, torch.zeros_like(G).sum(dims, keepdim=True)  # dither r = 0


def _aewgs_reference(w, log2_step):
    """Plain autograd graph of the authors' weight quantizer: (v + N(v, s)) * s + z."""
    s = torch.exp2(log2_step).reshape(-1, *([1] * (w.dim() - 1)))
    z = w.amin(dim=tuple(range(1, w.dim())), keepdim=True)
    v = (w - z) / s
    return (v + _N.apply(v, s)) * s + z


@pytest.mark.parametrize("shape", [(5, 3, 3, 3), (4, 7)])
def test_aewgs_matches_autograd_reference(shape):
    w = torch.randn(shape, dtype=torch.float64).mul(0.3).requires_grad_()
    steps = torch.linspace(-4, -2, shape[0], dtype=torch.float64).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    ref = _aewgs_reference(w, steps)
    want_w, want_s = torch.autograd.grad(ref, [w, steps], g)
    wq = WeightQuantizer(shape[0], estimator="aewgs", dither=False).double()
    with torch.no_grad():
        wq.log2_step.copy_(steps)
    out = wq(w)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    got_w, got_s = torch.autograd.grad(out, [w, wq.log2_step], g)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got_s, want_s, rtol=1e-6, atol=1e-9)
    # AEWGS is not the identity: the arg-min elements collect sum(g*mu).
    assert not torch.allclose(got_w, g)


def test_aewgs_dither_term_equals_ste_dither_term():
    """With dither on, AEWGS's step gradient = its dither-free value + STE's dither part."""
    w = torch.randn(4, 2, 3, 3).mul(0.2).requires_grad_()
    g = torch.randn(w.shape)
    grads = {}
    for est in ("ste", "aewgs"):
        for dither in (True, False):
            wq = WeightQuantizer(4, estimator=est, dither=dither)
            with torch.no_grad():
                wq.log2_step.fill_(-3.5)
            torch.manual_seed(11)
            grads[est, dither] = torch.autograd.grad(wq(w), [wq.log2_step], g)[0]
    torch.testing.assert_close(grads["aewgs", True] - grads["aewgs", False],
                               grads["ste", True] - grads["ste", False], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(grads["ste", True], grads["ste", False])


def test_weight_quantizer_forward_bits_and_codes():
    wq = WeightQuantizer(3)
    with torch.no_grad():
        wq.log2_step.copy_(torch.tensor([-1.0, 0.0, -2.0]))
    w = torch.tensor([[0.0, 0.5, 1.0, 1.5], [-2.0, 0.0, 1.0, 5.0], [0.3, 0.3, 0.3, 0.3]])
    torch.manual_seed(0)
    s = new_seed_tensor()
    torch.manual_seed(0)
    torch.testing.assert_close(wq(w), quantize_weight(w, wq.log2_step, seed=s))
    k, z = wq.codes(w)
    assert k.dtype == torch.int32
    torch.testing.assert_close(k, torch.tensor([[0, 1, 2, 3], [0, 2, 3, 7], [0, 0, 0, 0]], dtype=torch.int32))
    torch.testing.assert_close(z, torch.tensor([0.0, -2.0, 0.3]))
    torch.testing.assert_close(wq.channel_realised_bits(w), torch.tensor([2.0, 3.0, 0.0]))
    assert wq.realised_bits(w) == 3.0
    torch.testing.assert_close(wq.continuous_bits(w),
                               torch.log2(torch.tensor([1.5 / 0.5 + 1, 7.0 / 1 + 1, 1.0])))


def test_weight_continuous_bits_gradient_finite_differences():
    wq = WeightQuantizer(3).double()
    with torch.no_grad():
        wq.log2_step.copy_(torch.tensor([-1.0, -2.5, 0.5], dtype=torch.float64))
    w = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_, s_: torch.log2((w_.amax(1) - w_.amin(1)) / torch.exp2(s_) + 1),
                                    (w, wq.log2_step.detach().clone().requires_grad_()))
    b = wq.continuous_bits(w)
    gw, gs = torch.autograd.grad(b.sum(), [w, wq.log2_step])
    # d b_c / d max_c = 1/((max-min+s) ln2), only on the extremes of each channel
    span = w.amax(1) - w.amin(1)
    s = torch.exp2(wq.log2_step.detach())
    expect = 1.0 / ((span + s) * math.log(2))
    torch.testing.assert_close(gw.amax(1), expect)
    torch.testing.assert_close(gw.amin(1), -expect)
    assert int((gw != 0).sum()) == 6  # max and min of each channel only
    torch.testing.assert_close(gs, -span / (span + s))


def test_activation_quantizer_signedness_and_state_dict():
    aq = ActivationQuantizer(signed=False, target_bits=2)
    assert aq.offset.requires_grad is False and float(aq.offset) == 0.0
    assert aq.log2_step.requires_grad and aq.log2_range.requires_grad
    assert float(aq.continuous_bits().detach()) == 20.0
    sq = ActivationQuantizer(signed=True)
    assert sq.offset.requires_grad and float(sq.offset.detach()) == -512.0
    au = ActivationQuantizer(signed="auto")
    assert au.signed == "auto" and au.offset.requires_grad
    au.set_signed(False)
    assert au.signed is False and not au.offset.requires_grad and float(au.offset) == 0.0
    # requires_grad is restored from the buffers on load
    sq.pruned.fill_(True)
    fresh = ActivationQuantizer(signed="auto")
    fresh.load_state_dict(sq.state_dict())
    assert fresh.signed is True and bool(fresh.pruned)
    assert not (fresh.offset.requires_grad or fresh.log2_step.requires_grad or fresh.log2_range.requires_grad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="signed"):
            ActivationQuantizer(signed=bad)
    with pytest.raises(ValueError, match="target_bits"):
        ActivationQuantizer(target_bits=-1)
    with pytest.raises(TypeError, match="target_bits"):
        ActivationQuantizer(target_bits="2")


def test_activation_quantizer_forward_codes_observed_bits_and_disable():
    aq = ActivationQuantizer(signed=True)
    with torch.no_grad():
        aq.log2_step.fill_(-1.0)
        aq.log2_range.fill_(1.0)
        aq.offset.fill_(-0.5)
    x = torch.tensor([-3.0, -0.5, 0.2, 0.3, 0.76, 9.0])
    torch.manual_seed(2)
    y = aq(x)
    torch.testing.assert_close(y, quantize_activation(x, aq.log2_step, aq.log2_range, aq.offset, dither=False))
    torch.testing.assert_close(y, torch.tensor([-0.5, -0.5, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(aq.codes(x), torch.tensor([0, 0, 1, 2, 3, 3], dtype=torch.int32))
    assert math.isinf(float(aq.observed_bits))  # training mode: not observed
    aq.eval()
    aq(x[2:4])
    assert float(aq.observed_bits) == 1.0  # codes {1, 2}: two levels
    aq.enabled = False
    assert aq(x) is x


def test_weight_quantizer_errors():
    with pytest.raises(ValueError, match="estimator"):
        WeightQuantizer(3, estimator="lsq")
    with pytest.raises(ValueError, match="out_channels"):
        WeightQuantizer(0)
    with pytest.raises(ValueError, match="C_out=3"):
        WeightQuantizer(3)(torch.randn(4, 2))
    assert WeightQuantizer(3, per_channel=False).log2_step.shape == (1,)


def _deltas(w, g, gw, step=-3.0):
    """Per-channel AEWGS delta recovered from g*(1 - delta*sign(g)*e) on unclamped, non-min elements."""
    c = w.shape[0]
    wf, g, gw = w.reshape(c, -1), g.reshape(c, -1), gw.reshape(c, -1)
    v = (wf - wf.amin(1, keepdim=True)) / 2.0 ** step
    e = torch.round(v) - v
    out = []
    for ch in range(c):
        mu = 1 - gw[ch] / g[ch]
        ok = (e[ch].abs() > 0.05) & (mu < 0.98) & (wf[ch] > wf[ch].min())
        out.append(float((mu[ok] / (torch.sign(g[ch]) * e[ch])[ok]).median()))
    return torch.tensor(out)


def test_aewgs_statistics_are_averaged_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    from _aewgs_dist_worker import run
    mp.spawn(run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    d0, d1 = _deltas(r0["w"], r0["g"], r0["gw"]), _deltas(r1["w"], r1["g"], r1["gw"])
    torch.testing.assert_close(d0, d1, rtol=1e-4, atol=1e-5)  # the same delta on both ranks
    from gdnsq.quantizers import aewgs_grads
    z = r0["w"].reshape(3, -1).amin(1)
    local, _ = aewgs_grads(r0["g"], r0["w"], torch.full((3,), -3.0), z)  # no process group here
    assert not torch.allclose(_deltas(r0["w"], r0["g"], local), d0, rtol=1e-3)
