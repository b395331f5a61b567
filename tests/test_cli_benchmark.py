"""`gdnsq benchmark` on a small exported ResNet-20 (W2A2, random weights): the JSON rows, the
FP32 baseline's weights, the progress bar and the usage errors (exit 2, one line naming the flag).
No timing is asserted."""
import json
import os

import pytest
import torch

from gdnsq import cli

from _deploy_helpers import set_bits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from gdnsq.convert import quantize_model
    from gdnsq.deploy import freeze, save
    from gdnsq.models import get_model

    torch.manual_seed(0)
    student = quantize_model(get_model("resnet20", 10).eval(), 2, 2, teacher=False)
    with torch.no_grad():
        set_bits(student, torch.randn(4, 3, 32, 32), 2, 2)
    path = tmp_path_factory.mktemp("bench") / "r20_w2a2.gdnsq"
    save(freeze(student.eval(), path="int"), path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}},
         normalization="imagenet")
    return path, student


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_benchmark_json_rows(exported, capsys, monkeypatch):
    path, _ = exported
    # --compile's row without compiling (inductor takes minutes on a loaded CPU): the command must
    # time whatever torch.compile returns under the name fp32-compile
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)
    code, out, err = _run(capsys, ["benchmark", str(path), "--batch-sizes", "1", "3", "--threads", "1",
                                   "--reps", "2", "--warmup", "0", "--compile", "--json"])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["input_shape"] == [3, 32, 32] and res["architecture"]["name"] == "resnet20"
    assert len(compiled) == 1
    rows = res["rows"]
    assert [(r["model"], r["batch"], r["threads"]) for r in rows] == [
        (m, b, 1) for b in (1, 3) for m in ("fp32", "fp32-compile", "deployed")]
    for r in rows:
        assert r["reps"] == 2 and 0 < r["min_ms"] <= r["median_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3))
        fp = next(f for f in rows if f["model"] == "fp32" and f["batch"] == r["batch"])
        assert r["speedup_vs_fp32"] == pytest.approx(fp["median_ms"] / r["median_ms"])
    system = res["system"]
    assert {"cpu", "cpu_flags", "torch", "gdnsq", "loadavg", "loadavg_after", "date"} <= set(system)
    assert system["torch"] == torch.__version__
    assert "| deployed | 3 | 1 |" in out  # the human table comes before the JSON line
    assert "benchmark" not in err  # --json: no progress bar


def test_benchmark_progress_and_threads(exported, capsys):
    path, _ = exported
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # a thread count other than the current one
    if other > (os.cpu_count() or 1):
        pytest.skip("one CPU")
    code, out, err = _run(capsys, ["benchmark", str(path), "--batch-sizes", "2", "--threads", str(other),
                                   "--reps", "1", "--warmup", "1"])
    assert code == 0, err
    assert "benchmark: 2/2" in err  # the progress bar's closing line (stderr is not a terminal)
    assert f"| fp32 | 2 | {other} |" in out and "vs FP32" in out
    assert torch.get_num_threads() == before  # the thread count is restored


def test_fp32_counterpart_holds_the_dequantized_weights(exported):
    """The FP32 baseline: float layers as stored, quantized layers as float convs/linears holding
    the fake-quant model's quantized weight (computed here by the quantizer reference)."""
    from gdnsq.cli.benchmark import fp32_counterpart
    from gdnsq_kernels.quantize import reference as kref

    path, student = exported
    fp = fp32_counterpart(path)
    assert not any(hasattr(m, "weight_quantizer") for m in fp.modules())
    assert all(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in fp.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    quantized = {n: m for n, m in student.named_modules() if hasattr(m, "weight_quantizer")}
    assert len(quantized) == 18
    fp_state = fp.state_dict()
    for name, m in quantized.items():
        w_hat, _ = kref.weight_forward(m.weight.detach(), m.weight_quantizer.log2_step.detach())
        torch.testing.assert_close(fp_state[f"{name}.weight"], w_hat, rtol=0, atol=0)
    for key, value in student.state_dict().items():
        if key.rpartition(".")[0].split(".weight_quantizer")[0].split(".act_quantizer")[0] in quantized:
            continue
        torch.testing.assert_close(fp_state[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("argv,flag", [
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "two"], "--batch-sizes"),
    (["--threads", "0"], "--threads"),
    (["--threads", "100000"], "--threads"),
    (["--reps", "-1"], "--reps"),
    (["--input-shape", "5", "32", "32"], "--input-shape"),
], ids=["batch0", "batch-text", "threads0", "threads-too-many", "reps-negative", "bad-shape"])
def test_benchmark_usage_errors(exported, capsys, argv, flag):
    path, _ = exported
    code, out, err = _run(capsys, ["benchmark", str(path), "--reps", "1", "--warmup", "0", *argv])
    assert code == 2 and flag in _one_line_error(err)
    assert "| deployed |" not in out


def test_benchmark_bad_files(tmp_path, capsys):
    from gdnsq.models import get_model, save_fp_checkpoint

    code, _, err = _run(capsys, ["benchmark", str(tmp_path / "missing.gdnsq")])
    assert code == 2 and "MODEL: file not found" in _one_line_error(err)
    code, _, err = _run(capsys, ["benchmark", str(tmp_path)])
    assert code == 2 and "MODEL:" in _one_line_error(err) and "folder" in err
    (tmp_path / "junk.gdnsq").write_bytes(b"junk")
    code, _, err = _run(capsys, ["benchmark", str(tmp_path / "junk.gdnsq")])
    assert code == 2 and "MODEL:" in _one_line_error(err)
    ckpt = tmp_path / "fp.th"  # a checkpoint, not a deployed file
    save_fp_checkpoint(ckpt, get_model("resnet20"), model_name="resnet20", num_classes=10, normalization="imagenet")
    code, _, err = _run(capsys, ["benchmark", str(ckpt)])
    assert code == 2 and "not a gdnsq deployed model" in _one_line_error(err)
