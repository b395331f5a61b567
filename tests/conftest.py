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


@pytest.fixture
def shared_models_dir():
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"pretrained checkpoints not found at {SHARED_MODELS}")
    return SHARED_MODELS
