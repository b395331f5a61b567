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

The JSON holds ``format``, ``format_version``, ``gdnsq_version``, ``torch_version``,
``architecture`` (``{"name", "kwargs"}`` or null), ``normalization`` (a name,
``{"mean", "std"}`` or null), ``layers`` (each deployed layer's name and config: kind, shapes,
bits, path), ``tensors`` (name -> dtype, shape, offset, nbytes) for the model's whole
``state_dict`` (deployed layers store packed codes, the rest float32), ``metadata`` (the
caller's dict) and, in version 2, ``blob_nbytes``.

``load`` checks the magic, version, declared lengths against the file size (truncation), the
checksum (corruption), every header field (``_header``: type, range, consistency with the blob
and the other fields) before anything is sized from it, and the rebuilt model against the
layers and tensors; any failure is one ``ValueError`` naming the file and what is wrong.
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
from ._header import (ACT_TENSORS, FORMAT_NAME, MAX_HEADER_BYTES, check_architecture, check_header,
                      check_normalization, show)
from .freeze import deployed_layers, top_activation_code
from .layers import _DeployedBase, build_layer

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
    if normalization is None:
        normalization = getattr(model, "gdnsq_normalization", None)
    # what load would refuse is not written
    check_architecture(architecture)
    check_normalization(normalization)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
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
        "format": FORMAT_NAME,
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


def _inflate(stored: bytes, limit: int, what: str, path: str) -> bytes:
    """zlib-decompress ``stored`` into at most ``limit`` bytes (the output never grows past
    ``limit + 1``, whatever the stream claims), as one complete stream with nothing after it."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stored, limit + 1)
    except zlib.error as e:
        raise ValueError(f"{path}: {what} does not decompress: {e}") from e
    if len(raw) > limit:
        raise ValueError(f"{path}: {what} is more than {limit} bytes after decompression")
    if not inflater.eof or inflater.unused_data:
        raise ValueError(f"{path}: {what} is not one complete zlib stream")
    return raw


def read_artifact(path) -> tuple:
    """Validated ``(metadata, {name: tensor})`` of an artifact; ValueError when it is bad.

    Beyond the fixed header and the checksum, every field of the JSON header is checked (type,
    range, consistency with the other fields and the blob: ``_header.check_header``) before
    anything is sized from it, and both decompressions are bounded.
    """
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
    if version >= 2:
        header = _inflate(header, MAX_HEADER_BYTES, "metadata", path)
    elif len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: metadata is more than {MAX_HEADER_BYTES} bytes")
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: metadata is not valid JSON: {e}") from e
    try:
        check_header(meta, version, _DTYPES, blob_len=len(blob) if version < 2 else None)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if version >= 2:
        want = meta["blob_nbytes"]
        blob = _inflate(blob, want, "tensor blob", path)
        if len(blob) != want:
            raise ValueError(f"{path}: tensor blob is {len(blob)} bytes after decompression, metadata "
                             f"blob_nbytes says {want}")
    tensors = {}
    for name, e in meta["tensors"].items():
        dtype, shape, off, nbytes = _DTYPES[e["dtype"]], e["shape"], e["offset"], e["nbytes"]
        if nbytes:
            tensors[name] = torch.frombuffer(bytearray(blob[off:off + nbytes]), dtype=torch.uint8).view(dtype).reshape(shape)
        else:
            tensors[name] = torch.empty(shape, dtype=dtype)
    return meta, tensors


def load(path, model: nn.Module | None = None, *, map_location="cpu", plan: bool = True) -> nn.Module:
    """Rebuild a frozen model from an artifact written by :func:`save`.

    Args:
        path: the artifact.
        model: a skeleton of the same architecture (an FP model, the fake-quant model, or a
            frozen one). Needed when the artifact names no architecture known to
            ``gdnsq.models.get_model``; the skeleton is not modified.
        map_location: device of the returned model.
        plan: attach the deploy plan (:func:`gdnsq.deploy.plan.attach_plan`), as ``freeze`` does.

    Returns the frozen model in eval mode, with ``gdnsq_metadata`` (the JSON metadata),
    ``gdnsq_normalization`` and ``gdnsq_architecture`` attributes.

    Raises one ``ValueError`` naming the file and the bad header field for anything wrong with the
    file, including a mismatch with the model (a deployed layer whose kind, shape or geometry is
    not the model's layer's, tensors the model does not have) and activation parameters whose
    codes do not fit the layer's ``act_bits``.
    """
    import copy

    meta, tensors = read_artifact(path)
    if model is None:
        arch = meta["architecture"]
        if arch is None:
            raise ValueError(f"{path}: the artifact names no architecture; pass a model skeleton as model=")
        # The architecture's constructor arguments and the layer configs come from the file:
        # check the model they build against the tensors on the meta device first, where
        # nothing is allocated.
        with torch.device("meta"):
            probe = _model_by_name(path, arch)
            try:
                _assemble(path, probe, meta, tensors)
            except ValueError as e:
                raise ValueError(f"{e} (in the model that header field architecture {show(arch)} builds)") from None
        skeleton = _model_by_name(path, arch)
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module skeleton, got {type(model).__name__}")
        skeleton = copy.deepcopy(model)
    _assemble(path, skeleton, meta, tensors)
    _check_act_codes(path, meta, tensors)
    skeleton.load_state_dict(tensors, strict=True)
    skeleton = skeleton.to(map_location).eval()
    skeleton.gdnsq_metadata = meta
    skeleton.gdnsq_normalization = meta["normalization"]
    skeleton.gdnsq_architecture = meta["architecture"]
    from .plan import attach_plan, detach_plan

    if plan:
        attach_plan(skeleton)
    else:
        detach_plan(skeleton)
    return skeleton


def _model_by_name(path, arch: dict) -> nn.Module:
    """``gdnsq.models.get_model(name, **kwargs)`` of a checked ``architecture`` field; ValueError
    when it cannot be built."""
    try:
        from gdnsq.models import get_model
    except ImportError as e:
        raise ValueError(f"{path}: cannot rebuild {show(arch['name'])}: gdnsq.models unavailable") from e
    try:
        return get_model(arch["name"], **arch.get("kwargs", {}))
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: header field architecture: unknown architecture or arguments {show(arch)} "
                         f"({reason}); pass a model skeleton as model=") from e


def _assemble(path, skeleton: nn.Module, meta: dict, tensors: dict) -> None:
    """Replace ``skeleton``'s deployed layers by empty ones built from their configs, after
    checking each against the layer it replaces, then check the tensors against its state_dict."""
    for i, entry in enumerate(meta["layers"]):
        field, name = f"layers[{i}]", entry["name"]
        try:
            module = skeleton.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{path}: header field {field}.name: the model has no layer {name!r} that the "
                             f"artifact deploys") from e
        _check_replaces(path, module, entry["config"], f"{field}.config", name)
        layer = build_layer(entry["config"], f"{field}.config")
        parent_name, _, child = name.rpartition(".")
        parent = skeleton.get_submodule(parent_name) if parent_name else skeleton
        setattr(parent, child, layer)
    own = skeleton.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: header field tensors: the artifact does not match the model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if tuple(own[name].shape) != tuple(t.shape) or own[name].dtype != t.dtype:
            raise ValueError(f"{path}: header field tensors[{name!r}]: dtype {t.dtype}, shape {list(t.shape)}; "
                             f"the model expects dtype {own[name].dtype}, shape {list(own[name].shape)}")


def _geometry(module: nn.Module):
    """(kind, weight_shape, bias, {stride, padding, dilation, groups}) of a conv/linear layer, a
    deployed one included; None for any other module."""
    if isinstance(module, _DeployedBase):
        c = module.config
        conv = {k: c[k] for k in ("stride", "padding", "dilation", "groups")} if module.kind == "conv2d" else {}
        return module.kind, list(c["weight_shape"]), bool(c["bias"]), conv
    if isinstance(module, nn.Conv2d):
        conv = {"stride": list(module.stride), "padding": module.padding if isinstance(module.padding, str)
                else list(module.padding), "dilation": list(module.dilation), "groups": module.groups}
        return "conv2d", list(module.weight.shape), module.bias is not None, conv
    if isinstance(module, nn.Linear):
        return "linear", list(module.weight.shape), module.bias is not None, {}
    return None


def _check_replaces(path, module: nn.Module, config: dict, field: str, name: str) -> None:
    """The deployed layer of ``config`` (already type-checked) has the kind, weight shape, bias
    and conv geometry of the model's layer ``module`` it replaces."""
    geometry = _geometry(module)
    if geometry is None:
        raise ValueError(f"{path}: header field {field}.kind: {config['kind']!r}, but the model's {name!r} is a "
                         f"{type(module).__name__}")
    kind, shape, bias, conv = geometry
    for key, want in [("kind", kind), ("weight_shape", shape), ("bias", bias)] + sorted(conv.items()):
        if config[key] != want:
            raise ValueError(f"{path}: header field {field}.{key}: {show(config[key])}, but the model's "
                             f"{name!r} has {want!r}")


def _check_act_codes(path, meta: dict, tensors: dict) -> None:
    """Every deployed layer's stored activation quantizer yields codes in [0, 2**act_bits - 1]
    (the deployed layers pack them without re-checking: binary/bitplane paths)."""
    for i, entry in enumerate(meta["layers"]):
        bits = entry["config"]["act_bits"]
        if bits is None:
            continue
        name = entry["name"]
        params = [tensors[f"{name}.{t}"] for t in ACT_TENSORS]
        top = None
        if all(bool(torch.isfinite(p)) for p in params):
            top = top_activation_code(*params)
        if top is None or not 0 <= top <= 2**bits - 1:
            raise ValueError(f"{path}: header field layers[{i}].config.act_bits: {bits}, but the stored "
                             f"activation quantizer of {name!r} (act_log2_step, act_log2_range, act_offset "
                             f"= {[float(p) for p in params]}) has codes up to {top}")
