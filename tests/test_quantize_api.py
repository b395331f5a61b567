"""Public ops: autograd, seeds, saved tensors, dispatch, fallback and argument errors."""
import warnings

import pytest
import torch

import gdnsq_kernels
from gdnsq_kernels import quantize as Q
from gdnsq_kernels._build import Extension
from gdnsq_kernels.quantize import cpu_quantize
from gdnsq_kernels import quantize_activation, quantize_weight
from gdnsq_kernels.backend import triton_interpreter_enabled

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# 'triton' on CPU tensors is the interpreter: only where it is on (as in test_binary_gemm.py).
BACKENDS = {"cpu": (["triton"] if triton_interpreter_enabled() else []) + ["cpu", "torch", "reference"],
            "cuda": ["triton", "torch", "reference"]}
CASES = [(d, b) for d in DEVICES for b in BACKENDS[d]]
IDS = [f"{d}-{b}" for d, b in CASES]


def _act_leaves(device, dtype=torch.float32):
    return [torch.tensor(v, device=device, dtype=dtype, requires_grad=True) for v in (-3.0, 1.0, -1.0)]


def _act_grads(x, backend, seed, dither=True):
    x = x.detach().clone().requires_grad_(True)
    a, gm, b = _act_leaves(x.device)
    y = quantize_activation(x, a, gm, b, seed=seed, dither=dither, backend=backend)
    (y * torch.linspace(-1, 2, y.numel(), device=x.device).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, a.grad, gm.grad, b.grad


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_activation_autograd_matches_reference(device, backend, poison_empty):
    x = torch.randn(4, 3, 5, 5, device=device) * 1.5
    got = _act_grads(x, backend, seed=21)
    ref = _act_grads(x, "reference", seed=21)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # one-element (1,) parameters get (1,)-shaped gradients
    p = [torch.tensor([v], device=device, requires_grad=True) for v in (-3.0, 1.0, -1.0)]
    quantize_activation(x, *p, seed=1, backend=backend).sum().backward()
    assert all(t.grad.shape == (1,) for t in p)


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_autograd_matches_reference(device, backend, per_channel, poison_empty):
    w0 = torch.randn(8, 4, 3, 3, device=device) * 0.3
    res = []
    for be in (backend, "reference"):
        w = w0.clone().requires_grad_(True)
        step = (torch.full((8,), -4.0, device=device) if per_channel else torch.tensor(-4.0, device=device))
        step.requires_grad_(True)
        y = quantize_weight(w, step, seed=3, backend=be)
        (y * y).sum().backward()
        res.append((y.detach(), w.grad, step.grad))
    for g, r in zip(*res):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert res[0][2].shape == ((8,) if per_channel else ())


@pytest.mark.parametrize("backend", BACKENDS["cpu"])
def test_seed_reproducibility(backend):
    x = torch.randn(300)
    assert torch.equal(_act_grads(x, backend, 5)[2], _act_grads(x, backend, 5)[2])
    assert not torch.equal(_act_grads(x, backend, 5)[2], _act_grads(x, backend, 6)[2])
    assert torch.equal(_act_grads(x, backend, 5, dither=False)[2], _act_grads(x, backend, 6, dither=False)[2])
    torch.manual_seed(10)
    g1 = _act_grads(x, backend, None)[2]
    torch.manual_seed(10)
    g2 = _act_grads(x, backend, None)[2]
    g3 = _act_grads(x, backend, None)[2]
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)


def test_only_needed_gradients_are_computed(monkeypatch):
    # Spy on the C++ backend's entry point: the gdnsq::act_backward op calls it with the flags.
    from gdnsq_kernels.quantize import cpu_quantize

    calls = []
    real = cpu_quantize.activation_backward

    def spy(*args, **kwargs):
        calls.append((kwargs["need_grad_x"], kwargs["need_grad_params"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_quantize, "activation_backward", spy)
    x = torch.randn(50, requires_grad=True)
    a, gm, b = (torch.tensor(v) for v in (-3.0, 1.0, -1.0))  # frozen parameters
    quantize_activation(x, a, gm, b, seed=0, backend="cpu").sum().backward()
    x2 = torch.randn(50)
    leaves = _act_leaves("cpu")
    quantize_activation(x2, *leaves, seed=0, backend="cpu").sum().backward()
    assert calls == [(True, False), (False, True)]
    # the weight backward is skipped entirely when the step is frozen: dw is g itself
    w = torch.randn(4, 9, requires_grad=True)
    g = torch.randn(4, 9)
    quantize_weight(w, torch.full((4,), -3.0), seed=0).backward(g)
    assert torch.equal(w.grad, g)


def _saved(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", BACKENDS["cpu"])
def test_backward_saves_only_input_and_params(backend):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    leaves = _act_leaves("cpu")
    _, saved = _saved(lambda: quantize_activation(x, *leaves, seed=1, backend=backend))
    big = [t for t in saved if t.numel() > 1]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    step = torch.full((16,), -4.0, requires_grad=True)
    _, saved = _saved(lambda: quantize_weight(w, step, seed=1, backend=backend))
    big = [t for t in saved if t.numel() > 16]
    assert len(big) == 1 and big[0].data_ptr() == w.data_ptr()
    assert sum(t.numel() for t in saved if t.numel() <= 16) <= 33  # step + zero point + seed


def test_env_backend_selection(monkeypatch):
    from gdnsq_kernels.quantize import reference

    hits = []
    real = reference.activation_forward
    monkeypatch.setattr(reference, "activation_forward", lambda *a: hits.append(1) or real(*a))
    x = torch.randn(10)
    p = (torch.tensor(-3.0), torch.tensor(1.0), torch.tensor(-1.0))
    monkeypatch.setenv("GDNSQ_BACKEND", "reference")
    quantize_activation(x, *p)
    monkeypatch.setenv("GDNSQ_BACKEND", "cpu")
    quantize_activation(x, *p)
    assert hits == [1]
    monkeypatch.setenv("GDNSQ_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GDNSQ_BACKEND"):
        quantize_activation(x, *p)


def _broken_cpu_extension(monkeypatch):
    """cpu_quantize's extension replaced by one whose build fails like a missing compiler."""
    def broken(spec):
        raise RuntimeError("no compiler here")

    ext = cpu_quantize.EXTENSION
    monkeypatch.setattr(cpu_quantize, "EXTENSION", Extension(ext.label, ext.fallback, ext.spec, build=broken))


def test_cpu_build_failure_falls_back_to_torch_once(monkeypatch):
    _broken_cpu_extension(monkeypatch)
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "0")
    x = torch.randn(33, requires_grad=True)
    leaves = _act_leaves("cpu")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = quantize_activation(x, *leaves, seed=2, backend="cpu")
        y1.sum().backward()
        y2 = quantize_activation(x, *leaves, seed=2, backend="torch")
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "torch" in msgs[0] and "no compiler here" in msgs[0]
    torch.testing.assert_close(y1, y2)


def test_cpu_build_failure_raises_when_cpp_is_required(monkeypatch):
    # the suite runs with GDNSQ_REQUIRE_CPP=1 (conftest): a broken build is an error there
    _broken_cpu_extension(monkeypatch)
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "1")
    with pytest.raises(RuntimeError, match="no compiler here"):
        quantize_activation(torch.randn(5), *_act_leaves("cpu"), seed=2, backend="cpu")


def test_empty_inputs_through_autograd():
    for be in BACKENDS["cpu"]:
        x = torch.randn(0, 4, requires_grad=True)
        leaves = _act_leaves("cpu")
        y = quantize_activation(x, *leaves, seed=0, backend=be)
        y.sum().backward()
        assert y.shape == (0, 4) and x.grad.shape == (0, 4)
        assert all(t.grad is not None and t.grad.item() == 0 for t in leaves)


# ------------------------------------------------------------------------------ errors
P = (torch.tensor(-3.0), torch.tensor(1.0), torch.tensor(-1.0))


@pytest.mark.parametrize(
    "args,exc,pattern",
    [
        ((torch.arange(4), *P), TypeError, "x must be float"),
        (([1.0, 2.0], *P), TypeError, "x must be a torch.Tensor"),
        ((torch.randn(4), torch.tensor(-3), P[1], P[2]), TypeError, "log2_step must be a floating"),
        ((torch.randn(4), P[0], torch.zeros(2), P[2]), ValueError, r"log2_range must be a 0-d or shape \(1,\)"),
        ((torch.randn(4), P[0], P[1], torch.zeros(1, 1)), ValueError, "offset must be a 0-d"),
        ((torch.randn(4), P[0], P[1], 0.0), TypeError, "offset must be a torch.Tensor"),
    ],
)
def test_activation_argument_errors(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        quantize_activation(*args)


def test_weight_argument_errors():
    w = torch.randn(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"log2_step must have shape \(C_out,\)=\(16,\)"):
        quantize_weight(w, torch.zeros(15))
    with pytest.raises(ValueError, match="log2_step must have shape"):
        quantize_weight(w, torch.zeros(16, 1))
    with pytest.raises(TypeError, match="log2_step must be a floating"):
        quantize_weight(w, torch.zeros(16, dtype=torch.int32))
    with pytest.raises(TypeError, match="w must be float"):
        quantize_weight(w.to(torch.int8), torch.zeros(16))
    with pytest.raises(ValueError, match="w must have at least one dimension"):
        quantize_weight(torch.tensor(1.0), torch.zeros(1))
    with pytest.raises(TypeError, match="seed must be an int"):
        quantize_weight(w, torch.zeros(16), seed=1.5)
    with pytest.raises(ValueError, match="zero_point must have shape"):
        Q.weight_backward(w, w, torch.zeros(16), torch.zeros(3), 0, True)
    with pytest.raises(ValueError, match="grad_w_hat must have the input's shape"):
        Q.weight_backward(w[:2], w, torch.zeros(16), torch.zeros(16), 0, True)
    with pytest.raises(ValueError, match="backend"):
        quantize_weight(w, torch.zeros(16), backend="fast")


def test_public_names():
    assert gdnsq_kernels.quantize_activation is Q.quantize_activation
    assert sorted(Q.__all__) == sorted(["quantize_activation", "quantize_weight", "activation_forward",
                                        "activation_backward", "weight_forward", "weight_backward",
                                        "new_seed_tensor"])
