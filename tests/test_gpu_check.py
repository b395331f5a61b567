"""benchmarks/gpu_check.sh on a machine without CUDA: a quick, clear exit with summary.json."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_exits_quickly_with_summary(tmp_path):
    out = tmp_path / "results"  # relative OUT: resolved against the caller's directory
    # the script runs `python` from PATH: make that this interpreter (an unactivated venv)
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, OUT="results", GDNSQ_COMMIT="abc123", PATH=path)
    env.pop("GPU_CHECK_ALLOW_CPU", None)  # the no-CUDA exit is what is checked here
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cuda"] is False and summary["commit"] == "abc123"
    assert summary["steps"][0]["step"] == "preflight" and summary["steps"][0]["status"] == "no-cuda"
    assert summary["versions"]["torch"] == torch.__version__
    assert elapsed < 60, elapsed  # seconds, not the minutes of the GPU steps
    assert not (ROOT / "benchmarks" / "results" / "gpu" / "summary.json").exists() or \
        (ROOT / "benchmarks" / "results" / "gpu" / "summary.json").stat().st_mtime < t0
