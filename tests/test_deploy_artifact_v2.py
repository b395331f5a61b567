"""Artifact format version 2 (zlib-compressed JSON and tensor blob): size, version-1 files still
load, damaged compressed payloads are refused with a one-line ValueError."""
import hashlib
import json
import struct
import zlib

import pytest
import torch

from _deploy_helpers import SmallNet, make_qmodel, set_bits
from gdnsq.deploy import freeze, load, read_artifact, save
from gdnsq.deploy.artifact import MAGIC

_HEAD = struct.Struct("<8sIQQ")  # the documented fixed header, spelled out here (not imported)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def saved(tmp_path):
    frozen = freeze(make_qmodel(2, 2), path="bitplane")
    path = tmp_path / "m.gdnsq"
    save(frozen, path, metadata={"top1": 1.0})
    return frozen, path


def _parts(data: bytes):
    magic, version, hlen, blen = _HEAD.unpack_from(data, 0)
    return magic, version, data[_HEAD.size:_HEAD.size + hlen], data[_HEAD.size + hlen:_HEAD.size + hlen + blen]


def _seal(version: int, header: bytes, blob: bytes) -> bytes:
    body = _HEAD.pack(MAGIC, version, len(header), len(blob)) + header + blob
    return body + hashlib.sha256(body).digest()


def test_version_2_is_compressed_and_round_trips(saved):
    frozen, path = saved
    magic, version, header, blob = _parts(path.read_bytes())
    assert magic == MAGIC and version == 2
    meta = json.loads(zlib.decompress(header))
    assert meta["format_version"] == 2 and len(zlib.decompress(blob)) == meta["blob_nbytes"]
    x = torch.randn(3, 3, 12, 12)
    assert torch.equal(load(path, model=SmallNet())(x), frozen(x))


def test_version_1_file_still_loads(saved, tmp_path):
    frozen, path = saved
    _, _, header, blob = _parts(path.read_bytes())
    meta = json.loads(zlib.decompress(header))
    meta["format_version"] = 1
    del meta["blob_nbytes"]
    v1 = tmp_path / "v1.gdnsq"
    v1.write_bytes(_seal(1, json.dumps(meta).encode("utf-8"), zlib.decompress(blob)))
    x = torch.randn(2, 3, 12, 12)
    loaded = load(v1, model=SmallNet())
    assert loaded.gdnsq_metadata["format_version"] == 1
    assert torch.equal(loaded(x), frozen(x))
    _, t1 = read_artifact(v1)
    _, t2 = read_artifact(path)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


@pytest.mark.parametrize("damage", ["header_not_zlib", "blob_not_zlib", "blob_too_long", "blob_too_short",
                                    "header_version"])
def test_damaged_compressed_payload_is_refused(saved, tmp_path, damage):
    _, path = saved
    _, _, header, blob = _parts(path.read_bytes())
    meta = json.loads(zlib.decompress(header))
    raw = zlib.decompress(blob)
    if damage == "header_not_zlib":
        header = json.dumps(meta).encode()
    elif damage == "blob_not_zlib":
        blob = raw
    elif damage == "blob_too_long":
        blob = zlib.compress(raw + b"\0" * 64)
    elif damage == "blob_too_short":
        blob = zlib.compress(raw[:-8])
    else:
        meta["format_version"] = 1
        header = zlib.compress(json.dumps(meta).encode())
    bad = tmp_path / "bad.gdnsq"
    bad.write_bytes(_seal(2, header, blob))  # a valid checksum: the payload check must catch it
    with pytest.raises(ValueError, match="bad.gdnsq: "):
        load(bad, model=SmallNet())


def test_resnet20_w1a1_artifact_size(tmp_path):
    from gdnsq.calibrate import calibrate
    from gdnsq.convert import quantize_model
    from gdnsq.models import get_model

    torch.manual_seed(0)
    fp = get_model("resnet20", 10).eval()
    x = torch.randn(16, 3, 32, 32)
    q = quantize_model(fp, 1, 1)
    calibrate(q, [x])
    set_bits(q, x, 1, 1)
    path = tmp_path / "r20.gdnsq"
    save(freeze(q.eval()), path, architecture={"name": "resnet20", "kwargs": {"num_classes": 10}})
    # 1,084,544 B as an FP32 state dict; 80,877 B in format version 1
    assert path.stat().st_size <= 60_000
    assert torch.equal(load(path)(x[:2]), freeze(q.eval())(x[:2]))
