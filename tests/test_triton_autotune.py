"""Autotuned block sizes of the Triton quantizer kernels.

On CUDA the two forward kernels go through ``triton.autotune``; the choice is made by timing,
so it must not be able to change a result: every config of a forward kernel gives the
reference's bits (run here config by config in the interpreter), and the reducing backward
kernels are not autotuned at all (one pinned BLOCK / num_warps). The host code's CUDA launches
are checked through ``_launch.record_launches`` (what a GPU would get, recorded on CPU); that
every config compiles for sm_90 is in tests/test_triton_sm90.py.
"""
from __future__ import annotations

import pytest
import torch
import triton

from gdnsq_kernels import _launch
from gdnsq_kernels.quantize import reference as ref
from gdnsq_kernels.backend import triton_interpreter_enabled

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="needs the Triton interpreter")


def _tq():
    from gdnsq_kernels.quantize import triton_quantize

    return triton_quantize


def _params():
    return [torch.tensor(v) for v in (-3.0, 1.0, -1.0)]


def test_cuda_launches_are_autotuned_forwards_and_pinned_backwards():
    TQ = _tq()
    x = torch.randn(3, 5, 7, 11)
    w = torch.randn(6, 4, 3, 3)
    step = torch.full((6,), -4.0)
    with _launch.record_launches() as recs:
        TQ.activation_forward(x, *_params())
        TQ.activation_backward(torch.ones_like(x), x, *_params(), 5, True)
        _, z = TQ.weight_forward(w, step)
        TQ.weight_backward(torch.ones_like(w), w, step, torch.zeros(6), 5, True)
    act_fwd, act_bwd, w_fwd, w_bwd = recs
    for rec, configs in ((act_fwd, TQ.ACT_FWD_CONFIGS), (w_fwd, TQ.W_FWD_CONFIGS)):
        assert [c["BLOCK"] for c, _ in rec.configs] == [c.kwargs["BLOCK"] for c in configs]
        assert [o["num_warps"] for _, o in rec.configs] == [c.num_warps for c in configs]
        assert all(o["enable_fp_fusion"] is False for _, o in rec.configs)  # exact in every config
    # the grid follows the config's block (here the default one)
    assert act_fwd.grid == (triton.cdiv(x.numel(), TQ.ACT_FWD_CONFIGS[0].kwargs["BLOCK"]),)
    assert w_fwd.grid == (6,)
    for rec in (act_bwd, w_bwd):
        assert rec.configs == [] and rec.options["num_warps"] == TQ.REDUCE_WARPS
        assert rec.options["enable_fp_fusion"] is False
    assert act_bwd.constexprs["BLOCK"] == TQ.ACT_BLOCK


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_activation_forward_config_gives_the_reference_bits(channels_last):
    TQ = _tq()
    x = torch.randn(3, 5, 17, 23) * 1.7  # 5,865 elements: several blocks of every config
    x[0, 0, 0, :3] = torch.tensor([float("nan"), 1e30, -1e30])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    s, q, off = TQ._act_params(x, *_params())
    want = ref.activation_forward(x, *_params())
    ct, magic = TQ._ct(x.dtype)
    n = x.numel()
    for cfg in TQ.ACT_FWD_CONFIGS:
        y = torch.full_like(x, 123.0)
        block = cfg.kwargs["BLOCK"]
        _launch.launch(TQ._act_fwd_kernel, (triton.cdiv(n, block),), x, y, s, q, off, n, exact=True,
                       dense_ok=True, BLOCK=block, CT=ct, MAGIC=magic)
        torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True, msg=str(cfg))


@pytest.mark.parametrize("k", [27, 300, 2500])
def test_every_weight_forward_config_gives_the_reference_bits(k):
    TQ = _tq()
    w = torch.randn(5, k) * 0.3
    step = torch.linspace(-6.0, -3.0, 5)
    want_w, want_z = ref.weight_forward(w, step)
    s = TQ._exp2(step, w.dtype, (-1,))
    ct, magic = TQ._ct(w.dtype)
    for cfg in TQ.W_FWD_CONFIGS:
        y = torch.full_like(w, 123.0)
        z = torch.full((5,), 123.0)
        _launch.launch(TQ._w_fwd_kernel, (5,), w, y, z, s, k, exact=True, PER_CHANNEL=True,
                       BLOCK=cfg.kwargs["BLOCK"], CT=ct, MAGIC=magic)
        assert torch.equal(y, want_w) and torch.equal(z, want_z), cfg
