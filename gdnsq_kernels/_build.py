"""Building and loading the package's C++ CPU extensions (quantizer, popcount GEMM, deploy
runtime), shared by ``quantize/cpu_quantize.py``, ``binary/cpu_xnor.py`` and ``cpu_deploy.py``.

**One build at a time per extension, across processes.** Every build or load of extension
``name`` holds an exclusive ``fcntl.flock`` on ``<build folder>.gdnsq-lock``, a file beside
torch's build folder (``$TORCH_EXTENSIONS_DIR/<name>``). The kernel releases the lock when
its holder exits or is killed, so a dead builder never blocks anyone, and a live one is never
preempted however long its build takes. A waiter gives up after ``GDNSQ_BUILD_LOCK_TIMEOUT``
seconds (default ``BUILD_LOCK_TIMEOUT_SECONDS``) with a ``BuildLockTimeout`` naming the
extension, the lock file and the holder's pid.

torch's ``load`` has its own lock, a ``lock`` file in the build folder created with
``O_EXCL`` that its waiters poll forever; a process killed mid-build leaves it behind. Only
flock holders call ``load``, so a ``lock`` file found while holding the flock was left by a
dead build: it is removed before ``load`` runs, and torch's wait can never hang.

**Failures that do not latch.** ``Extension.available()`` is the fallback decision of the
quantizer and GEMM backends. A build failure is *deterministic* (a compile error, a missing
compiler or ninja, an unloadable library: the same build fails again) or *transient* (out of
memory or disk, a compiler killed by a signal, an interrupted build, a lock wait that timed
out; ``is_transient_failure``). A deterministic failure is remembered under what decides it
(the extension name, which hashes source and flags, and the ``CXX``/``PATH`` that pick the
toolchain); a transient one only pauses the C++ path for ``RETRY_SECONDS``, after which the
next call tries again (without waiting for the lock). ``KeyboardInterrupt`` propagates and
changes nothing. Every fallback warns with its cause; ``Extension.describe()`` says which path
is in use and why (``gdnsq_kernels.status()``).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the GCC-flagged C++ builds do not apply there either
    fcntl = None

#: How long a process waits for another one's build of the same extension. A build takes about
#: a minute; this bounds the wait on a builder that is alive but stuck.
BUILD_LOCK_TIMEOUT_SECONDS = 600.0
#: After a transient build failure the C++ path is retried after this long (seconds).
RETRY_SECONDS = 60.0
#: Poll interval of a lock wait (seconds); flock has no timed wait.
LOCK_POLL_SECONDS = 0.2


class BuildLockTimeout(TimeoutError):
    """Another process held an extension's build lock longer than the wait allowed."""


def require_cpp() -> bool:
    """``GDNSQ_REQUIRE_CPP=1``: a C++ build failure raises instead of degrading (tests, CI)."""
    return os.environ.get("GDNSQ_REQUIRE_CPP", "0").strip().lower() in ("1", "true", "yes", "on")


def build_lock_timeout() -> float:
    """Seconds to wait for an extension's build lock: ``GDNSQ_BUILD_LOCK_TIMEOUT`` or the default."""
    text = os.environ.get("GDNSQ_BUILD_LOCK_TIMEOUT", "").strip()
    if not text:
        return BUILD_LOCK_TIMEOUT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"GDNSQ_BUILD_LOCK_TIMEOUT must be a number of seconds >= 0, got {text!r}")
    return seconds


def extension_build_dir(name: str) -> str:
    """The folder torch builds extension ``name`` in (``$TORCH_EXTENSIONS_DIR`` aware)."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def build_lock_path(build_dir: str) -> str:
    """The lock file of the build in ``build_dir``: beside the folder, not in it, so that it
    survives the folder being deleted."""
    return os.path.normpath(build_dir) + ".gdnsq-lock"


def _lock_holder(fd: int) -> str:
    """The pid the current holder wrote into the lock file ("unknown" when it has not yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "an unknown process"


@contextlib.contextmanager
def build_lock(name: str, build_dir: str, timeout: Optional[float] = None, *,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
    """Hold the exclusive build lock of extension ``name`` (whose build folder is ``build_dir``)
    for the body of the ``with``; yields the lock file's path.

    Waits at most ``timeout`` seconds (default ``build_lock_timeout()``; 0: one try), then
    raises ``BuildLockTimeout``. ``clock``/``sleep`` are injectable for tests.
    """
    if fcntl is None:
        raise OSError(errno.ENOTSUP, "the C++ extension builds need POSIX file locks (fcntl)")
    timeout = build_lock_timeout() if timeout is None else timeout
    path = build_lock_path(build_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # O_CLOEXEC: a compiler started by the build must not inherit (and so extend) the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = clock() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    raise BuildLockTimeout(
                        f"gdnsq_kernels: waited {timeout:.0f} s for the build lock of C++ extension "
                        f"{name!r} ({path}), held by {_lock_holder(fd)}; raise "
                        "GDNSQ_BUILD_LOCK_TIMEOUT to wait longer") from None
                sleep(LOCK_POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock (as the kernel does if this process dies)


def _remove_torch_baton(build_dir: str) -> None:
    """Delete torch's ``build_dir/lock`` (called with the build lock held, so it is stale)."""
    baton = os.path.join(build_dir, "lock")
    try:
        os.remove(baton)
    except FileNotFoundError:
        return
    warnings.warn(f"gdnsq_kernels: removed torch's build lock {baton}, left by a build that was "
                  "killed; rebuilding", RuntimeWarning, stacklevel=3)


def build_extension(name: str, build: Callable[[], object], *, build_dir: Optional[str] = None,
                    timeout: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep):
    """``build()`` (torch's ``load`` of extension ``name``) run under the build lock; returns
    its result. ``build_dir``: torch's build folder of ``name`` (default: where torch puts it)."""
    build_dir = extension_build_dir(name) if build_dir is None else build_dir
    with build_lock(name, build_dir, timeout, clock=clock, sleep=sleep):
        _remove_torch_baton(build_dir)
        return build()


# ------------------------------------------------------------------------------ failure kinds

_TRANSIENT_ERRNOS = {errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EINTR, errno.EAGAIN,
                     errno.EBUSY, errno.ETIMEDOUT}
# What the compiler / ninja print (and torch copies into its RuntimeError) when a build was
# stopped by its environment rather than by the source.
_TRANSIENT_TEXT = re.compile(
    r"out of memory|cannot allocate memory|no space left on device|disk quota exceeded"
    r"|killed signal terminated program|internal compiler error: killed|interrupted by user",
    re.IGNORECASE)


def _causes(exc: BaseException):
    """``exc`` and the exceptions it was raised from (``__cause__``/``__context__``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient_failure(exc: BaseException) -> bool:
    """Whether a failed build or load could succeed if simply retried (see the module doc)."""
    for e in _causes(exc):
        if isinstance(e, (MemoryError, TimeoutError, InterruptedError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if isinstance(e, subprocess.CalledProcessError) and e.returncode < 0:
            return True  # the compiler or ninja was killed by a signal
        if _TRANSIENT_TEXT.search(str(e)):
            return True
    return False


def failure_cause(exc: BaseException, limit: int = 300) -> str:
    """One line naming why a build failed: the exception type and its first ``error`` line
    (a compile error's message, not ninja's closing "build stopped"), else its last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berror\b", ln, re.IGNORECASE)
              and not ln.startswith("Error building extension")]
    line = errors[0] if errors else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {line}"[:limit]


# ------------------------------------------------------------------------------ one extension

@dataclass(frozen=True)
class BuildSpec:
    """What ``torch.utils.cpp_extension.load`` is given for one extension."""

    name: str
    source: str
    cflags: tuple
    ldflags: tuple = ("-fopenmp",)


# Part of every build folder's name: builds by gdnsq versions without the flock (which run
# torch's ``load`` unlocked) never share a folder with builds that rely on it.
_LOCK_PROTOCOL = "flock-1"


def build_spec(prefix: str, source: str, cflags) -> BuildSpec:
    """The spec of extension ``prefix_<hash>``. torch's extension cache is shared by every
    checkout on the machine, so the folder is keyed by a hash of the source text, its path and
    the flags: one fixed name would let a checkout load (or overwrite mid-run) another version's
    build, and checkouts at different paths would make ninja rebuild the shared folder each
    time the other one loads it."""
    with open(source, "rb") as f:
        text = f.read()
    key = b"\0".join([text, os.path.abspath(source).encode(), " ".join(cflags).encode(),
                       _LOCK_PROTOCOL.encode()])
    return BuildSpec(f"{prefix}_{hashlib.sha1(key).hexdigest()[:12]}", source, tuple(cflags))


def torch_load(spec: BuildSpec):
    """Build (if needed) and import ``spec`` with torch; call it under the build lock."""
    from torch.utils.cpp_extension import load

    return load(name=spec.name, sources=[spec.source], extra_cflags=list(spec.cflags),
                extra_ldflags=list(spec.ldflags), verbose=False)


class Extension:
    """One C++ extension in this process: loaded on first use under the build lock, then kept.

    ``label`` names it in warnings ("the fused C++ CPU quantizer"); ``fallback`` names what
    runs without it; ``spec`` computes its ``BuildSpec`` (once); ``build`` builds and imports
    a spec (``torch_load``; tests inject a fake); ``clock`` times the transient retries.
    """

    def __init__(self, label: str, fallback: str, spec: Callable[[], BuildSpec], *,
                 build: Callable[[BuildSpec], object] = torch_load,
                 clock: Callable[[], float] = time.monotonic, lock_sleep: Callable[[float], None] = time.sleep):
        self.label, self.fallback = label, fallback
        self._spec_fn, self._spec = spec, None
        self._build, self._clock, self._lock_sleep = build, clock, lock_sleep
        self.module = None
        self._lock = threading.Lock()
        self._deterministic: dict = {}   # build key -> cause
        self._transient = None           # (cause, clock time of the next try) or None
        self._announced = None           # the last fallback warning given

    def spec(self) -> BuildSpec:
        if self._spec is None:
            self._spec = self._spec_fn()
        return self._spec

    def build_key(self) -> tuple:
        """What decides whether the build succeeds: the name (source and flags) and the toolchain."""
        return (self.spec().name, os.environ.get("CXX"), os.environ.get("PATH"))

    def load(self, timeout: Optional[float] = None):
        """The module, built or loaded now if it is not yet; raises on failure (after noting
        it for ``available`` and ``describe``)."""
        with self._lock:
            if self.module is not None:
                return self.module
            spec, key = self.spec(), self.build_key()
            try:
                self.module = build_extension(spec.name, lambda: self._build(spec), timeout=timeout,
                                              clock=self._clock, sleep=self._lock_sleep)
            except Exception as exc:
                cause = failure_cause(exc)
                if is_transient_failure(exc):
                    self._transient = (cause, self._clock() + RETRY_SECONDS)
                else:
                    self._deterministic[key] = cause
                raise
            self._transient = None
            return self.module

    def available(self) -> bool:
        """True when the module is loaded or loads now. On a failure: raises under
        ``GDNSQ_REQUIRE_CPP=1``, else warns with the cause (once per cause) and returns False
        (see the module doc for which failures are remembered and which are retried)."""
        if self.module is not None:
            return True
        if require_cpp():  # no fallback, so nothing remembered either: build now or raise
            self.load()
            return True
        key = self.build_key()
        paused = self._transient is not None and self._clock() < self._transient[1]
        if key not in self._deterministic and not paused:
            try:
                # A retry does not wait for the lock: if someone else is building, try later.
                self.load(timeout=0.0 if self._transient is not None else None)
                return True
            except Exception:
                pass  # load() noted the failure; the warning below names it
        self._announce_fallback(key)
        return False

    def _announce_fallback(self, key: tuple) -> None:
        if key in self._deterministic:
            message = (f"gdnsq_kernels: {self.label} could not be built ({self._deterministic[key]}); "
                       f"using {self.fallback} instead")
        else:
            message = (f"gdnsq_kernels: {self.label} could not be built this time ({self._transient[0]}); "
                       f"using {self.fallback}, retrying in {RETRY_SECONDS:.0f} s")
        if message != self._announced:
            self._announced = message
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def describe(self) -> tuple:
        """(True: in use / False: fallback in use / None: not tried yet, the reason)."""
        if self.module is not None:
            return True, f"{self.label}: loaded (extension {self.spec().name})"
        cause = self._deterministic.get(self.build_key())
        if cause is not None:
            return False, f"{self.label} failed to build ({cause}); {self.fallback} is used"
        if self._transient is not None:
            return False, (f"{self.label} failed to build this time ({self._transient[0]}); "
                           f"{self.fallback} is used until a retry succeeds")
        return None, f"{self.label}: not built yet in this process (built on first use)"


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where there is none): the C++
    extensions choose their instruction set from these at build time."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
