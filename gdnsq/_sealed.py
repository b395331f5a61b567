"""Checksummed ("sealed") torch files: the trainer's checkpoints.

A ``torch.save`` zip archive notices a truncated file but not a flipped byte inside a tensor (the
record CRCs are not checked on read), so a damaged checkpoint could resume a run from silently
wrong weights. A sealed file wraps the ``torch.save`` bytes of the payload in a fixed header::

    MAGIC (24 bytes) | payload length (uint64, little endian) | SHA-256 of payload (32 bytes) | payload

and :func:`read_sealed` refuses the file unless the length matches the file size (truncation,
trailing garbage) and the digest matches the payload (any changed byte). The payload is then read
with ``torch.load(weights_only=True)``: it holds tensors and plain Python values only.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct

from ._atomic import atomic_write_bytes

MAGIC = b"GDNSQ-SEALED-TORCH-v1\n\x00\x00"
_HEAD = struct.Struct("<24sQ32s")
assert len(MAGIC) == 24


class SealError(ValueError):
    """A sealed file is truncated, altered or not sealed at all (one-line message with the path)."""


def is_sealed(path) -> bool:
    """True when ``path`` starts with the seal header (it may still be damaged further on)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def write_sealed(obj, path) -> None:
    """``torch.save`` ``obj`` into ``path`` atomically, wrapped with its length and SHA-256."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, _HEAD.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload)


def read_sealed(path):
    """Verify and load a file written by :func:`write_sealed` (CPU tensors, weights_only=True).

    Raises FileNotFoundError, or :class:`SealError` naming ``path`` when the header is missing, the
    file is shorter or longer than its header says, or the checksum does not match."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEAD.size or not data.startswith(MAGIC):
        raise SealError(f"checkpoint {path} is not a checksummed gdnsq file (header missing or truncated)")
    _, length, digest = _HEAD.unpack_from(data)
    payload = memoryview(data)[_HEAD.size:]
    if len(payload) != length:
        raise SealError(f"checkpoint {path} is truncated or corrupt: {len(payload)} payload bytes, "
                        f"header says {length}; delete it to restart, or restore a complete copy")
    if hashlib.sha256(payload).digest() != digest:
        raise SealError(f"checkpoint {path} is corrupt: its SHA-256 checksum does not match its content "
                        "(a changed byte); delete it to restart, or restore a complete copy")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - intact bytes that torch cannot read: not ours
        raise SealError(f"checkpoint {path} passed its checksum but cannot be read "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
