"""benchmarks/gpu_check.sh on a machine without CUDA: a clear exit with summary.json, before any
GPU step (what makes it quick; checked from the steps recorded, not from a wall clock)."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _file_state(path: pathlib.Path):
    """(inode, size, mtime in ns) of ``path``, or None when it does not exist."""
    if not path.exists():
        return None
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_exits_before_any_gpu_step(tmp_path):
    out = tmp_path / "results"  # relative OUT: resolved against the caller's directory
    default_summary = ROOT / "benchmarks" / "results" / "gpu" / "summary.json"
    default_before = _file_state(default_summary)
    # the script runs `python` from PATH: make that this interpreter (an unactivated venv)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, OUT="results", GDNSQ_COMMIT="abc123", PATH=path)
    env.pop("GPU_CHECK_ALLOW_CPU", None)  # the no-CUDA exit is what is checked here
    # the timeout only keeps a broken script from hanging the suite
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda"] is False and summary["commit"] == "abc123"
    assert summary["versions"]["torch"] == torch.__version__
    # only the preflight ran: no tests, bench, qat or ptx step was started, and none wrote a log
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("preflight", "no-cuda")]
    written = {p.name for p in out.iterdir()}
    assert {"gpu_check.log", "summary.json", "versions.json"} <= written
    assert written <= {"gpu_check.log", "nvidia-smi-q.txt", "summary.json", "versions.json"}, written
    # OUT was honoured: the default results folder was not written
    assert _file_state(default_summary) == default_before
