"""Shared test fixtures.

``poison_empty``: every ``torch.empty``/``torch.empty_like`` made while a test runs is filled
with NaN (integers with a sentinel), so a kernel that forgets to write part of its output fails
instead of passing on leftover memory.
"""
import os
import pathlib

import torch

# The Triton kernels run on CPU tensors only through the interpreter, and triton reads this
# variable when a kernel is decorated, so it must be set before gdnsq_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A failed C++ build must fail the "cpu" cases, not silently run the torch/NumPy fallbacks in
# their place (the fallback tests switch this off for themselves). GDNSQ_REQUIRE_CPP=0 runs the
# suite on a machine without a compiler.
os.environ.setdefault("GDNSQ_REQUIRE_CPP", "1")

import pytest  # noqa: E402

SHARED_MODELS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models"


def _poisoned(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        elif out.dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(-12345 if out.dtype not in (torch.uint8,) else 251)
        return out

    return make


@pytest.fixture
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(torch.empty_like))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class _CountingExtension:
    """Stands in for the loaded C++ extension module and counts the kernel calls made through it."""

    def __init__(self, ext):
        self._ext, self.calls = ext, []

    def __getattr__(self, name):
        fn = getattr(self._ext, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        return counted


@pytest.fixture
def fast_cpu(monkeypatch):
    """The eager torch backend on one thread (training tests: fast, no C++ build needed)."""
    monkeypatch.setenv("GDNSQ_BACKEND", "torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def assert_cpp_ran(request, monkeypatch):
    """For tests parametrized by ``backend``: the "cpu" cases must run the C++ kernels (a build
    failure or a silent fallback to the torch path would test the torch path twice and pass)."""
    if getattr(request.node, "callspec", None) is None or request.node.callspec.params.get("backend") != "cpu":
        yield
        return
    from gdnsq_kernels.quantize import cpu_quantize

    assert cpu_quantize.implementation() is cpu_quantize, cpu_quantize.EXTENSION.describe()[1]
    spy = _CountingExtension(cpu_quantize.load_extension())
    monkeypatch.setattr(cpu_quantize.EXTENSION, "module", spy)
    yield
    if 0 in request.node.callspec.params.get("shape", (1,)):
        return  # empty tensors return before any kernel
    assert spy.calls, "backend='cpu' never reached the C++ extension"


@pytest.fixture
def shared_models_dir():
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"pretrained checkpoints not found at {SHARED_MODELS}")
    return SHARED_MODELS
