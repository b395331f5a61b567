"""gdnsq.deploy.save / load: round trip, validation, atomic writes."""
import os
import struct

import pytest
import torch

from _deploy_helpers import SmallNet, make_qmodel
from gdnsq.deploy import FORMAT_VERSION, deployed_layers, freeze, load, read_artifact, save
from gdnsq.deploy.artifact import MAGIC


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def saved(tmp_path):
    q = make_qmodel(2, 2)
    frozen = freeze(q, path="bitplane")
    frozen.conv1.set_path("int")
    path = tmp_path / "m.gdnsq"
    save(frozen, path, normalization="imagenet", metadata={"top1": 12.5})
    return frozen, path


def test_round_trip_with_skeleton(saved):
    frozen, path = saved
    x = torch.randn(4, 3, 12, 12)
    loaded = load(path, model=SmallNet())
    assert torch.equal(loaded(x), frozen(x))
    assert {n: m.path for n, m in deployed_layers(loaded)} == {"conv1": "int", "conv2": "bitplane", "hidden": "bitplane"}
    assert loaded.gdnsq_normalization == "imagenet"
    meta = loaded.gdnsq_metadata
    assert meta["format_version"] == FORMAT_VERSION and meta["metadata"] == {"top1": 12.5}
    assert [layer["config"]["weight_bits"] for layer in meta["layers"]] == [2, 2, 2]
    # the stored weight is the packed 2-bit codes, not floats
    _, tensors = read_artifact(path)
    assert tensors["conv1.weight_packed"].dtype == torch.uint8
    assert tensors["conv1.weight_packed"].shape == (2, 16 * 8 * 9 // 8)
    # a frozen model or a fake-quant model also serves as skeleton
    assert torch.equal(load(path, model=frozen)(x), frozen(x))


def test_round_trip_by_architecture_name(tmp_path):
    from gdnsq.convert import quantize_model
    from gdnsq.models import get_model
    from _deploy_helpers import set_bits

    torch.manual_seed(0)
    fp = get_model("resnet20", num_classes=10).eval()
    q = quantize_model(fp, weight_bits=1, act_bits=1, signed=False)
    x = torch.randn(2, 3, 32, 32)
    set_bits(q, x, 1, 1)
    frozen = freeze(q)
    path = tmp_path / "r20.gdnsq"
    save(frozen, path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}})
    loaded = load(path)  # rebuilt through gdnsq.models.get_model
    assert torch.equal(loaded(x), frozen(x))
    assert len(deployed_layers(loaded)) == 18


def test_no_architecture_needs_skeleton(saved):
    _, path = saved
    with pytest.raises(ValueError, match="names no architecture"):
        load(path)


def test_unknown_architecture(tmp_path, saved):
    frozen, _ = saved
    path = tmp_path / "u.gdnsq"
    save(frozen, path, architecture={"name": "resnet7", "kwargs": {}})
    with pytest.raises(ValueError, match="unknown architecture"):
        load(path)


def test_corrupted_byte_is_rejected(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load(path, model=SmallNet())


@pytest.mark.parametrize("keep", [0, 10, 100, -1])
def test_truncated_file_is_rejected(saved, keep):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load(path, model=SmallNet())


def test_bad_magic_and_version(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    path.write_bytes(b"NOTAGDNS" + bytes(data[8:]))
    with pytest.raises(ValueError, match="bad magic"):
        load(path, model=SmallNet())
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        load(path, model=SmallNet())
    assert data[:8] == MAGIC


def test_shape_mismatch_with_skeleton(saved):
    _, path = saved
    with pytest.raises(ValueError, match=r"weight_shape: \[16, 8, 3, 3\], but the model.s .conv1. has \[8, 4, 3, 3\]"):
        load(path, model=SmallNet(c=4))
    with pytest.raises(ValueError, match="no layer"):
        load(path, model=torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load(tmp_path / "nope.gdnsq", model=SmallNet())


def test_atomic_write(saved, monkeypatch):
    frozen, path = saved
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save(frozen, path, architecture={"name": "resnet20", "kwargs": {}})
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_save_rejects_bad_arguments(tmp_path, saved):
    frozen, _ = saved
    with pytest.raises(TypeError, match="model"):
        save("x", tmp_path / "a")
    with pytest.raises(ValueError, match="architecture"):
        save(frozen, tmp_path / "a", architecture={"kwargs": {}})


def test_load_state_dict_refreshes_runtime_caches(saved):
    frozen, path = saved
    x = torch.randn(2, 3, 12, 12)
    other = freeze(make_qmodel(2, 2, seed=7), path="bitplane")
    other(x)  # fills the caches with the old codes
    other.load_state_dict(frozen.state_dict())
    for name, layer in deployed_layers(other):
        if layer.path != frozen.get_submodule(name).path:  # (set_path itself clears the caches)
            layer.set_path(frozen.get_submodule(name).path)
    assert torch.equal(other(x), frozen(x))
