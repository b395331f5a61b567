"""A C++ build lock left by a killed build is cleared (torch's own baton waits on it forever);
a fresh lock (a build in progress elsewhere) is left alone."""
import os
import time

import pytest

from gdnsq_kernels._build import STALE_LOCK_SECONDS, clear_stale_build_lock, extension_build_dir


def test_stale_lock_removed_fresh_lock_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.write_text("")
    assert clear_stale_build_lock(str(tmp_path)) is False and lock.exists()
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale C\\+\\+ build lock"):
        assert clear_stale_build_lock(str(tmp_path)) is True
    assert not lock.exists()
    assert clear_stale_build_lock(str(tmp_path)) is False  # nothing to do


def test_build_dir_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = extension_build_dir("gdnsq_lock_probe")
    assert d.startswith(str(tmp_path)) and d.endswith("gdnsq_lock_probe") and os.path.isdir(d)
