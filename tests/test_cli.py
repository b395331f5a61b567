"""The `gdnsq` command: argument errors (exit 2, one line), evaluate on real images, train-fp
resume, and a tiny quantize run end to end."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from gdnsq import cli
from gdnsq.models import get_model, save_fp_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = pathlib.Path(__file__).with_name("fixtures") / "cifar10_test_first50.npz"


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip() and "%" not in ln]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def write_python_folder(root, train_x, train_y, test_x, test_y):
    """Original CIFAR-10 python-batch layout (train split over the five batch files)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (xs, ys) in enumerate(zip(np.array_split(train_x, 5), np.array_split(train_y, 5)), 1):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": xs.transpose(0, 3, 1, 2).reshape(len(xs), 3072),
                         b"labels": [int(v) for v in ys]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": test_x.transpose(0, 3, 1, 2).reshape(len(test_x), 3072),
                     b"labels": [int(v) for v in test_y]}, f)
    return root


@pytest.fixture
def tiny_data(tmp_path):
    """40 random training images + the 50 real CIFAR-10 test images of the fixture."""
    rng = np.random.default_rng(0)
    z = np.load(FIXTURE)
    return write_python_folder(tmp_path / "data", rng.integers(0, 256, (40, 32, 32, 3), np.uint8),
                               rng.integers(0, 10, 40), z["images"], z["labels"])


# ----------------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--weight-bits", "0", "--act-bits", "2", "--out", "x"], "bits must be between 1"),
    (["quantize", "--weight-bits", "2", "--act-bits", "two", "--out", "x"],
     "integer number of bits"),
    (["quantize", "--weight-bits", "2", "--act-bits", "2"], "--out"),
    (["evaluate", "--model", "resnet99", "--checkpoint", "x.th"], "invalid choice: 'resnet99'"),
    (["train-fp", "--out", "x", "--epochs", "0"], "positive integer"),
    (["frobnicate"], "invalid choice"),
], ids=["bits0", "bits-text", "no-out", "unknown-model", "epochs0", "unknown-command"])
def test_usage_errors_exit_2_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert needle in _one_line_error(err)


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = _run(capsys, ["evaluate", "--checkpoint", str(tmp_path / "nope.th")])
    assert code == 2 and "file not found" in _one_line_error(err)
    code, _, err = _run(capsys, ["quantize", "--checkpoint", str(tmp_path / "nope.th"),
                                 "--weight-bits", "2", "--act-bits", "2", "--out", str(tmp_path)])
    assert code == 2 and "file not found" in _one_line_error(err)


def test_checkpoint_that_does_not_fit(capsys, tmp_path):
    p = tmp_path / "r32.pt"
    save_fp_checkpoint(p, get_model("resnet32"), model_name="resnet32", num_classes=10,
                       normalization="imagenet")
    code, _, err = _run(capsys, ["evaluate", "--model", "resnet20", "--checkpoint", str(p)])
    assert code == 2 and "does not fit the model" in _one_line_error(err)
    (tmp_path / "junk.th").write_bytes(b"junk")
    code, _, err = _run(capsys, ["evaluate", "--checkpoint", str(tmp_path / "junk.th")])
    assert code == 2 and "cannot be read" in _one_line_error(err)


def test_missing_cifar100_is_reported(capsys, tmp_path):
    p = tmp_path / "c100.pt"
    save_fp_checkpoint(p, get_model("resnet20", 100), model_name="resnet20", num_classes=100,
                       normalization="cifar100")
    code, _, err = _run(capsys, ["evaluate", "--dataset", "cifar100", "--checkpoint", str(p),
                                 "--data-dir", str(tmp_path / "empty")])
    assert code == 1 and "CIFAR-100 not found" in _one_line_error(err)


def test_console_script_exit_code_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gdnsq.cli", "evaluate", "--checkpoint",
                           str(tmp_path / "missing.th"), "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "file not found" in proc.stderr


# ----------------------------------------------------------------------------------------------
# evaluate on real images with the shared teacher
# ----------------------------------------------------------------------------------------------

def test_evaluate_real_images_with_shared_checkpoint(capsys, shared_models_dir, tiny_data):
    ckpt = shared_models_dir / "resnet20_cifar10_akamaster.th"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} not found")
    code, out, err = _run(capsys, ["evaluate", "--model", "resnet20", "--dataset", "cifar10",
                                   "--checkpoint", str(ckpt), "--data-dir", str(tiny_data),
                                   "--json"])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["n"] == 50 and res["normalization"] == "imagenet" and res["kind"] == "fp"
    # the same number computed here directly (ImageNet normalisation on [0, 1] RGB)
    z = np.load(FIXTURE)
    x = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    m = get_model("resnet20")
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    m.load_state_dict({k[len("module."):]: v for k, v in sd.items()}, strict=False)
    with torch.no_grad():
        correct = (m.eval()(x).argmax(1) == torch.from_numpy(z["labels"])).sum().item()
    assert res["top1"] == pytest.approx(100.0 * correct / 50)
    assert res["top1"] >= 84.0  # a 91.7 % model; far above chance (10 %) on real images


# ----------------------------------------------------------------------------------------------
# train-fp: checkpoints, exact resume, the report; then quantize end to end
# ----------------------------------------------------------------------------------------------

def _train_fp(capsys, data, out, *extra):
    return _run(capsys, ["train-fp", "--data-dir", str(data), "--out", str(out), "--epochs", "2",
                         "--batch-size", "8", "--val-size", "8", "--device", "cpu", "--json",
                         *extra])


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # identical reduction order in both runs
    yield
    torch.set_num_threads(old)


def test_train_fp_resume_is_exact(capsys, tiny_data, tmp_path, one_thread):
    code, out, err = _train_fp(capsys, tiny_data, tmp_path / "a")
    assert code == 0, err
    full = json.loads(out.strip().splitlines()[-1])
    assert full["complete"] and full["test_n"] == 50 and full["epochs_done"] == 2
    assert (tmp_path / "a" / "fp_report.json").is_file()
    # interrupted after epoch 1 by the time budget, then resumed by the same command
    code, out, _ = _train_fp(capsys, tiny_data, tmp_path / "b", "--max-minutes", "1e-9")
    part = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and part["epochs_done"] == 1 and not part["complete"]
    code, out, err = _train_fp(capsys, tiny_data, tmp_path / "b")
    assert code == 0 and "resuming" in err
    a = torch.load(tmp_path / "a" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert json.loads(out.strip().splitlines()[-1])["test_top1"] == full["test_top1"]
    # the teacher it wrote is evaluated with the normalisation stored in it
    code, out, _ = _run(capsys, ["evaluate", "--checkpoint", str(tmp_path / "a"),
                                 "--data-dir", str(tiny_data), "--json"])
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["top1"] == pytest.approx(full["test_top1"])


def test_quantize_tiny_end_to_end_and_evaluate(capsys, tiny_data, tmp_path):
    fp = tmp_path / "fp.pt"
    save_fp_checkpoint(fp, get_model("resnet20"), model_name="resnet20", num_classes=10,
                       normalization="imagenet")
    out_dir = tmp_path / "q"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("patience: 7\nlog_every: 3\n")
    argv = ["quantize", "--checkpoint", str(fp), "--weight-bits", "3", "--act-bits", "3",
            "--out", str(out_dir), "--data-dir", str(tiny_data), "--val-size", "8",
            "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--json",
            "--config", str(cfg_file), "--set", "log_every=2"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["test_n"] == 50 and rep["epochs_run"] == 1
    # --json: no progress bars on stderr; the headline matches the report's convergence
    assert "it/s" not in err
    human = out.strip().splitlines()[-2]
    assert ("NOT reached" in human) == (not rep["converged"]) and (rep["converged"] or "W3A3" not in human)
    full = json.loads((out_dir / "report.json").read_text())
    assert full["config"]["patience"] == 7 and full["config"]["log_every"] == 2
    assert full["config"]["extra"]["cli"]["set"] == {"log_every": 2}
    assert full["config"]["extra"]["cli"]["config_file"] == str(cfg_file)
    assert rep["target_weight_bits"] == 3 and rep["target_act_bits"] == 3
    assert (out_dir / "report.md").is_file() and str(out_dir / "report.md") in out
    run = json.loads((out_dir / "run.json").read_text())
    assert run["weight_bits"] == 3 and run["normalization"] == "imagenet"
    # the run folder evaluates as a quantized model and reproduces the reported number
    code, out, err = _run(capsys, ["evaluate", "--checkpoint", str(out_dir), "--data-dir",
                                   str(tiny_data), "--json"])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["kind"] == "quantized" and res["weight_bits"] == 3
    assert res["top1"] == pytest.approx(rep["test_top1"])
    # the same folder with other bits is refused instead of mixing runs
    argv[argv.index("--weight-bits") + 1] = "2"
    code, _, err = _run(capsys, argv)
    assert code == 2 and "weight_bits=3" in _one_line_error(err)


def test_quantize_without_checkpoint_trains_the_teacher_first(capsys, tiny_data, tmp_path):
    out_dir = tmp_path / "q"
    code, out, err = _run(capsys, [
        "quantize", "--weight-bits", "4", "--act-bits", "4", "--out", str(out_dir),
        "--data-dir", str(tiny_data), "--val-size", "8", "--batch-size", "16", "--epochs", "1",
        "--teacher-epochs", "1", "--teacher-batch-size", "16", "--device", "cpu", "--json"])
    assert code == 0, err
    assert "training the FP teacher first" in err
    assert (out_dir / "teacher" / "fp_report.json").is_file()
    run = json.loads((out_dir / "run.json").read_text())
    assert run["teacher"] == str(out_dir / "teacher" / "checkpoint_best.pt")
    assert json.loads(out.strip().splitlines()[-1])["test_n"] == 50


# ----------------------------------------------------------------------------------------------
# the CLI tells the truth: headline, selection, usage errors vs bugs, --version, --config/--set
# ----------------------------------------------------------------------------------------------

def _report(**kw):
    rep = {"target_weight_bits": 2.0, "target_act_bits": 2.0, "realised_weight_bits_max": 4.86,
           "realised_act_bits_max": 5.17, "test_top1": 90.04, "selected_epoch": 3, "converged": False,
           "stop_reason": "max_minutes", "epochs_run": 3}
    rep.update(kw)
    return rep


def test_headline_never_calls_an_unconverged_model_by_its_targets():
    line = cli.quantize.headline("resnet20", _report())
    assert "W2A2" not in line and "NOT reached" in line and "W4.86/A5.17" in line
    assert "max_minutes" in line and "epoch 3" in line and "90.04 %" in line
    line = cli.quantize.headline("resnet20", _report(converged=True, realised_weight_bits_max=2.0,
                                            realised_act_bits_max=1.58, selected_epoch=7))
    assert "converged" in line and "NOT" not in line and "W2/A2" in line and "W2/A1.58" in line
    assert "epoch 7" in line
    # weights-only run (A32)
    line = cli.quantize.headline("resnet20", _report(target_act_bits=None, realised_act_bits_max=None, converged=True,
                                            realised_weight_bits_max=4.0))
    assert "W2/A32" in line and "W4/A32" in line


def test_trainer_log_and_report_name_the_same_selected_epoch(tmp_path, capsys):
    """Unconverged run (t_scale 0: no pressure on the bits): the log's epoch is the report's."""
    import re

    import _trainer_tiny as tiny
    from gdnsq.train.trainer import Trainer

    student, teacher = tiny.student_teacher()
    train, val, _ = tiny.loaders()
    cfg = tiny.fast_config(max_epochs=2, t_scale=0.0, progress=True)
    report = Trainer(student, teacher, train, val, config=cfg, out_dir=str(tmp_path)).fit()
    err = capsys.readouterr().err
    assert report["converged"] is False and report["selected_epoch"] == 2
    assert "selected epoch: None" not in err
    assert re.search(r"no converged epoch: the last epoch (\d+)", err).group(1) == "2"


def test_out_that_is_a_file_is_a_usage_error_before_any_work(capsys, tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    for argv in (["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", str(f),
                  "--data-dir", str(tmp_path / "no-data")],
                 ["train-fp", "--out", str(f / "sub"), "--data-dir", str(tmp_path / "no-data")]):
        code, out, err = _run(capsys, argv)
        line = _one_line_error(err)
        assert code == 2 and "--out" in line and "file" in line, line
        assert "data" not in line.split("--out")[0]  # nothing was loaded first
    assert f.read_text() == "mine"


def test_folder_as_checkpoint_names_the_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, ["quantize", "--checkpoint", str(tmp_path / "empty"), "--weight-bits", "2",
                                 "--act-bits", "2", "--out", str(tmp_path / "q")])
    line = _one_line_error(err)
    assert code == 2 and "--checkpoint" in line and "is a folder without" in line
    assert "file not found" not in line
    code, _, err = _run(capsys, ["evaluate", "--checkpoint", str(tmp_path / "empty")])
    assert code == 2 and "is a folder without" in _one_line_error(err)


def test_internal_errors_keep_their_traceback(monkeypatch):
    def boom(args):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(cli.evaluate, "cmd_evaluate", boom)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["evaluate", "--checkpoint", "x.th"])
    monkeypatch.setattr(cli.evaluate, "cmd_evaluate", lambda args: (_ for _ in ()).throw(TypeError("also a bug")))
    with pytest.raises(TypeError):
        cli.main(["evaluate", "--checkpoint", "x.th"])


def test_version(capsys):
    code, out, _ = _run(capsys, ["--version"])
    import gdnsq
    assert code == 0 and out.startswith(f"gdnsq {gdnsq.__version__}")


def _quantize_args(*extra):
    return cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x",
                                          *extra])


def test_config_file_and_set_precedence(tmp_path):
    """preset < --config < --set < explicit flag, for YAML and JSON files."""
    from gdnsq.train.presets import PRESETS
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 1.0e-3\npatience: 9\nhold_epochs: 2\nmax_minutes: null\nprecision: bf16\n")
    cfg, src = cli.quantize.resolve_train_config(_quantize_args("--config", str(yml), "--set", "patience=5",
                                                       "--set", "hold_epochs=3", "--hold-epochs", "4"))
    assert cfg.lr == 1e-3 and cfg.precision == "bf16"          # from the file
    assert cfg.patience == 5                                   # --set over the file
    assert cfg.hold_epochs == 4                                # the flag over --set
    assert cfg.t_scale == PRESETS["cpu-fast"]["t_scale"]       # untouched: the preset's
    assert src["set"] == {"patience": 5, "hold_epochs": 3} and src["flags"]["hold_epochs"] == 4
    assert cfg.extra["cli"]["config_file"] == str(yml)
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"lr": 0.004, "channels_last": True, "seed": 3}))
    cfg, _ = cli.quantize.resolve_train_config(_quantize_args("--config", str(js), "--seed", "7", "--set", "anneal=0.5"))
    assert cfg.lr == 0.004 and cfg.channels_last is True and cfg.seed == 7 and cfg.anneal == 0.5


@pytest.mark.parametrize("extra,needle", [
    (["--set", "no_such_field=1"], "--set: unknown TrainConfig field 'no_such_field'"),
    (["--set", "patience=two"], "--set: patience: expected a int"),
    (["--set", "patience"], "--set: expected FIELD=VALUE"),
    (["--set", "lr=-1"], "--config/--set: TrainConfig.lr"),
    (["--config", "MISSING"], "--config: file not found"),
    (["--config", "BAD_YAML"], "not valid YAML"),
    (["--config", "LIST"], "expected a mapping"),
], ids=["unknown-field", "bad-int", "no-equals", "out-of-range", "missing-file", "bad-yaml", "not-a-mapping"])
def test_config_and_set_errors_exit_2(capsys, tmp_path, extra, needle):
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- lr\n")
    names = {"MISSING": tmp_path / "missing.yaml", "BAD_YAML": tmp_path / "bad.yaml", "LIST": tmp_path / "list.yaml"}
    extra = [str(names.get(e, e)) for e in extra]
    code, _, err = _run(capsys, ["quantize", "--weight-bits", "2", "--act-bits", "2",
                                 "--out", str(tmp_path / "q"), *extra])
    assert code == 2 and needle in _one_line_error(err)
    assert not (tmp_path / "q").exists()


def test_deploy_runtime_does_not_import_the_cli():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys, gdnsq.deploy; assert 'gdnsq.cli' not in sys.modules, 'the runtime imports the CLI'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
