"""Backend selection shared by every op in ``gdnsq_kernels``.

The environment variable ``GDNSQ_BACKEND`` picks the implementation:

* ``auto`` (default): CUDA tensors -> ``triton``; CPU tensors -> ``cpu`` (the fused C++ path for
  the quantizers, NumPy popcount for the bit-packed ops). Triton is an optional dependency (it
  has wheels for Linux x86_64/aarch64 only): without it CUDA tensors use ``torch`` (warning once).
* ``triton``: the Triton kernels. On CPU tensors this needs ``TRITON_INTERPRET=1`` (tests only).
* ``reference``: the plain-PyTorch oracle in ``gdnsq_kernels.quantize.reference`` (slow, exact).
* ``cpu``: the fused CPU path (CPU tensors only).
* ``torch``: the eager closed-form PyTorch path (no compiler needed; CPU or CUDA).

Each op may also take an explicit ``backend=`` keyword for tests and benchmarks.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference", "cpu", "torch")


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs its kernels in the interpreter (on CPU tensors, via NumPy).

    Decided exactly as ``triton.jit`` decides it: Triton >= 3.4 reads ``TRITON_INTERPRET``
    through ``triton.knobs.runtime.interpret`` (case-insensitive 1/true/on/yes/y; an explicit
    ``knobs.runtime.interpret = ...`` wins), Triton 3.0-3.3 compares the variable to ``"1"``.
    """
    try:
        from triton import knobs
    except ImportError:  # Triton < 3.4 (or none at all): triton/runtime/jit.py's own test
        return os.getenv("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """Why ``import triton`` fails in this process (None when it imports). Cached: an import
    failure does not mend itself within a process. Only ``ImportError`` counts; anything else
    (a ``MemoryError``, say) propagates and is not cached."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            return _TRITON_MISSING
        return f"import triton failed ({type(exc).__name__}: {exc})"
    return None


def triton_available() -> bool:
    """True when the ``triton`` package imports (nothing else in gdnsq_kernels needs it)."""
    return triton_import_error() is None


_TRITON_MISSING = ("the triton package is not installed (it has wheels for Linux x86_64 and "
                   "aarch64 only: pip install triton)")


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for, by argument or by ``GDNSQ_BACKEND``; validated, not yet resolved."""
    name = explicit if explicit is not None else os.environ.get("GDNSQ_BACKEND", "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"GDNSQ_BACKEND/backend must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(tensor: torch.Tensor, explicit: str | None = None) -> str:
    """Concrete backend for an op on ``tensor``: one of triton, reference, cpu, torch."""
    name, fallback_cause = resolve_for_device(tensor.is_cuda, explicit)
    if fallback_cause is not None:
        _warn_fallback_once(fallback_cause)
    return name


def resolve_for_device(is_cuda: bool, explicit: str | None = None) -> tuple:
    """(concrete backend for a CUDA or a CPU tensor, the reason ``auto`` fell back to ``torch``
    or None). Raises ``RuntimeError`` for a backend that cannot run on that device."""
    name = requested_backend(explicit)
    if name == "auto":
        if not is_cuda:
            return "cpu", None
        missing = triton_import_error()
        return ("triton", None) if missing is None else ("torch", missing)
    if name == "triton" and not triton_available():
        raise RuntimeError(f"GDNSQ_BACKEND=triton was requested but {triton_import_error()}; "
                           "use GDNSQ_BACKEND=auto, cpu or torch")
    if name == "triton" and not is_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            "GDNSQ_BACKEND=triton on a CPU tensor needs TRITON_INTERPRET=1 "
            "(the Triton interpreter); use GDNSQ_BACKEND=cpu for real CPU work"
        )
    if name == "cpu" and is_cuda:
        raise RuntimeError("GDNSQ_BACKEND=cpu was requested for a CUDA tensor; use auto or triton")
    return name, None


@functools.lru_cache(maxsize=None)
def _warn_fallback_once(cause: str) -> None:
    """Once per distinct cause (the cause is cached itself, so this is once per process)."""
    warnings.warn(f"gdnsq_kernels: Triton is unavailable: {cause}; CUDA tensors use the eager "
                  "'torch' backend", RuntimeWarning, stacklevel=4)
