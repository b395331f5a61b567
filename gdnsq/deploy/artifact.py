"""save / load of a frozen model: one file, packed tensors + JSON metadata + checksum.

File layout (all integers little-endian):

    offset 0   8 bytes   magic b"GDNSQDPL"
           8   4 bytes   uint32 format version (FORMAT_VERSION)
          12   8 bytes   uint64 length of the stored JSON header in bytes (H)
          20   8 bytes   uint64 length of the stored tensor blob in bytes (B)
          28   H bytes   JSON metadata: UTF-8 (version 1), zlib-compressed UTF-8 (version 2)
       28+H    B bytes   tensor blob: each tensor's raw bytes (C order), 8-byte aligned;
                         zlib-compressed in version 2 (the JSON's ``blob_nbytes`` is its size
                         after decompression)
     28+H+B   32 bytes   SHA-256 of every byte before it (the stored, compressed bytes)

Version 2 (written since the fused runtime landed) only adds the zlib compression: the JSON
tensor table is ~3/4 of a version-1 W1A1 ResNet-20 file and compresses ~10x. Version-1 files
are still read.

The JSON holds ``format_version``, ``gdnsq_version``, ``architecture`` (``{"name", "kwargs"}``
or null), ``normalization`` (``{"mean", "std"}`` or null), ``layers`` (each deployed layer's
name and config: kind, shapes, bits, path), ``modules`` (the type of every top-level-replaced
module, for checking a skeleton) and ``tensors`` (name -> dtype, shape, offset, nbytes) for the
model's whole ``state_dict`` (deployed layers store packed codes, the rest float32).

``load`` checks the magic, version, declared lengths against the file size (truncation), the
checksum (corruption), every tensor's dtype/shape/extent, and the rebuilt model's state_dict
keys and shapes; any failure is one ``ValueError`` saying what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import torch
from torch import nn

from .._atomic import atomic_write_bytes
from .freeze import deployed_layers
from .layers import build_layer

MAGIC = b"GDNSQDPL"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_ZLIB_LEVEL = 9
_HEAD = struct.Struct("<8sIQQ")
_DIGEST = 32
_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _arch_of(model: nn.Module):
    arch = getattr(model, "gdnsq_architecture", None)
    if isinstance(arch, dict) and "name" in arch:
        return {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}
    return None


def save(model: nn.Module, path, *, architecture: dict | None = None, normalization: dict | None = None,
         metadata: dict | None = None) -> dict:
    """Write the frozen ``model`` to ``path`` atomically (temp file in the same folder + replace).

    Args:
        model: the output of :func:`gdnsq.deploy.freeze`.
        path: destination file.
        architecture: ``{"name": "resnet20", "kwargs": {...}}`` so that :func:`load` can rebuild
            the network through ``gdnsq.models.get_model``; defaults to the model's
            ``gdnsq_architecture`` attribute when it has one (freeze copies it from the model).
        normalization: ``{"mean": [...], "std": [...]}`` of the input pipeline (stored, returned by
            :func:`load` for the user's preprocessing).
        metadata: any extra JSON-serialisable dict (e.g. accuracy, bits summary).

    Returns the JSON metadata written.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if architecture is None:
        architecture = _arch_of(model)
    if architecture is not None and (not isinstance(architecture, dict) or "name" not in architecture):
        raise ValueError(f"architecture must be a dict with 'name' (and 'kwargs'), got {architecture!r}")
    if normalization is None:
        normalization = getattr(model, "gdnsq_normalization", None)
    from gdnsq import __version__

    state = model.state_dict()
    entries, chunks, offset = {}, [], 0
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        pad = (-offset) % 8
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        entries[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        chunks.append(raw)
        offset += len(raw)
    blob = b"".join(chunks)
    layers = [{"name": n, "config": _json_config(m.config)} for n, m in deployed_layers(model)]
    meta = {
        "format": "gdnsq-deployed",
        "format_version": FORMAT_VERSION,
        "gdnsq_version": __version__,
        "torch_version": torch.__version__,
        "architecture": architecture,
        "normalization": normalization,
        "layers": layers,
        "tensors": entries,
        "blob_nbytes": len(blob),
        "metadata": metadata or {},
    }
    header = zlib.compress(json.dumps(meta, sort_keys=True).encode("utf-8"), _ZLIB_LEVEL)
    stored_blob = zlib.compress(blob, _ZLIB_LEVEL)
    body = _HEAD.pack(MAGIC, FORMAT_VERSION, len(header), len(stored_blob)) + header + stored_blob
    data = body + hashlib.sha256(body).digest()
    atomic_write_bytes(path, data)
    return meta


def _json_config(config: dict) -> dict:
    return json.loads(json.dumps(config))


def read_artifact(path) -> tuple:
    """Validated ``(metadata, {name: tensor})`` of an artifact; ValueError when it is bad."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read deployed model {path!r}: {e}") from e
    if len(data) < _HEAD.size + _DIGEST:
        raise ValueError(f"{path}: truncated or not a gdnsq deployed model ({len(data)} bytes)")
    magic, version, hlen, blen = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a gdnsq deployed model (bad magic {magic!r})")
    if version not in READ_VERSIONS:
        raise ValueError(f"{path}: format version {version} is not supported (this gdnsq reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))})")
    expected = _HEAD.size + hlen + blen + _DIGEST
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: file {what}: {len(data)} bytes, header says {expected}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path}: checksum mismatch: the file is corrupted")
    header, blob = body[_HEAD.size:_HEAD.size + hlen], body[_HEAD.size + hlen:]
    try:
        if version >= 2:
            header = zlib.decompress(header)
        meta = json.loads(header.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata is not valid (compressed) JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format_version") != version:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{path}: metadata format_version {got} != header {version}")
    if version >= 2:
        want = meta.get("blob_nbytes")
        if not isinstance(want, int) or want < 0:
            raise ValueError(f"{path}: metadata has no valid blob_nbytes")
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(blob, want + 1)  # bounded: a damaged size cannot blow up memory
        except zlib.error as e:
            raise ValueError(f"{path}: tensor blob does not decompress: {e}") from e
        if len(raw) != want or not inflater.eof:
            raise ValueError(f"{path}: tensor blob is {len(raw)}+ bytes after decompression, metadata says {want}")
        blob = raw
    tensors = {}
    for name, e in meta.get("tensors", {}).items():
        dtype = _DTYPES.get(e.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unknown dtype {e.get('dtype')!r}")
        shape = [int(s) for s in e["shape"]]
        if any(s < 0 for s in shape):
            raise ValueError(f"{path}: tensor {name} has a negative dimension {shape}")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        off = int(e["offset"])
        if nbytes != e["nbytes"] or off < 0 or off + nbytes > len(blob):
            raise ValueError(f"{path}: tensor {name} ({e['dtype']} {shape}) does not fit the blob")
        buf = bytearray(blob[off:off + nbytes])
        t = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = t.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return meta, tensors


def load(path, model: nn.Module | None = None, *, map_location="cpu") -> nn.Module:
    """Rebuild a frozen model from an artifact written by :func:`save`.

    Args:
        path: the artifact.
        model: a skeleton of the same architecture (an FP model, the fake-quant model, or a
            frozen one). Needed when the artifact names no architecture known to
            ``gdnsq.models.get_model``; the skeleton is not modified.
        map_location: device of the returned model.

    Returns the frozen model in eval mode, with ``gdnsq_metadata`` (the JSON metadata),
    ``gdnsq_normalization`` and ``gdnsq_architecture`` attributes.
    """
    import copy

    meta, tensors = read_artifact(path)
    if model is None:
        arch = meta.get("architecture")
        if not arch:
            raise ValueError(f"{path}: the artifact names no architecture; pass a model skeleton as model=")
        try:
            from gdnsq.models import get_model
        except ImportError as e:
            raise ValueError(f"{path}: cannot rebuild {arch['name']!r}: gdnsq.models unavailable") from e
        try:
            skeleton = get_model(arch["name"], **arch.get("kwargs", {}))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: unknown architecture {arch!r}; pass a model skeleton as model=") from e
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
        skeleton = copy.deepcopy(model)
    for entry in meta.get("layers", []):
        name = entry["name"]
        try:
            skeleton.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{path}: the model has no layer {name!r} that the artifact deploys") from e
        layer = build_layer(entry["config"])
        parent_name, _, child = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        setattr(parent, child, layer)
    own = skeleton.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: artifact does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if tuple(own[name].shape) != tuple(t.shape) or own[name].dtype != t.dtype:
            raise ValueError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, the model expects "
                             f"{own[name].dtype} {tuple(own[name].shape)}")
    skeleton.load_state_dict(tensors, strict=True)
    skeleton = skeleton.to(map_location).eval()
    skeleton.gdnsq_metadata = meta
    skeleton.gdnsq_normalization = meta.get("normalization")
    skeleton.gdnsq_architecture = meta.get("architecture")
    return skeleton
