"""Helpers around ``torch.utils.cpp_extension.load`` shared by the C++ CPU ops."""
from __future__ import annotations

import os
import time
import warnings

#: A build of one of our extensions takes well under a minute; a build lock older than this was
#: left by a process killed mid-build (torch's file baton never expires, so every later load
#: would wait on it forever).
STALE_LOCK_SECONDS = 600.0


def require_cpp() -> bool:
    """``GDNSQ_REQUIRE_CPP=1``: a C++ build failure raises instead of degrading (tests, CI)."""
    return os.environ.get("GDNSQ_REQUIRE_CPP", "0").strip().lower() in ("1", "true", "yes", "on")


def extension_build_dir(name: str) -> str:
    """The folder torch builds extension ``name`` in (``$TORCH_EXTENSIONS_DIR`` aware)."""
    from torch.utils.cpp_extension import _get_build_directory

    return _get_build_directory(name, verbose=False)


def clear_stale_build_lock(build_dir: str, max_age_seconds: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_seconds``; True if removed.

    A fresh lock belongs to a build in progress in another process and is left alone.
    """
    lock = os.path.join(build_dir, "lock")
    try:
        age = time.time() - os.path.getmtime(lock)
    except OSError:
        return False
    if age < max_age_seconds:
        return False
    try:
        os.remove(lock)
    except OSError:
        return False
    warnings.warn(f"gdnsq_kernels: removed a stale C++ build lock ({lock}, {age / 60:.0f} min old) "
                  "left by an interrupted build; rebuilding", RuntimeWarning, stacklevel=2)
    return True


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
