"""Checkpoints and exact resume: a run stopped (or killed mid-epoch) and resumed from
``checkpoint_last.pt`` ends bit-identical to an uninterrupted run with the same seed; truncated
or foreign checkpoints are rejected with a clear error; writes are atomic."""
import json
import os

import pytest
import torch

import _trainer_tiny as tiny
from gdnsq._atomic import atomic_torch_save
from gdnsq.train.checkpoint import LAST, METRICS, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from gdnsq.train.trainer import Trainer

# Fields that measure time, the only ones allowed to differ between the two runs' metrics.
TIME_KEYS = {"epoch_seconds", "wall_seconds"}


# the torch backend on one thread: the training tests run fast and alike on any machine
pytestmark = pytest.mark.usefixtures("fast_cpu")


def _run(out_dir, max_epochs, generator=True, loader_wrap=None):
    # Everything is rebuilt from scratch, as a new process would do.
    train, val, _ = tiny.loaders(generator=generator)
    if loader_wrap is not None:
        train = loader_wrap(train)
    student, teacher = tiny.student_teacher(calib_loader=val)
    # val_every=2 so that the resumed segment also exercises the probe-only epochs.
    cfg = tiny.fast_config(max_epochs=max_epochs, val_every=2, log_every=3, patience=50)
    trainer = Trainer(student, teacher, train, val, config=cfg, out_dir=str(out_dir))
    return trainer


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _assert_same_optimizer(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        _assert_same_state(a["state"][i], b["state"][i])


def _metrics(out_dir):
    with open(os.path.join(out_dir, METRICS)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in f]


def _assert_runs_equal(dir_a, dir_b):
    a = load_checkpoint(os.path.join(dir_a, LAST), kind="last")
    b = load_checkpoint(os.path.join(dir_b, LAST), kind="last")
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    _assert_same_state(a["student"], b["student"])
    _assert_same_optimizer(a["optimizer"], b["optimizer"])
    assert a["schedule"] == b["schedule"]
    assert a["objective"] == b["objective"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    ta, tb = dict(a["trainer"]), dict(b["trainer"])
    ta.pop("wall_seconds"), tb.pop("wall_seconds")
    assert ta == tb
    assert _metrics(dir_a) == _metrics(dir_b)


def test_resume_after_stop_is_bit_identical(tmp_path):
    straight = _run(tmp_path / "straight", 3)
    straight.fit()
    first = _run(tmp_path / "resumed", 2)
    first.fit()
    assert first.epoch == 2
    resumed = _run(tmp_path / "resumed", 3)  # same out_dir: resumes after epoch 2
    assert resumed.resumed_from == 2 and resumed.global_step == first.global_step
    resumed.fit()
    assert resumed.epoch == 3
    _assert_runs_equal(tmp_path / "straight", tmp_path / "resumed")
    # The resumed trainer holds the same weights in memory as the uninterrupted one.
    _assert_same_state(straight.student.state_dict(), resumed.student.state_dict())
    # And training did change the weights (the comparison is not between two untouched models).
    untouched, _ = tiny.student_teacher(calib_loader=tiny.loaders()[1])
    assert not torch.equal(untouched.state_dict()["conv2.weight"], straight.student.state_dict()["conv2.weight"])


class _Killed(RuntimeError):
    pass


class _DiesAt:
    """Wraps a loader; raises in the middle of the ``epoch``-th pass (a simulated kill)."""

    def __init__(self, loader, epoch, batch):
        self.loader, self.epoch, self.batch, self.passes = loader, epoch, batch, 0
        self.generator = loader.generator  # the trainer checkpoints the loader's generator
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, b in enumerate(self.loader):
            if self.passes == self.epoch and i == self.batch:
                raise _Killed("simulated kill")
            yield b


def test_killed_mid_epoch_then_resumed_is_bit_identical(tmp_path):
    """Global-RNG shuffling (no loader generator); the run dies in epoch 3 after writing
    step records that the resume must drop from metrics.jsonl."""
    _run(tmp_path / "straight", 3, generator=False).fit()
    dying = _run(tmp_path / "killed", 3, generator=False, loader_wrap=lambda ld: _DiesAt(ld, 3, 7))
    with pytest.raises(_Killed):
        dying.fit()
    partial = _metrics(tmp_path / "killed")
    assert partial[-1]["kind"] == "step" and partial[-1]["epoch"] == 3  # records past the checkpoint
    resumed = _run(tmp_path / "killed", 3, generator=False)
    assert resumed.resumed_from == 2
    resumed.fit()
    _assert_runs_equal(tmp_path / "straight", tmp_path / "killed")


def test_truncated_checkpoint_is_rejected(tmp_path):
    trainer = _run(tmp_path, 1)
    trainer.fit()
    path = tmp_path / LAST
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint_last.pt is truncated or corrupt"):
        _run(tmp_path, 2)
    path.write_bytes(data[:40])  # inside the header
    with pytest.raises(ValueError, match="header missing or truncated"):
        load_checkpoint(str(path))


def _flip_byte(path, where):
    data = bytearray(path.read_bytes())
    data[where] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_byte_in_checkpoint_is_refused(tmp_path):
    # torch.load alone reads a zip archive with one changed tensor byte silently; the checksum
    # must refuse it, wherever the byte is (tensor data, pickle, the header's digest).
    trainer = _run(tmp_path, 1)
    trainer.fit()
    path = tmp_path / LAST
    good = path.read_bytes()
    # a byte inside a stored tensor: the student's largest one, found by its raw bytes
    w = max(load_checkpoint(str(path))["student"].values(), key=lambda t: t.numel())
    raw = w.contiguous().numpy().tobytes()[:16]
    tensor_at = good.find(raw)
    assert tensor_at > 0
    for where in (tensor_at + 3, len(good) // 2, len(good) - 1, 40):
        path.write_bytes(good)
        _flip_byte(path, where)
        with pytest.raises(ValueError, match=r"checkpoint .*checkpoint_last.pt is corrupt: its SHA-256"):
            load_checkpoint(str(path))
    path.write_bytes(good)
    _flip_byte(path, 0)  # the magic itself: no longer a sealed file, and not a zip archive either
    with pytest.raises(ValueError, match="truncated or corrupt"):
        _run(tmp_path, 2)
    path.write_bytes(good + b"\0")  # trailing bytes
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(str(path))
    path.write_bytes(good)
    assert load_checkpoint(str(path), kind="last")["epoch"] == 1


def test_unsealed_legacy_checkpoint_loads_with_a_warning(tmp_path):
    trainer = _run(tmp_path, 1)
    trainer.fit()
    path = str(tmp_path / LAST)
    ckpt = load_checkpoint(path)
    atomic_torch_save(ckpt, path)  # the pre-checksum layout: a bare torch.save archive
    with pytest.warns(UserWarning, match="without a checksum"):
        again = load_checkpoint(path, kind="last")
    _assert_same_state(again["student"], ckpt["student"])


def test_wrong_version_and_marker_are_rejected(tmp_path):
    trainer = _run(tmp_path, 1)
    trainer.fit()
    path = str(tmp_path / LAST)
    ckpt = load_checkpoint(path)
    save_checkpoint({**ckpt, "version": CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(ValueError, match="format version"):
        load_checkpoint(path)
    save_checkpoint({k: v for k, v in ckpt.items() if k != "complete"}, path)
    with pytest.raises(ValueError, match="completion marker"):
        load_checkpoint(path)
    save_checkpoint({"something": 1}, path)
    with pytest.raises(ValueError, match="not a gdnsq trainer checkpoint"):
        _run(tmp_path, 2)
    save_checkpoint(ckpt, path)
    with pytest.raises(ValueError, match="expected 'best'"):
        load_checkpoint(path, kind="best")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_atomic_save_leaves_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "x.pt")
    atomic_torch_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["x.pt"]  # no temp file left behind


def test_resume_warns_on_changed_training_fields(tmp_path):
    _run(tmp_path, 1).fit()
    train, val, _ = tiny.loaders()
    student, teacher = tiny.student_teacher(calib_loader=val)
    with pytest.warns(UserWarning, match="lr"):
        Trainer(student, teacher, train, val, config=tiny.fast_config(lr=0.05, max_epochs=2), out_dir=str(tmp_path))


def _cifar_style_run(out_dir, max_epochs):
    """gdnsq.data.CifarLoader (seed + epoch ordering and augmentation, no torch.utils.data)
    and no validation loader."""
    from gdnsq.data import CifarLoader
    x, y = tiny.make_data(512, 1)
    images = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    train = CifarLoader((images, y), 32, train=True, seed=3)
    student, teacher = tiny.student_teacher(calib_loader=tiny.loaders()[1])
    cfg = tiny.fast_config(max_epochs=max_epochs, log_every=4)
    return Trainer(student, teacher, train, None, config=cfg, out_dir=str(out_dir))


def test_resume_with_seeded_epoch_loader_and_no_validation(tmp_path):
    straight = _cifar_style_run(tmp_path / "a", 5)
    rep = straight.fit()
    _cifar_style_run(tmp_path / "b", 3).fit()
    _cifar_style_run(tmp_path / "b", 5).fit()
    _assert_runs_equal(tmp_path / "a", tmp_path / "b")
    # Without validation: no accuracy, selection = latest converged epoch, no early stopping.
    epochs = [r for r in _metrics(tmp_path / "a") if r["kind"] == "epoch"]
    assert all(r["val_top1"] is None for r in epochs)
    converged = [r["epoch"] for r in epochs if r["converged"]]
    assert rep["stop_reason"] == "max_epochs" and converged
    assert rep["selected_epoch"] == converged[-1] and rep["converged"] is True and rep["val_top1"] is None
