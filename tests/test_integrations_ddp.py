"""docs/integrations.md, hand-written loop under DDP: the example script, run as written in 2
gloo processes, ends where one process on the concatenated batches ends."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import _doc_examples

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ddp_hand_written_loop_equals_one_process(tmp_path):
    script = tmp_path / "ddp_example.py"
    script.write_text(_doc_examples.python_blocks("A hand-written loop under DDP")[0], encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP == one process" in done.stdout
    r0, r1, single = (torch.load(tmp_path / "out" / f"{name}.pt", weights_only=True)
                      for name in ("rank0", "rank1", "single"))
    # The ranks are identical (same steps, same mu, same schedule and hold decisions) ...
    assert r0["student"].keys() == r1["student"].keys() == single["student"].keys()
    for key in r0["student"]:
        assert torch.equal(r0["student"][key], r1["student"][key]), key
    assert r0["mu"] == r1["mu"] and r0["schedule"] == r1["schedule"]
    # ... and equal to the single process on the concatenated batches, ...
    for key, value in single["student"].items():
        torch.testing.assert_close(r0["student"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert r0["mu"] == pytest.approx(single["mu"], rel=1e-5) and r0["mu"] > 0
    assert r0["schedule"]["last_epoch"] == single["schedule"]["last_epoch"] == 2 * (256 // 2 // 16)
    assert r0["schedule"]["checks"] == single["schedule"]["checks"] == 2
    # ... after steps that moved the weights far beyond the tolerance.
    namespace = {"__name__": "ddp_example"}
    exec(script.read_text(encoding="utf-8"), namespace)
    start = namespace["pieces"]()[0].state_dict()
    moved = max(float((single["student"][k] - start[k]).abs().max()) for k in start if start[k].is_floating_point())
    assert moved > 1e-2
