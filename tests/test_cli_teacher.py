"""``gdnsq quantize --teacher`` (distil from another FP model) and a paused ``--max-minutes``
segment (no test-set read until the run ends; the same command continues)."""
import json

import pytest
import torch

from gdnsq import cli
from gdnsq.models import get_model, infer_model_name, save_fp_checkpoint

from test_cli import _one_line_error, _run, tiny_data  # noqa: F401  (fixture)


def _fp(path, name, normalization="imagenet", seed=0):
    torch.manual_seed(seed)
    save_fp_checkpoint(path, get_model(name), model_name=name, num_classes=10,
                       normalization=normalization)
    return path


def _argv(fp, out, data, *extra):
    return ["quantize", "--checkpoint", str(fp), "--weight-bits", "4", "--act-bits", "4",
            "--out", str(out), "--data-dir", str(data), "--val-size", "8", "--batch-size", "16",
            "--epochs", "1", "--device", "cpu", "--json", "--precision", "fp32", *extra]


def _epoch_loss(out):
    recs = [json.loads(l) for l in open(out / "metrics.jsonl") if '"kind": "epoch"' in l]
    return recs[-1]["train_loss"]


def test_infer_model_name_from_block_count():
    for name in ("resnet20", "resnet32", "resnet56"):
        assert infer_model_name(get_model(name).state_dict()) == name
    with pytest.raises(ValueError, match="architecture"):
        infer_model_name({"fc.weight": torch.zeros(10, 64)})


def test_teacher_flag_distils_from_the_named_model(capsys, tiny_data, tmp_path):
    fp = _fp(tmp_path / "fp20.pt", "resnet20")
    big = _fp(tmp_path / "fp32.pt", "resnet32", seed=1)
    code, _, err = _run(capsys, _argv(fp, tmp_path / "own", tiny_data))
    assert code == 0, err
    code, out, err = _run(capsys, _argv(fp, tmp_path / "big", tiny_data, "--teacher", str(big)))
    assert code == 0, err
    assert "distilling from resnet32" in err
    rep = json.loads((tmp_path / "big" / "report.json").read_text())
    assert rep["config"]["extra"]["distillation_teacher"] == {"path": str(big), "model": "resnet32"}
    run = json.loads((tmp_path / "big" / "run.json").read_text())
    assert run["distillation_teacher"] == str(big) and run["teacher"] == str(fp)
    # same student start, same batches: only the teacher's logits differ, so the loss must
    assert _epoch_loss(tmp_path / "big") != pytest.approx(_epoch_loss(tmp_path / "own"), rel=1e-3)


@pytest.mark.parametrize("case,needle", [
    ("missing", "--teacher: file not found"),
    ("normalization", "input normalisation"),
    ("not-a-resnet", "--teacher: cannot tell the architecture"),
])
def test_teacher_errors_exit_2_before_any_work(capsys, tiny_data, tmp_path, case, needle):
    fp = _fp(tmp_path / "fp20.pt", "resnet20")
    if case == "missing":
        teacher = tmp_path / "nope.pt"
    elif case == "normalization":
        teacher = _fp(tmp_path / "t.pt", "resnet20", normalization="cifar")
    else:
        teacher = tmp_path / "t.pt"
        torch.save({"fc.weight": torch.zeros(10, 64)}, teacher)
    code, _, err = _run(capsys, _argv(fp, tmp_path / "q", tiny_data, "--teacher", str(teacher)))
    assert code == 2 and needle in _one_line_error(err)


def test_paused_segment_reads_no_test_set_and_the_same_command_continues(capsys, tiny_data, tmp_path):
    fp = _fp(tmp_path / "fp20.pt", "resnet20")
    out = tmp_path / "q"
    argv = _argv(fp, out, tiny_data, "--max-minutes", "1e-9")
    argv[argv.index("--epochs") + 1] = "2"
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    assert rep["stop_reason"] == "max_minutes" and rep["epochs_run"] == 1
    assert rep["test_top1"] is None and "paused" in stdout.strip().splitlines()[-2]
    code, stdout, err = _run(capsys, argv)
    assert code == 0, err
    rep = json.loads(stdout.strip().splitlines()[-1])
    # epoch 2 reaches --epochs: the run has ended, so the test set is read once
    assert rep["epochs_run"] == 2 and rep["stop_reason"] == "max_epochs" and rep["test_n"] == 50
