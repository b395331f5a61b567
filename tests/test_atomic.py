"""gdnsq._atomic: the process umask is never changed (other threads' files keep their
permissions), the written file gets the permissions of a plain open(), the folder is
fsync'ed after the rename, and the benchmark scripts write through these helpers."""
import ast
import os
import pathlib
import stat
import threading

import pytest

from gdnsq._atomic import atomic_append_text, atomic_open, atomic_write_bytes, atomic_write_text


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_other_threads_files_keep_the_umask(tmp_path, umask_022, monkeypatch):
    """Whenever an atomic write touches the umask, a second thread creates a file at that
    very moment: every file it creates must have the permissions the umask 022 gives."""
    real_umask = os.umask
    created = []

    def create_file_now():
        path = tmp_path / f"other-{len(created)}"
        path.write_text("x")
        created.append(path)

    def umask_with_a_file_created_meanwhile(mask):
        previous = real_umask(mask)
        worker = threading.Thread(target=create_file_now)
        worker.start()
        worker.join()
        return previous

    monkeypatch.setattr(os, "umask", umask_with_a_file_created_meanwhile)
    writers = [threading.Thread(target=atomic_write_text, args=(tmp_path / f"atomic-{i}.txt", "data"))
               for i in range(4)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    create_file_now()  # at least one file, whether or not the umask was touched
    assert [(p.name, oct(_mode(p))) for p in created if _mode(p) != 0o644] == []
    for i in range(4):
        assert _mode(tmp_path / f"atomic-{i}.txt") == 0o644


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_file_has_plain_open_permissions(tmp_path, mask):
    previous = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"123")
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"123")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "a.bin") == 0o666 & ~mask == _mode(tmp_path / "plain.bin")
    assert (tmp_path / "a.bin").read_bytes() == b"123"


def test_parent_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    real_fsync, real_replace = os.fsync, os.replace
    events = []

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode), os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace",))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "sub" / "r.json", "{}")
    folder_inode = os.stat(tmp_path / "sub").st_ino
    assert events[-2:] == [("replace",), ("fsync", True, folder_inode)]
    assert events[0][:2] == ("fsync", False)  # the data itself, before the rename


def test_failure_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "t.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target, "w", encoding="utf-8") as f:
            f.write("new, partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]


def test_folder_that_cannot_be_fsynced_is_skipped(tmp_path, monkeypatch):
    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # EINVAL: e.g. a FUSE mount

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(tmp_path / "f.txt", "ok")
    assert (tmp_path / "f.txt").read_text() == "ok"


def test_bad_mode_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def _file_writes(tree):
    """(line, what) of every call in a module that writes a file by itself: ``open`` with a
    write/append mode, ``tempfile.mkstemp``, ``os.replace``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("tempfile.mkstemp", "os.replace", "os.rename"):
            found.append((node.lineno, name))
        elif name in ("open", "io.open") or name.endswith(".open"):
            modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
            for m in modes:
                if isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax"):
                    found.append((node.lineno, f"{name}(..., {m.value!r})"))
    return found


def test_benchmarks_write_through_the_one_helper():
    bench = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    offenders = {}
    for script in sorted(bench.glob("*.py")):
        writes = _file_writes(ast.parse(script.read_text(encoding="utf-8")))
        if writes:
            offenders[script.name] = writes
    assert offenders == {}, "use gdnsq._atomic (atomic_write_text / atomic_append_text) instead"


def test_append_rewrites_atomically(tmp_path):
    log = tmp_path / "log.jsonl"
    atomic_append_text(log, "a\n")
    atomic_append_text(log, "b\n")
    assert log.read_text() == "a\nb\n"
