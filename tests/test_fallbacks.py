"""Fallbacks say what they do and do not latch: a deterministic build failure (a compile error)
is remembered for the build it concerns only, a transient one (out of memory, a killed
compiler, an interrupted build, a lock wait that timed out) is retried, every fallback warning
names its cause, and gdnsq_kernels.status() reports which implementation each op family uses
and why. The builds here are fakes injected into gdnsq_kernels._build.Extension."""
import errno
import subprocess
import sys
import types
import warnings

import pytest
import torch

import gdnsq_kernels
from gdnsq_kernels import backend
from gdnsq_kernels._build import (RETRY_SECONDS, BuildLockTimeout, BuildSpec, Extension, failure_cause,
                                  is_transient_failure)
from gdnsq_kernels.binary import cpu_xnor
from gdnsq_kernels.quantize import _torch_quantize, cpu_quantize

COMPILE_ERROR = ("Error building extension 'gdnsq_fake_ext': [1/2] c++ -O3 -c fake.cpp -o fake.o\n"
                 "FAILED: fake.o\nfake.cpp:3:5: error: 'foo' was not declared in this scope\n"
                 "ninja: build stopped: subcommand failed.\n")
KILLED_COMPILER = ("Error building extension 'gdnsq_fake_ext': [1/2] c++ -O3 -c fake.cpp -o fake.o\n"
                   "FAILED: fake.o\nc++: fatal error: Killed signal terminated program cc1plus\n"
                   "ninja: build stopped: subcommand failed.\n")


def _torch_build_error(text, returncode):
    """A RuntimeError as torch's load raises it: from the ninja CalledProcessError."""
    try:
        raise subprocess.CalledProcessError(returncode, ["ninja", "-v"], output=text)
    except subprocess.CalledProcessError:
        try:
            raise RuntimeError(text)
        except RuntimeError as exc:
            return exc


class FakeBuild:
    """Stands for torch_load: each call takes the next outcome (an exception to raise, or the
    "module" to return)."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self, spec):
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def degrade(tmp_path, monkeypatch):
    """Fallbacks allowed (the suite sets GDNSQ_REQUIRE_CPP=1); fake builds go to tmp_path."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "0")


def _extension(build, clock, label="the test extension", fallback="the test fallback"):
    return Extension(label, fallback, lambda: BuildSpec("gdnsq_fake_ext", "fake.cpp", ()),
                     build=build, clock=clock)


def _runtime_warnings(record):
    return [str(r.message) for r in record if issubclass(r.category, RuntimeWarning)]


# ------------------------------------------------------------------------ failure kinds


@pytest.mark.parametrize("exc", [
    MemoryError(),
    _torch_build_error(KILLED_COMPILER, 1),
    _torch_build_error("Error building extension 'x'\nninja: build stopped: interrupted by user.", 2),
    _torch_build_error("Error building extension 'x'", -9),  # ninja itself killed
    OSError(errno.ENOSPC, "No space left on device"),
    BuildLockTimeout("waited 600 s for the build lock"),
], ids=["memory", "killed-compiler", "interrupted", "ninja-killed", "disk-full", "lock-timeout"])
def test_transient_failures(exc):
    assert is_transient_failure(exc)


@pytest.mark.parametrize("exc", [
    _torch_build_error(COMPILE_ERROR, 1),
    RuntimeError("Ninja is required to load C++ extensions"),
    ImportError("fake.so: undefined symbol: _ZN2at4_ops"),
    OSError(errno.EACCES, "Permission denied"),
], ids=["compile-error", "no-ninja", "bad-library", "permission"])
def test_deterministic_failures(exc):
    assert not is_transient_failure(exc)


def test_cause_is_the_compile_error_line_not_ninjas_last_line():
    cause = failure_cause(_torch_build_error(COMPILE_ERROR, 1))
    assert cause == "RuntimeError: fake.cpp:3:5: error: 'foo' was not declared in this scope"


# ------------------------------------------------------------------------ Extension.available


def test_compile_error_is_remembered_for_that_build_only(degrade, monkeypatch):
    build, clock = FakeBuild(_torch_build_error(COMPILE_ERROR, 1), "module"), Clock()
    ext = _extension(build, clock)
    with pytest.warns(RuntimeWarning) as record:
        assert ext.available() is False
    [msg] = _runtime_warnings(record)
    assert "the test extension could not be built" in msg and "error: 'foo' was not declared" in msg
    assert "using the test fallback" in msg
    clock.now += 10 * RETRY_SECONDS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.available() is False  # the same build: not retried, not warned again
    assert build.calls == 1
    loaded, reason = ext.describe()
    assert loaded is False and "error: 'foo' was not declared" in reason
    monkeypatch.setenv("CXX", "clang++")  # another toolchain decides anew
    assert ext.available() is True and ext.module == "module" and build.calls == 2


@pytest.mark.parametrize("exc", [MemoryError(), _torch_build_error(KILLED_COMPILER, 1),
                                 BuildLockTimeout("waited 600 s for the build lock")],
                         ids=["memory", "killed-compiler", "lock-timeout"])
def test_transient_failure_is_retried_later(degrade, exc):
    build, clock = FakeBuild(exc, "module"), Clock()
    ext = _extension(build, clock)
    with pytest.warns(RuntimeWarning, match="could not be built this time") as record:
        assert ext.available() is False
    assert failure_cause(exc) in _runtime_warnings(record)[0]
    assert "retrying in" in _runtime_warnings(record)[0]
    assert ext.available() is False and build.calls == 1  # not before the pause is over
    assert ext.describe()[0] is False and "until a retry succeeds" in ext.describe()[1]
    clock.now += RETRY_SECONDS
    assert ext.available() is True and build.calls == 2
    assert ext.describe() == (True, "the test extension: loaded (extension gdnsq_fake_ext)")


def test_keyboard_interrupt_propagates_and_changes_nothing(degrade):
    build = FakeBuild(KeyboardInterrupt(), "module")
    ext = _extension(build, Clock())
    with pytest.raises(KeyboardInterrupt):
        ext.available()
    assert ext.describe()[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.available() is True and build.calls == 2


def test_failure_raises_when_cpp_is_required(degrade, monkeypatch):
    monkeypatch.setenv("GDNSQ_REQUIRE_CPP", "1")
    ext = _extension(FakeBuild(MemoryError("cc1plus"), _torch_build_error(COMPILE_ERROR, 1)), Clock())
    with pytest.raises(MemoryError):
        ext.available()
    with pytest.raises(RuntimeError, match="was not declared"):
        ext.available()


# ------------------------------------------------------------------------ the backends' fallbacks


def _replace_extension(monkeypatch, module, *outcomes, clock=None):
    """``module.EXTENSION`` replaced by one with the same label and fallback whose builds are
    ``FakeBuild(*outcomes)``; returns it."""
    ext = _extension(FakeBuild(*outcomes), clock or Clock(), label=module.EXTENSION.label,
                     fallback=module.EXTENSION.fallback)
    monkeypatch.setattr(module, "EXTENSION", ext)
    return ext


def test_cpu_quantizer_falls_back_then_recovers_after_a_transient_failure(degrade, monkeypatch):
    clock = Clock()
    _replace_extension(monkeypatch, cpu_quantize, MemoryError(), "module", clock=clock)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ CPU quantizer could not be built this time .*MemoryError"):
        assert cpu_quantize.implementation() is _torch_quantize
    clock.now += RETRY_SECONDS
    assert cpu_quantize.implementation() is cpu_quantize


def test_cpu_gemm_falls_back_then_recovers_after_a_transient_failure(degrade, monkeypatch):
    monkeypatch.delenv("GDNSQ_NO_CPP_XNOR", raising=False)
    clock = Clock()
    _replace_extension(monkeypatch, cpu_xnor, _torch_build_error(KILLED_COMPILER, 1), "module", clock=clock)
    with pytest.warns(RuntimeWarning, match="popcount GEMM could not be built this time .*Killed signal"):
        assert cpu_xnor.available() is False
    clock.now += RETRY_SECONDS
    assert cpu_xnor.available() is True


def test_missing_triton_warning_names_the_import_error(tmp_path, monkeypatch):
    """A triton that is installed but fails to import is reported as such, not as "not installed"."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.delenv("GDNSQ_BACKEND", raising=False)
    backend.triton_import_error.cache_clear()
    backend._warn_fallback_once.cache_clear()
    try:
        assert backend.resolve_for_device(True) == (
            "torch", "import triton failed (ImportError: libcuda.so.1: cannot open shared object file)")
        cuda_tensor = types.SimpleNamespace(is_cuda=True)  # resolve_backend reads only is_cuda
        with pytest.warns(RuntimeWarning, match="Triton is unavailable: import triton failed .*libcuda.so.1"):
            assert backend.resolve_backend(cuda_tensor) == "torch"
        entry = gdnsq_kernels.status()["quantize"]["cuda"]
        assert entry["implementation"] == "torch" and "libcuda.so.1" in entry["reason"]
        monkeypatch.setitem(sys.modules, "triton", None)  # not installed at all
        backend.triton_import_error.cache_clear()
        assert "not installed" in backend.triton_import_error()
    finally:
        backend.triton_import_error.cache_clear()
        backend._warn_fallback_once.cache_clear()


# ------------------------------------------------------------------------ status()


@pytest.fixture
def fake_extensions(degrade, monkeypatch):
    """The three extensions replaced by fakes: the quantizer fails to compile, the GEMM and the
    deploy runtime build."""
    from gdnsq_kernels import cpu_deploy

    monkeypatch.delenv("GDNSQ_BACKEND", raising=False)
    monkeypatch.delenv("GDNSQ_NO_CPP_XNOR", raising=False)
    monkeypatch.delenv("GDNSQ_DEPLOY_ISA", raising=False)
    fakes = {"quantize": _replace_extension(monkeypatch, cpu_quantize, _torch_build_error(COMPILE_ERROR, 1)),
             "binary": _replace_extension(monkeypatch, cpu_xnor, "module")}
    isa = cpu_deploy.default_isa()
    fakes["deploy"] = _extension(FakeBuild(MemoryError()), Clock(), label=f"the C++ deploy runtime ({isa})",
                                 fallback=cpu_deploy.RUNTIME_FALLBACK)
    monkeypatch.setitem(cpu_deploy._extensions, isa, fakes["deploy"])
    return fakes, isa


def test_status_before_and_after_the_builds(fake_extensions):
    fakes, isa = fake_extensions
    before = gdnsq_kernels.status()
    assert before["quantize"]["cpu"] == {
        "implementation": "cpu",
        "reason": "GDNSQ_BACKEND=auto picks cpu for CPU tensors; the fused C++ CPU quantizer: not built "
                  "yet in this process (built on first use)"}
    assert before["binary"]["cpu"]["implementation"] == "cpu-cpp"
    assert before["deploy_runtime"]["cpu"]["implementation"] == f"runtime-{isa}"
    assert all(f._build.calls == 0 for f in fakes.values())  # status() alone builds nothing

    with pytest.warns(RuntimeWarning, match="was not declared"):
        after = gdnsq_kernels.status(build=True)
    q = after["quantize"]["cpu"]
    assert q["implementation"] == "torch" and "error: 'foo' was not declared" in q["reason"]
    assert after["binary"]["cpu"] == {
        "implementation": "cpu-cpp",
        "reason": "GDNSQ_BACKEND=auto picks cpu for CPU tensors; the C++ popcount GEMM: loaded "
                  "(extension gdnsq_fake_ext)"}
    d = after["deploy_runtime"]["cpu"]
    assert d["implementation"] == "none" and "MemoryError" in d["reason"]


def test_status_follows_the_environment(fake_extensions, monkeypatch):
    monkeypatch.setenv("GDNSQ_NO_CPP_XNOR", "1")
    entry = gdnsq_kernels.status()["binary"]["cpu"]
    assert entry["implementation"] == "cpu-numpy" and "GDNSQ_NO_CPP_XNOR=1" in entry["reason"]
    monkeypatch.setenv("GDNSQ_BACKEND", "torch")
    got = gdnsq_kernels.status()
    assert {got[f][d]["implementation"] for f in ("quantize", "binary") for d in ("cpu", "cuda")} == {"torch"}
    assert got["quantize"]["cuda"]["reason"] == "GDNSQ_BACKEND=torch"
    monkeypatch.setenv("GDNSQ_BACKEND", "cpu")
    entry = gdnsq_kernels.status()["quantize"]["cuda"]
    assert entry["implementation"] == "none" and "GDNSQ_BACKEND=cpu was requested for a CUDA tensor" in entry["reason"]


def test_status_reports_a_swar_popcount_fallback(monkeypatch):
    pytest.importorskip("triton")
    from gdnsq_kernels.binary import triton_xnor

    monkeypatch.delenv("GDNSQ_BACKEND", raising=False)
    assert gdnsq_kernels.status()["binary"]["cuda"]["reason"].endswith("popcount kernel: hardware popc.b32")
    monkeypatch.setitem(triton_xnor.HW_POPCOUNT_FAILURES, ((8, 9), "3.x", ()), "PTXASError: bad popc")
    reason = gdnsq_kernels.status()["binary"]["cuda"]["reason"]
    assert "SWAR" in reason and "(8, 9)" in reason and "PTXASError: bad popc" in reason
