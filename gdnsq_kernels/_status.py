"""``gdnsq_kernels.status()``: which implementation each op family uses, and why."""
from __future__ import annotations

import sys

from ._build import require_cpp
from .backend import requested_backend, resolve_for_device


def _entry(implementation: str, reason: str) -> dict:
    return {"implementation": implementation, "reason": reason}


def _backend_for(is_cuda: bool) -> tuple:
    """(backend name or None when the ops would raise, why it was chosen)."""
    try:
        name, fallback_cause = resolve_for_device(is_cuda)
    except RuntimeError as exc:
        return None, f"the ops raise: {exc}"
    requested = requested_backend()
    if fallback_cause is not None:
        return name, f"GDNSQ_BACKEND=auto, but Triton is unavailable: {fallback_cause}"
    if requested != "auto":
        return name, f"GDNSQ_BACKEND={requested}"
    return name, f"GDNSQ_BACKEND=auto picks {name} for {'CUDA' if is_cuda else 'CPU'} tensors"


def _quantize(is_cuda: bool, build: bool) -> dict:
    name, why = _backend_for(is_cuda)
    if name != "cpu":
        return _entry(name or "none", why)
    from .quantize import cpu_quantize

    if build:
        cpu_quantize.EXTENSION.available()
    loaded, reason = cpu_quantize.EXTENSION.describe()
    return _entry("torch" if loaded is False else "cpu", f"{why}; {reason}")


def _hw_popcount_note() -> str:
    """Where the Triton popcount kernel uses SWAR instead of the inline-PTX popcount."""
    import torch

    if torch.version.hip is not None:
        return "; popcount kernel: SWAR (no inline PTX on ROCm)"
    triton_xnor = sys.modules.get("gdnsq_kernels.binary.triton_xnor")
    failures = getattr(triton_xnor, "HW_POPCOUNT_FAILURES", {})
    if not failures:
        return "; popcount kernel: hardware popc.b32"
    targets = sorted({str(key[0]) for key in failures})
    causes = sorted(set(failures.values()))
    return (f"; popcount kernel: SWAR for the configurations whose inline PTX failed to compile on "
            f"{', '.join(targets)} ({'; '.join(causes)}), hardware popc.b32 elsewhere")


def _binary(is_cuda: bool, build: bool) -> dict:
    name, why = _backend_for(is_cuda)
    if name == "triton" and is_cuda:
        return _entry(name, why + _hw_popcount_note())
    if name != "cpu":
        return _entry(name or "none", why)
    from .binary import cpu_xnor

    if cpu_xnor.disabled_by_environment():
        return _entry("cpu-numpy", f"{why}; GDNSQ_NO_CPP_XNOR=1: NumPy popcount / float sgemm")
    if build:
        cpu_xnor.EXTENSION.available()
    loaded, reason = cpu_xnor.EXTENSION.describe()
    return _entry("cpu-numpy" if loaded is False else "cpu-cpp", f"{why}; {reason}")


def _deploy_runtime(build: bool) -> dict:
    from . import cpu_deploy

    try:
        isa = cpu_deploy.default_isa()
        if build:
            cpu_deploy.load_extension(isa)
    except ValueError as exc:  # a bad GDNSQ_DEPLOY_ISA
        return _entry("none", f"the runtime cannot be used: {exc}")
    except Exception:  # noted by the extension: describe() below names the cause
        if require_cpp():
            raise
    loaded, reason = cpu_deploy.describe(isa)
    return _entry("none" if loaded is False else f"runtime-{isa}", reason)


def status(build: bool = False) -> dict:
    """Which implementation each op family uses in this process, and why.

    Returns ``{family: {device: {"implementation": str, "reason": str}}}``:

    * ``"quantize"`` (``quantize_activation`` / ``quantize_weight`` and the layers' fused ops),
      devices ``"cpu"`` and ``"cuda"``: ``cpu`` (fused C++), ``torch``, ``triton`` or
      ``reference``;
    * ``"binary"`` (the packed GEMMs, ``binary_linear`` / ``binary_conv2d``), ``"cpu"`` and
      ``"cuda"``: ``cpu-cpp`` (C++ popcount GEMM), ``cpu-numpy`` (its NumPy / sgemm fallback),
      ``triton``, ``torch`` or ``reference``;
    * ``"deploy_runtime"`` (the fused C++ runtime of ``gdnsq.deploy.RuntimeModel``), ``"cpu"``:
      ``runtime-<isa>``, or ``none`` when it failed to build.

    An implementation is ``"none"`` where the ops would raise (``GDNSQ_BACKEND=cpu`` for CUDA
    tensors, say); the reason says so. ``GDNSQ_BACKEND`` is honoured. A C++ extension not yet
    built in this process is reported as the C++ path with "not built yet"; ``build=True``
    builds (or loads) the extensions first, so that every answer is final (a first build takes
    about a minute per extension; a failure warns as the ops would, or raises under
    ``GDNSQ_REQUIRE_CPP=1``).
    """
    return {
        "quantize": {"cpu": _quantize(False, build), "cuda": _quantize(True, build)},
        "binary": {"cpu": _binary(False, build), "cuda": _binary(True, build)},
        "deploy_runtime": {"cpu": _deploy_runtime(build)},
    }
