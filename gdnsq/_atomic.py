"""Atomic file writes shared by every writer in gdnsq (checkpoints, reports, plots, artifacts,
data caches) and by the benchmark scripts.

The data goes to a temporary file in the destination folder, is flushed and fsync'ed, then
``os.replace`` moves it into place and the folder itself is fsync'ed (so that the rename
survives a power loss). A reader, or a crash, sees either the old file or the complete new
one, never a partial write; the temporary file is removed on any failure.

The temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the process
umask (and any default ACL) exactly as for a plain ``open()``: the process-wide umask is never
read by toggling it, which would briefly change the permissions of files other threads create.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets

# How many fresh random names to try before giving up (a collision needs another writer
# that picked the same 64-bit name in the same folder).
_TEMP_NAME_ATTEMPTS = 100


def _create_temp_file(directory: str, base: str) -> tuple[int, str]:
    """(fd opened for writing, path) of a new, empty, uniquely named file in ``directory``,
    created with mode ``0o666`` filtered by the umask, like ``open(path, "w")``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TEMP_NAME_ATTEMPTS):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary file name for {base!r} in {directory}")


def fsync_directory(directory: str) -> None:
    """fsync a folder, making a rename or a new entry in it durable. Filesystems that cannot
    fsync a folder (EINVAL/ENOTSUP on some network and FUSE mounts) are skipped."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", encoding: str | None = None):
    """Context manager yielding a file object whose content replaces ``path`` on success."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _create_temp_file(directory, os.path.basename(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_append_text(path, text: str) -> None:
    """Append ``text`` to ``path`` (created if missing) by rewriting the whole file atomically:
    a reader never sees a half-written line. For logs with one writer at a time (two
    concurrent appenders would each rewrite the file and one append would be lost)."""
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    atomic_write_text(path, old + text)


def atomic_torch_save(obj, path) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
