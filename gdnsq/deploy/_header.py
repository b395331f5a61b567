"""Validation of a deployed-model artifact's JSON header and of a deployed layer's config.

A file whose checksum is right can still be malformed: written by another tool, edited by hand,
crafted. Every field is checked for type, range and consistency (with the other fields, with the
tensor blob) before anything is sized from it, and the first bad one raises a one-line
``ValueError`` naming the field by its path in the header::

    header field layers[3].config.weight_bits: expected an integer in [1, 16], got 99
    header field tensors['conv1.weight_packed'].shape: [2, 144] does not match layers[0].config ...

Consistency with the model the file is loaded into (layer kinds and shapes, the rebuilt
architecture's tensors) is checked by ``artifact.load``, which holds that model.
"""
from __future__ import annotations

import math

MAX_BITS = 16                 # the widest code ``layers.pack_codes`` stores
MAX_HEADER_BYTES = 64 << 20   # decompressed JSON header (ResNet-20: about 27 KB)
MAX_BLOB_BYTES = 16 << 30     # decompressed tensor blob
MAX_DIM = 2**31 - 1           # one dimension of a stored tensor
MAX_NDIM = 8
ALIGN = 8                     # ``save`` starts every tensor on an 8-byte boundary

FORMAT_NAME = "gdnsq-deployed"
_HEADER_KEYS = {"format", "format_version", "gdnsq_version", "torch_version", "architecture",
                "normalization", "layers", "tensors", "metadata"}
_TENSOR_KEYS = {"dtype", "shape", "offset", "nbytes"}
_CONV_KEYS = {"stride", "padding", "dilation", "groups"}
_LAYER_KEYS = {"kind", "weight_shape", "bias", "weight_bits", "act_bits", "path"}
ACT_TENSORS = ("act_log2_step", "act_log2_range", "act_offset")


def show(value) -> str:
    """repr of a header value, cut to 80 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect(ok: bool, field: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"header field {field}: expected {expected}, got {show(value)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v, field: str, lo: int, hi: int | None = None) -> int:
    ok = _is_int(v) and v >= lo and (hi is None or v <= hi)
    _expect(ok, field, f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", v)
    return v


def _ints(v, field: str, length: int, lo: int) -> list:
    ok = isinstance(v, list) and len(v) == length and all(_is_int(x) and lo <= x <= MAX_DIM for x in v)
    _expect(ok, field, f"a list of {length} integers in [{lo}, {MAX_DIM}]", v)
    return v


def _dict(v, field: str, required=()) -> dict:
    """``v`` as a dict holding every key of ``required``. ``field`` "" is the header itself.

    Keys a reader does not know are left alone (a newer writer's additions): nothing is sized or
    computed from them."""
    _expect(isinstance(v, dict), field or "(the whole header)", "a JSON object", v)
    missing = sorted(set(required) - set(v))
    if missing:
        raise ValueError(f"header field {f'{field}.' if field else ''}{missing[0]}: missing")
    return v


def _str(v, field: str) -> str:
    _expect(isinstance(v, str), field, "a string", v)
    return v


def check_layer_config(config, field: str = "config") -> dict:
    """Check a deployed layer's config (what ``freeze`` writes) for types and ranges; returns it.

    Whether ``path`` suits the layer is left to the built layer (``allowed_paths``).
    """
    kind = _dict(config, field, required=("kind",))["kind"]
    _expect(kind in ("conv2d", "linear"), f"{field}.kind", "'conv2d' or 'linear'", kind)
    conv = kind == "conv2d"
    _dict(config, field, required=_LAYER_KEYS | (_CONV_KEYS if conv else set()))
    shape = _ints(config["weight_shape"], f"{field}.weight_shape", 4 if conv else 2, 1)
    bits = _int(config["weight_bits"], f"{field}.weight_bits", 1, MAX_BITS)
    if math.prod(shape) * bits > 8 * MAX_BLOB_BYTES:
        raise ValueError(f"header field {field}.weight_shape: {shape} at {bits} bits is more than "
                         f"{MAX_BLOB_BYTES} bytes")
    if config["act_bits"] is not None:
        _int(config["act_bits"], f"{field}.act_bits", 1, MAX_BITS)
    _expect(isinstance(config["bias"], bool), f"{field}.bias", "true or false", config["bias"])
    _str(config["path"], f"{field}.path")
    if conv:
        _ints(config["stride"], f"{field}.stride", 2, 1)
        _ints(config["padding"], f"{field}.padding", 2, 0)
        _ints(config["dilation"], f"{field}.dilation", 2, 1)
        groups = _int(config["groups"], f"{field}.groups", 1, shape[0])
        _expect(shape[0] % groups == 0, f"{field}.groups", f"a divisor of the {shape[0]} output channels",
                groups)
    for key in ("realised_bits", "target_bits"):
        if key in config:
            bits_of = _dict(config[key], f"{field}.{key}", required=("weight", "act"))
            for part, v in bits_of.items():
                _expect(v is None or _is_number(v), f"{field}.{key}.{part}", "a number or null", v)
    if "chosen_by" in config:
        _str(config["chosen_by"], f"{field}.chosen_by")
    if "timings_ms" in config:
        for p, t in _dict(config["timings_ms"], f"{field}.timings_ms").items():
            _expect(_is_number(t), f"{field}.timings_ms[{p!r}]", "a number", t)
    return config


def check_normalization(v, field: str = "normalization") -> None:
    """null, a name (``"imagenet"``), or ``{"mean": [...], "std": [...]}`` (numbers)."""
    if v is None or isinstance(v, str):
        return
    _dict(v, field, required=("mean", "std"))
    for key in ("mean", "std"):
        seq = v[key]
        _expect(isinstance(seq, list) and all(_is_number(x) for x in seq), f"{field}.{key}",
                "a list of numbers", seq)


def check_architecture(v, field: str = "architecture") -> None:
    """null or ``{"name": str, "kwargs": {...}}`` (kwargs optional)."""
    if v is None:
        return
    _dict(v, field, required=("name",))
    _str(v["name"], f"{field}.name")
    if "kwargs" in v:
        _dict(v["kwargs"], f"{field}.kwargs")


def check_header(meta, version: int, dtypes: dict, blob_len: int | None = None) -> None:
    """Check an artifact's parsed JSON header.

    Args:
        meta: the parsed JSON.
        version: the format version of the file's fixed header.
        dtypes: stored dtype name -> torch dtype.
        blob_len: the tensor blob's length for version 1 (version 2 declares it: ``blob_nbytes``).
    """
    required = _HEADER_KEYS | ({"blob_nbytes"} if version >= 2 else set())
    _dict(meta, "", required=required)
    _expect(meta["format"] == FORMAT_NAME, "format", repr(FORMAT_NAME), meta["format"])
    _expect(meta["format_version"] == version and _is_int(meta["format_version"]), "format_version",
            f"{version} (the file header's version)", meta["format_version"])
    _str(meta["gdnsq_version"], "gdnsq_version")
    _str(meta["torch_version"], "torch_version")
    check_architecture(meta["architecture"])
    check_normalization(meta["normalization"])
    _dict(meta["metadata"], "metadata")
    if version >= 2:
        blob_len = _int(meta["blob_nbytes"], "blob_nbytes", 0, MAX_BLOB_BYTES)
    extents = _check_tensors(meta["tensors"], dtypes, blob_len)
    end = max((e for _, e in extents.values()), default=0)
    if version >= 2 and end != blob_len:
        raise ValueError(f"header field blob_nbytes: {blob_len}, but the tensors end at byte {end}")
    _check_layers(meta["layers"], meta["tensors"])


def _check_tensors(table, dtypes: dict, blob_len: int) -> dict:
    """Check the tensor table; returns {name: (offset, end)} (non-overlapping, inside the blob)."""
    _dict(table, "tensors")
    extents = {}
    for name, entry in table.items():
        field = f"tensors[{name!r}]"
        _dict(entry, field, required=_TENSOR_KEYS)
        dtype = dtypes.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        _expect(dtype is not None, f"{field}.dtype", f"one of {sorted(dtypes)}", entry["dtype"])
        shape = entry["shape"]
        ok = (isinstance(shape, list) and len(shape) <= MAX_NDIM
              and all(_is_int(s) and 0 <= s <= MAX_DIM for s in shape))
        _expect(ok, f"{field}.shape", f"a list of at most {MAX_NDIM} integers in [0, {MAX_DIM}]", shape)
        offset = _int(entry["offset"], f"{field}.offset", 0)
        _expect(offset % ALIGN == 0, f"{field}.offset", f"a multiple of {ALIGN}", offset)
        nbytes = _int(entry["nbytes"], f"{field}.nbytes", 0)
        size = math.prod(shape) * dtype.itemsize
        if nbytes != size:
            raise ValueError(f"header field {field}.nbytes: {nbytes}, but shape {shape} of {entry['dtype']} "
                             f"is {size} bytes")
        if offset + nbytes > blob_len:
            raise ValueError(f"header field {field}.offset: bytes [{offset}, {offset + nbytes}) lie "
                             f"outside the {blob_len}-byte tensor blob")
        extents[name] = (offset, offset + nbytes)
    previous = None
    for name, (start, end) in sorted(extents.items(), key=lambda item: item[1]):
        if previous is not None and start < extents[previous][1] and end > start:
            raise ValueError(f"header field tensors[{name!r}].offset: bytes [{start}, {end}) overlap "
                             f"tensors[{previous!r}]")
        if end > start:
            previous = name
    return extents


def _layer_tensors(name: str, config: dict) -> dict:
    """{tensor name: (dtype name, shape, the config fields that size it)} of one deployed layer
    (its persistent buffers, as ``layers._DeployedBase`` registers them)."""
    shape = config["weight_shape"]
    out_ch = shape[0]
    packed = [config["weight_bits"], (math.prod(shape) + 7) // 8]
    want = {
        f"{name}.weight_packed": ("uint8", packed, "weight_bits, weight_shape"),
        f"{name}.weight_step": ("float32", [out_ch], "weight_shape"),
        f"{name}.weight_min": ("float32", [out_ch], "weight_shape"),
    }
    if config["bias"]:
        want[f"{name}.bias"] = ("float32", [out_ch], "bias, weight_shape")
    if config["act_bits"] is not None:
        for t in ACT_TENSORS:
            want[f"{name}.{t}"] = ("float32", [], "act_bits")
    return want


def _check_layers(layers, tensors: dict) -> None:
    """Each deployed layer's config, and its tensors in the table (dtype, shape, present iff
    the config says so)."""
    _expect(isinstance(layers, list), "layers", "a list", layers)
    names = set()
    for i, entry in enumerate(layers):
        field = f"layers[{i}]"
        _dict(entry, field, required=("name", "config"))
        name = _str(entry["name"], f"{field}.name")
        _expect(name != "" and name not in names, f"{field}.name", "a unique, non-empty module name", name)
        names.add(name)
        config = check_layer_config(entry["config"], f"{field}.config")
        want = _layer_tensors(name, config)
        for t, (dtype, shape, sized_by) in want.items():
            got = tensors.get(t)
            if got is None:
                raise ValueError(f"header field tensors: no {t!r}, which {field}.config ({sized_by}) needs")
            if got["dtype"] != dtype or got["shape"] != shape:
                raise ValueError(f"header field tensors[{t!r}].shape: {got['dtype']} {got['shape']} does not "
                                 f"match {field}.config ({sized_by}): expected {dtype} {shape}")
        for suffix in ("bias",) + ACT_TENSORS:
            t = f"{name}.{suffix}"
            if t in tensors and t not in want:
                what = "bias" if suffix == "bias" else "act_bits"
                raise ValueError(f"header field {field}.config.{what}: {show(config[what])}, but the "
                                 f"tensors hold {t!r}")
    for t in tensors:
        if t.endswith(".weight_packed") and t[:-len(".weight_packed")] not in names:
            raise ValueError(f"header field tensors[{t!r}]: packed weight codes, but no entry of layers "
                             f"deploys {t[:-len('.weight_packed')]!r}")

