"""Malformed artifacts with a valid checksum: each is loaded unchanged or refused with one
``ValueError`` that names the bad header field; never another exception, never a hang, never
different weights loaded silently.

The fuzz mutates one field of the JSON header of two valid files (a small net loaded into a
skeleton, and a ResNet-20 rebuilt by its architecture name): the field removed, replaced by a
value of another type, a negative or a huge number, an empty or a huge list. The file is then
re-sealed (header lengths and SHA-256 recomputed), so only the header checks can catch it.
Seeds and counts are fixed: the same mutations run every time.
"""
import copy
import hashlib
import json
import random
import struct
import zlib

import pytest
import torch

from _deploy_helpers import SmallNet, make_qmodel, set_bits
from gdnsq.deploy import artifact, freeze, load, read_artifact, save
from gdnsq.deploy.artifact import MAGIC

_HEAD = struct.Struct("<8sIQQ")  # the documented fixed header, spelled out here (not imported)
REMOVE = object()
VALUES = [REMOVE, None, "x", 1.5, True, -1, 2**62, 10**30, [], {}, [2**40, 2**40]]
MUTATIONS_PER_FILE = 160


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: (path, skeleton or None)}: a small net (int, bitplane, a linear layer, a bias) and
    a W1A1 ResNet-20 that load rebuilds by name."""
    from gdnsq.convert import quantize_model
    from gdnsq.models import get_model

    folder = tmp_path_factory.mktemp("fuzz")
    with torch.no_grad():
        small = freeze(make_qmodel(2, 2), path="bitplane")
        small.conv1.set_path("int")
        save(small, folder / "small.gdnsq", normalization="imagenet", metadata={"top1": 1.0})
        torch.manual_seed(0)
        q = quantize_model(get_model("resnet20", num_classes=10).eval(), weight_bits=1, act_bits=1, signed=False)
        set_bits(q, torch.randn(2, 3, 32, 32), 1, 1)
        save(freeze(q), folder / "r20.gdnsq", architecture={"name": "resnet20", "kwargs": {"num_classes": 10}})
    return {"small": (folder / "small.gdnsq", SmallNet()), "resnet20": (folder / "r20.gdnsq", None)}


def _split(data: bytes):
    _, version, hlen, blen = _HEAD.unpack_from(data, 0)
    header = json.loads(zlib.decompress(data[_HEAD.size:_HEAD.size + hlen]))
    return version, header, data[_HEAD.size + hlen:_HEAD.size + hlen + blen]


def _seal(version: int, header: dict, blob: bytes) -> bytes:
    stored = zlib.compress(json.dumps(header).encode("utf-8"))
    body = _HEAD.pack(MAGIC, version, len(stored), len(blob)) + stored + blob
    return body + hashlib.sha256(body).digest()


def _field_paths(node, prefix=()):
    """Every path (a tuple of keys / indices) below ``node``."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield prefix + (key,)
        yield from _field_paths(child, prefix + (key,))


def _mutated(header: dict, path: tuple, value):
    out = copy.deepcopy(header)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if value is REMOVE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return out


def _names_of(path: tuple, value) -> set:
    """What the error must name: the nearest key of the mutated field (for a removed entry, its
    container's key does too)."""
    keys = [k for k in path if isinstance(k, str)]
    names = {keys[-1]}
    if value is REMOVE and len(keys) > 1 and isinstance(path[-1], str):
        names.add(keys[-2])
    return names


def _cases(header: dict, seed: int):
    # targeted: sizes that a reader trusting the file would allocate, and every top-level field
    cases = [(p, REMOVE) for p in _field_paths(header) if len(p) == 1]
    cases += [(("blob_nbytes",), 2**62), (("layers", 0, "config", "weight_bits"), 2**40),
              (("layers", 0, "config", "weight_shape"), [2**31 - 1] * 4)]
    big = next(p for p in _field_paths(header) if len(p) == 3 and p[0] == "tensors" and p[2] == "shape")
    cases.append((big, [2**31 - 1] * 3))
    cases += [(p, v) for p in _field_paths(header) if p[0] == "architecture" for v in VALUES]
    everything = [(p, v) for p in _field_paths(header) for v in VALUES]
    cases += random.Random(seed).sample(everything, MUTATIONS_PER_FILE)
    return cases


@pytest.mark.parametrize("kind", ["small", "resnet20"])
def test_mutated_header_is_refused_naming_the_field(files, kind, tmp_path):
    path, skeleton = files[kind]
    version, header, blob = _split(path.read_bytes())
    _, original = read_artifact(path)
    bad = tmp_path / "bad.gdnsq"
    refused = 0
    for field, value in _cases(header, seed=len(kind)):
        mutated = _mutated(header, field, value)
        if mutated == header:
            continue
        bad.write_bytes(_seal(version, mutated, blob))
        try:
            model = load(bad, model=skeleton)
        except ValueError as e:
            message = str(e)
            assert "\n" not in message, (field, message)
            assert any(name in message for name in _names_of(field, value)), (field, value, message)
            refused += 1
            continue
        # accepted: then the file still means the same model
        state = model.state_dict()
        assert state.keys() == original.keys(), (field, value)
        assert all(torch.equal(state[k], original[k]) for k in original), (field, value)
    assert refused > MUTATIONS_PER_FILE // 2  # most mutations are damage, not noise


def test_act_bits_must_cover_the_stored_quantizer(files, tmp_path):
    """A layer's act_bits below its stored activation quantizer's code range is refused: the
    deployed layers pack those codes without checking them again."""
    path, skeleton = files["small"]
    version, header, blob = _split(path.read_bytes())
    i = next(i for i, layer in enumerate(header["layers"]) if layer["config"]["path"] == "bitplane")
    header["layers"][i]["config"]["act_bits"] = 1
    bad = tmp_path / "bad.gdnsq"
    bad.write_bytes(_seal(version, header, blob))
    with pytest.raises(ValueError, match=rf"layers\[{i}\]\.config\.act_bits: 1, but .* codes up to 3"):
        load(bad, model=skeleton)


def test_metadata_decompression_is_bounded(files, tmp_path, monkeypatch):
    """The JSON header inflates into at most MAX_HEADER_BYTES: a small stored header that
    expands beyond it is refused before it is parsed."""
    path, skeleton = files["small"]
    version, header, blob = _split(path.read_bytes())
    header["metadata"]["padding"] = " " * 4000  # compresses to a few bytes
    bad = tmp_path / "bad.gdnsq"
    bad.write_bytes(_seal(version, header, blob))
    monkeypatch.setattr(artifact, "MAX_HEADER_BYTES", 3000)
    with pytest.raises(ValueError, match="metadata is more than 3000 bytes after decompression"):
        load(bad, model=skeleton)
    monkeypatch.undo()
    assert load(bad, model=skeleton).gdnsq_metadata["metadata"]["padding"] == " " * 4000
