"""The C++ build lock (gdnsq_kernels._build): one builder at a time across processes, a builder
killed mid-build never blocks the others, a live one is never preempted however old its lock,
and a wait is bounded. The builds here are fakes (tests/_build_lock_worker.py): no compiler."""
import os
import signal
import subprocess
import sys
import time

import pytest

from gdnsq_kernels._build import (LOCK_POLL_SECONDS, BuildLockTimeout, build_extension, build_lock_path,
                                  extension_build_dir)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_lock_worker.py")
NAME = "gdnsq_fake_ext"  # the worker's extension name
# Only a safety net against a hang: none of the assertions is about elapsed time.
PROCESS_TIMEOUT = 120


def _spawn(mode, build_dir, log):
    return subprocess.Popen([sys.executable, WORKER, mode, str(build_dir), str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc):
    out, _ = proc.communicate(timeout=PROCESS_TIMEOUT)
    assert proc.returncode == 0, out
    return out


def _events(log):
    return [line.split(" ", 2) for line in log.read_text().splitlines()] if log.exists() else []


def _wait_for(log, event, pid):
    """Wait until the worker ``pid`` logged ``event`` (or died, or the safety net ran out)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while [event, str(pid)] not in [e[:2] for e in _events(log)]:
        assert time.monotonic() < deadline, f"worker {pid} never logged {event!r}: {_events(log)}"
        time.sleep(0.05)


def _assert_one_at_a_time(events, killed=()):
    """Builds never overlap: every start is followed by its own end (a killed builder's start
    by nothing of its own), and no build began while torch's baton was still there."""
    assert not [e for e in events if e[0] in ("baton-present", "timeout")], events
    open_build = None
    for kind, pid, *_ in events:
        if kind == "start":
            assert open_build is None or open_build in killed, f"{pid} started inside {open_build}'s build"
            open_build = pid
        elif kind == "end":
            assert open_build == pid, events
            open_build = None


@pytest.fixture
def build_dir(tmp_path):
    d = tmp_path / NAME
    d.mkdir()
    return d


def test_concurrent_builders_run_one_at_a_time(build_dir, tmp_path):
    log = tmp_path / "events.log"
    procs = [_spawn("build", build_dir, log) for _ in range(4)]
    for p in procs:
        _finish(p)
    events = _events(log)
    _assert_one_at_a_time(events)
    assert sorted(pid for kind, pid, *_ in events if kind == "end") == sorted(str(p.pid) for p in procs)


def test_builder_killed_mid_build_does_not_block_the_others(build_dir, tmp_path):
    log = tmp_path / "events.log"
    holder = _spawn("hold", build_dir, log)
    _wait_for(log, "holding", holder.pid)
    waiters = [_spawn("build", build_dir, log) for _ in range(3)]
    holder.send_signal(signal.SIGKILL)  # mid-build: the lock file and torch's baton stay behind
    holder.wait(timeout=PROCESS_TIMEOUT)
    outputs = [_finish(p) for p in waiters]
    events = _events(log)
    _assert_one_at_a_time(events, killed=(str(holder.pid),))
    assert sorted(pid for kind, pid, *_ in events if kind == "end") == sorted(str(p.pid) for p in waiters)
    # the first builder after the kill removed the baton torch would have waited on forever
    assert sum("removed torch's build lock" in out for out in outputs) == 1
    assert not (build_dir / "lock").exists()


def test_live_holder_is_never_preempted_however_old_its_lock(build_dir, tmp_path):
    log = tmp_path / "events.log"
    holder = _spawn("hold", build_dir, log)
    try:
        _wait_for(log, "holding", holder.pid)
        two_hours_ago = time.time() - 7200  # far older than any "stale lock" age
        for f in (build_lock_path(str(build_dir)), build_dir / "lock"):
            os.utime(f, (two_hours_ago, two_hours_ago))
        # another process, one attempt: refused, and it names the extension, lock and holder
        _finish(_spawn("try", build_dir, log))
        [timeout] = [e for e in _events(log) if e[0] == "timeout"]
        assert NAME in timeout[2] and build_lock_path(str(build_dir)) in timeout[2]
        assert f"pid {holder.pid}" in timeout[2]
        # this process, a bounded wait on an injected clock: it polls until the deadline, then
        # gives up without touching the holder's files
        now, sleeps = [0.0], []

        def sleep(seconds):
            sleeps.append(seconds)
            now[0] += seconds

        with pytest.raises(BuildLockTimeout, match=f"waited 30 s for the build lock of C\\+\\+ extension '{NAME}'"):
            build_extension(NAME, lambda: pytest.fail("built while the lock was held"), build_dir=str(build_dir),
                            timeout=30.0, clock=lambda: now[0], sleep=sleep)
        assert len(sleeps) == pytest.approx(30.0 / LOCK_POLL_SECONDS, abs=1)
        assert holder.poll() is None and (build_dir / "lock").exists()
        assert [e[0] for e in _events(log)] == ["start", "holding", "timeout"]
    finally:
        holder.kill()
        holder.wait(timeout=PROCESS_TIMEOUT)
    # once the holder is gone the lock is free at the first attempt (and its baton is cleared)
    with pytest.warns(RuntimeWarning, match="removed torch's build lock"):
        assert build_extension(NAME, lambda: "built", build_dir=str(build_dir), timeout=0.0) == "built"


def test_lock_file_sits_beside_the_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    d = extension_build_dir("gdnsq_lock_probe")
    assert d.startswith(str(tmp_path)) and d.endswith("gdnsq_lock_probe") and os.path.isdir(d)
    assert os.path.dirname(build_lock_path(d)) == os.path.dirname(os.path.normpath(d))
    assert build_extension("gdnsq_lock_probe", lambda: 7) == 7
    assert os.path.exists(build_lock_path(d)) and not os.path.exists(os.path.join(d, "lock"))


def test_bad_timeout_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("GDNSQ_BUILD_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="GDNSQ_BUILD_LOCK_TIMEOUT must be a number of seconds"):
        build_extension(NAME, lambda: None, build_dir=str(tmp_path / NAME))


def test_real_extension_loads_past_a_baton_left_by_a_killed_build(tmp_path):
    """torch's own baton left in the real build folder (what a build killed mid-way leaves):
    the next load removes it and proceeds, where torch alone would wait forever."""
    from gdnsq_kernels.binary import cpu_xnor

    build_dir = extension_build_dir(cpu_xnor.EXTENSION.spec().name)
    with open(os.path.join(build_dir, "lock"), "w"):
        pass
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from gdnsq_kernels.binary import cpu_xnor; "
            "cpu_xnor.load_extension(); print('loaded')")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-c", code, repo], capture_output=True, text=True,
                              timeout=600, env=env)
    finally:
        if os.path.exists(os.path.join(build_dir, "lock")):
            os.remove(os.path.join(build_dir, "lock"))
    assert done.returncode == 0 and "loaded" in done.stdout, done.stdout + done.stderr
    assert "removed torch's build lock" in done.stderr
