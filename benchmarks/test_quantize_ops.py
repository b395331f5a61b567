"""Microbenchmarks of the quantizer ops, forward + backward, one group per op.

Providers: ``fused`` (gdnsq_kernels.quantize_activation / quantize_weight on the default backend:
the C++ op on CPU, Triton on CUDA), ``eager_composite`` (the authors' composition of clamp /
round / shift with autograd through it) and ``compiled_reference`` (torch.compile of the
reference semantics written as one differentiable function; skipped with the reason when
compilation is not possible here). Small shapes: one core, a few seconds per provider.
"""
import pytest
import torch

from bench_quantize import reference_surrogate_activation, reference_surrogate_weight
from gdnsq_kernels import quantize_activation, quantize_weight
from gdnsq_kernels.quantize._composite import composite_activation, composite_weight
from gdnsq_kernels.quantize.dither import SEED_SALT, lowbias32_int

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ACT_SHAPE = (8, 16, 32, 32)   # ResNet-20's first stage at batch 8
W_SHAPE = (64, 64, 3, 3)      # ResNet-20's largest conv, per-channel steps
PROVIDERS = ("fused", "eager_composite", "compiled_reference")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(op):
    g = torch.Generator().manual_seed(0)
    key = torch.tensor(lowbias32_int(12345 ^ SEED_SALT), dtype=torch.int64, device=DEVICE)
    if op == "activation":
        x = (torch.randn(ACT_SHAPE, generator=g) * 1.5).to(DEVICE).requires_grad_(True)
        params = [torch.tensor(v, device=DEVICE, requires_grad=True) for v in (-4.0, 1.0, -1.0)]
        return [x, *params], torch.randn(ACT_SHAPE, generator=g).to(DEVICE), key
    w = (torch.randn(W_SHAPE, generator=g) * 0.05).to(DEVICE).requires_grad_(True)
    step = torch.full((W_SHAPE[0],), -7.0, device=DEVICE, requires_grad=True)
    return [w, step], torch.randn(W_SHAPE, generator=g).to(DEVICE), key


def _forward(op, provider, inputs, key):
    if provider == "fused":
        fn = quantize_activation if op == "activation" else quantize_weight
        return lambda: fn(*inputs)
    if provider == "eager_composite":
        fn = composite_activation if op == "activation" else composite_weight
        return lambda: fn(*inputs, r=None)
    ref = reference_surrogate_activation if op == "activation" else reference_surrogate_weight
    try:
        compiled = torch.compile(ref, dynamic=False)
        compiled(*inputs, key).sum().backward()  # compile forward and backward outside the timing
    except Exception as exc:  # noqa: BLE001 - no compiler, unsupported op...: say why
        pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    return lambda: compiled(*inputs, key)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", ["activation", "weight"])
def test_quantize_fwd_bwd(benchmark, op, provider):
    benchmark.group = f"quantize_{op} fwd+bwd {ACT_SHAPE if op == 'activation' else W_SHAPE}"
    inputs, grad_out, key = _inputs(op)
    forward = _forward(op, provider, inputs, key)

    def step():
        grads = torch.autograd.grad(forward(), inputs, grad_out, allow_unused=True)
        _sync()
        return grads

    grads = benchmark(step)
    assert grads[0].shape == inputs[0].shape and torch.isfinite(grads[0]).all()
