"""A process of tests/test_build_lock.py: runs a fake "build" of an extension under
``gdnsq_kernels._build.build_extension`` (no compiler, no torch import).

    python _build_lock_worker.py MODE BUILD_DIR LOG

MODE ``build``: start, create torch's baton ``BUILD_DIR/lock`` as torch's ``load`` does, pause
briefly, remove the baton, end. ``hold``: start, create the baton, then sleep until killed (a
builder killed mid-build). ``try``: ``build`` with a lock timeout of 0 (one attempt).
Each event is one line appended to LOG (O_APPEND: lines never interleave):
``start PID``, ``end PID``, ``baton-present PID`` (torch's baton was there when the build
began: it would have made torch wait), ``timeout PID MESSAGE``.
"""
import importlib.util
import os
import sys
import time

# _build.py loaded by path, not through the package: importing gdnsq_kernels would import torch
# and Triton, seconds per process, and _build itself needs neither.
_spec = importlib.util.spec_from_file_location(
    "gdnsq_build_under_test",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "gdnsq_kernels", "_build.py"))
_build = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

EXTENSION_NAME = "gdnsq_fake_ext"


def log_line(log: str, text: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def fake_build(mode: str, build_dir: str, log: str) -> None:
    pid = os.getpid()
    baton = os.path.join(build_dir, "lock")
    log_line(log, f"start {pid}")
    if os.path.exists(baton):
        log_line(log, f"baton-present {pid}")
    with open(baton, "w"):
        pass
    if mode == "hold":
        log_line(log, f"holding {pid}")
        time.sleep(3600)
    time.sleep(0.05)  # a window in which a second, unlocked builder would show up in the log
    os.remove(baton)
    log_line(log, f"end {pid}")


def main() -> int:
    mode, build_dir, log = sys.argv[1:4]
    try:
        _build.build_extension(EXTENSION_NAME, lambda: fake_build(mode, build_dir, log), build_dir=build_dir,
                        timeout=0.0 if mode == "try" else 120.0)
    except _build.BuildLockTimeout as exc:
        log_line(log, f"timeout {os.getpid()} {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
