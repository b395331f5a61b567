"""``gdnsq snapshot`` + ``gdnsq quantize --resume-from``: a run carried to a new machine (a new
folder) continues bit-identically, and damaged or foreign snapshots are refused whole."""
import json
import shutil

import pytest
import torch

from gdnsq.train.snapshot import read_snapshot, restore_snapshot, write_snapshot
from gdnsq.train.checkpoint import BEST, LAST, load_checkpoint

from test_cli import _one_line_error, _run, tiny_data  # noqa: F401  (fixture)
from test_cli_teacher import _argv, _fp


def _student(run_dir):
    return load_checkpoint(str(run_dir / LAST), kind="last")["student"]


def test_snapshot_moves_a_paused_run_and_it_continues_bit_identically(capsys, tiny_data, tmp_path):
    fp = _fp(tmp_path / "fp20.pt", "resnet20")
    # the reference: 2 epochs without interruption
    ref = _argv(fp, tmp_path / "ref", tiny_data, "--val-size", "8")
    ref[ref.index("--epochs") + 1] = "2"
    code, _, err = _run(capsys, ref)
    assert code == 0, err
    # machine A: pause after epoch 1, snapshot, then the folder is lost
    a = [x if x != str(tmp_path / "ref") else str(tmp_path / "a") for x in ref] + ["--max-minutes", "1e-9"]
    code, _, err = _run(capsys, a)
    assert code == 0, err
    snap = tmp_path / "results" / "resume.gdnsq-run"
    snap.parent.mkdir()
    code, out, err = _run(capsys, ["snapshot", str(tmp_path / "a"), "--out", str(snap), "--json"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["epoch"] == 1
    shutil.rmtree(tmp_path / "a")
    # machine B: the same command into a new folder, with --resume-from
    b = [x if x != str(tmp_path / "ref") else str(tmp_path / "b") for x in ref] + ["--resume-from", str(snap)]
    code, out, err = _run(capsys, b)
    assert code == 0, err
    assert "restored" in err
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["epochs_run"] == 2 and rep["test_n"] == 50
    want, got = _student(tmp_path / "ref"), _student(tmp_path / "b")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    epochs = [json.loads(l)["epoch"] for l in open(tmp_path / "b" / "metrics.jsonl") if '"kind": "epoch"' in l]
    assert epochs == [1, 2]
    # a folder that is already further along is left alone
    assert restore_snapshot(snap, tmp_path / "b") is None


def test_damaged_or_foreign_snapshots_are_refused_before_writing(tmp_path, capsys, tiny_data):
    fp = _fp(tmp_path / "fp20.pt", "resnet20")
    code, _, err = _run(capsys, _argv(fp, tmp_path / "a", tiny_data))
    assert code == 0, err
    snap = tmp_path / "s.gdnsq-run"
    write_snapshot(tmp_path / "a", snap)
    assert read_snapshot(snap)["last"]["epoch"] == 1
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.gdnsq-run"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        restore_snapshot(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # a checkpoint is not a snapshot
    with pytest.raises(ValueError, match="not a gdnsq run snapshot"):
        read_snapshot(tmp_path / "a" / BEST if (tmp_path / "a" / BEST).exists() else tmp_path / "a" / LAST)
    # the CLI: a snapshot of other bits is refused with one line, exit 2
    argv = _argv(fp, tmp_path / "c", tiny_data, "--resume-from", str(snap))
    argv[argv.index("--weight-bits") + 1] = "2"
    code, _, err = _run(capsys, argv)
    assert code == 2 and "weight_bits=4" in _one_line_error(err)
    code, _, err = _run(capsys, ["snapshot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert code == 2 and "RUN_DIR" in _one_line_error(err)
