"""`gdnsq export` and `gdnsq evaluate --deployed` on a small fake run (ResNet-20, W2A2)."""
import json
import pickle

import numpy as np
import pytest
import torch

from _deploy_helpers import set_bits


@pytest.fixture
def run_dir(tmp_path):
    from gdnsq.convert import quantize_model
    from gdnsq.models import get_model

    torch.manual_seed(0)
    student = quantize_model(get_model("resnet20", 10).eval(), 2, 2)
    with torch.no_grad():
        set_bits(student, torch.randn(4, 3, 32, 32), 2, 2)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"student": student.state_dict()}, run / "checkpoint_best.pt")
    (run / "run.json").write_text(json.dumps({"model": "resnet20", "dataset": "cifar10", "weight_bits": 2,
                                              "act_bits": 2, "normalization": "imagenet",
                                              "quantize_kwargs": {}}))
    return run, student.eval()


def _fake_cifar(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    return batch


def test_export_then_evaluate(run_dir, tmp_path, capsys):
    from gdnsq import cli
    from gdnsq.deploy import load

    run, student = run_dir
    out = tmp_path / "r20_w2a2.gdnsq"
    code = cli.main(["export", "--checkpoint", str(run), "--out", str(out), "--device", "cpu",
                     "--path", "int", "--json"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    res = json.loads(printed.strip().splitlines()[-1])
    assert res["file_bytes"] == out.stat().st_size
    assert len(res["layers"]) == 18 and {r["path"] for r in res["layers"]} == {"int"}
    assert res["size"]["total_deployed_bytes"] < res["size"]["total_fp32_bytes"]
    assert "| **total** |" in printed
    model = load(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # each deployed layer reproduces its fake-quant layer on the same input (end to end, a
        # random 2-bit ResNet-20 amplifies float-rounding code flips, so compare per layer)
        caps = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: caps.__setitem__(n, (i[0], o)))
                 for n, m in student.named_modules() if hasattr(m, "weight_quantizer")]
        student(x)
        for h in hooks:
            h.remove()
        assert len(caps) == 18
        for name, (inp, ref) in caps.items():
            out_layer = model.get_submodule(name)(inp)
            assert float((out_layer - ref).abs().max() / ref.abs().max()) < 1e-5, name

    data = tmp_path / "data"
    batch = _fake_cifar(data)
    code = cli.main(["evaluate", "--deployed", str(out), "--data-dir", str(data), "--device", "cpu",
                     "--batch-size", "8", "--json"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    res = json.loads(printed.strip().splitlines()[-1])
    assert res["n"] == 20 and res["kind"] == "deployed"
    # load attached the deploy plan and every quantized layer ran as an integer segment
    assert len(res["plan"]) == 18 and all(r["fallback"] is None and r["gemm"] for r in res["plan"])
    # the accuracy of the deployed model's own predictions on the normalised images
    from gdnsq.data import normalize

    imgs = torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32))
    with torch.no_grad():
        pred = model(normalize(imgs, "imagenet")).argmax(1)
    want = 100.0 * float((pred == torch.tensor(batch[b"labels"])).float().mean())
    assert res["top1"] == pytest.approx(want)
    # without --json: the evaluation's progress bar (closing line on stderr, not a terminal)
    code = cli.main(["evaluate", "--deployed", str(out), "--data-dir", str(data), "--device", "cpu",
                     "--batch-size", "8"])
    captured = capsys.readouterr()
    assert code == 0 and "evaluate deployed test: 3/3" in captured.err, captured.err


def test_export_errors(run_dir, tmp_path, capsys):
    from gdnsq import cli

    run, _ = run_dir
    assert cli.main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "file not found" in capsys.readouterr().err
    # targets below the realised bits: --strict refuses, naming the layer
    meta = json.loads((run / "run.json").read_text())
    meta["weight_bits"] = 1
    (run / "run.json").write_text(json.dumps(meta))
    # the student is rebuilt with target 1, but the checkpoint's buffers carry target 2;
    # lower them in the checkpoint to make the realised bits exceed the target
    ck = torch.load(run / "checkpoint_best.pt", weights_only=True)
    for k in ck["student"]:
        if k.endswith("weight_quantizer.target_bits"):
            ck["student"][k].fill_(1)
    torch.save(ck, run / "checkpoint_best.pt")
    code = cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--strict",
                     "--device", "cpu", "--measure-batch", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "realised bits exceed" in err and not (tmp_path / "x").exists()
    assert cli.main(["evaluate", "--deployed", str(tmp_path / "missing.gdnsq")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_export_and_deployed_usage_errors(run_dir, tmp_path, capsys):
    """A folder as export --out is refused before the checkpoint is loaded; an unreadable
    --deployed file is a usage error naming the flag (exit 2), not a traceback."""
    from gdnsq import cli

    run, _ = run_dir
    (tmp_path / "outdir").mkdir()
    code = cli.main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "outdir")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "is a folder" in err and "missing" not in err
    (tmp_path / "junk.gdnsq").write_bytes(b"not a model")
    code = cli.main(["evaluate", "--deployed", str(tmp_path / "junk.gdnsq")])
    err = capsys.readouterr().err
    assert code == 2 and "--deployed:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
