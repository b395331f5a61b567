"""The packed binary weight of :func:`binary_linear` / :func:`binary_conv2d`: pack once, reuse.

:class:`PackedBinaryWeight` holds the packed codes and per-channel metadata, built by
:func:`pack_linear_weight` / :func:`pack_conv_weight`. A weight enters the ``gdnsq::`` ops as
its tensors; its Python-side cache (derived tensors per call geometry) is found again through
the packed words (a weak-keyed table, :func:`remember` / :func:`weight_of`), so repeated eager
calls keep skipping that work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .bitpack import check_bits, num_words, pack_bits, unpack_bits

__all__ = ["PackedBinaryWeight", "pack_linear_weight", "pack_conv_weight", "resolve_weight", "remember",
           "weight_of"]


@dataclass(frozen=True)
class PackedBinaryWeight:
    """A binary weight ``w = minimum[c] + step[c]*k`` packed once for :func:`binary_linear` /
    :func:`binary_conv2d`. Build it with :func:`pack_linear_weight` or :func:`pack_conv_weight`.

    Fields:
        packed: int32 (O, W) words of the codes k. Linear: ``W = ceil(in_features/32)``, bits in
            input-feature order. Conv: ``W = kh*kw*ceil(C/32)``, tap-major: for tap (i, j) in
            row-major order, ``ceil(C/32)`` words hold the channels LSB first, zero-padded.
        step: float32 (O,) per-output-channel step ``s_c`` (same units as the weights).
        minimum: float32 (O,) per-output-channel lowest level ``m_c``.
        ones: int32 (O,) ``sum_i k`` per output channel.
        tap_ones: int32 (O, kh, kw) ``sum over input channels of k`` per tap (conv only, else None).
        in_features: C*kh*kw for conv, K for linear (the number of real codes per output).
        in_channels: C (conv) or K (linear).
        kernel_size: (kh, kw) for conv, None for linear.
    """

    packed: torch.Tensor
    step: torch.Tensor
    minimum: torch.Tensor
    ones: torch.Tensor
    tap_ones: Optional[torch.Tensor]
    in_features: int
    in_channels: int
    kernel_size: Optional[Tuple[int, int]]
    # Derived tensors that depend only on the weight and the call geometry (float codes, the
    # per-position real-tap counts), filled on first use so that repeated calls skip them.
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def out_channels(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes alone (the metadata adds 8 bytes per output channel)."""
        return self.packed.numel() * self.packed.element_size()

    def to(self, device) -> "PackedBinaryWeight":
        """Copy of this weight with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedBinaryWeight(mv(self.packed), mv(self.step), mv(self.minimum), mv(self.ones),
                                  mv(self.tap_ones), self.in_features, self.in_channels, self.kernel_size)

    def codes(self) -> torch.Tensor:
        """The 0/1 codes as uint8: (O, K) for linear, (O, C, kh, kw) for conv."""
        if self.kernel_size is None:
            return unpack_bits(self.packed, self.in_features, dim=1)
        kh, kw = self.kernel_size
        cw = num_words(self.in_channels)
        words = self.packed.reshape(self.out_channels, kh, kw, cw)
        return unpack_bits(words, self.in_channels, dim=3).permute(0, 3, 1, 2).contiguous()


def _per_channel(v, out_channels: int, name: str, device) -> torch.Tensor:
    """float32 (O,) from a Python number or a 1-element / (O,) tensor."""
    if isinstance(v, torch.Tensor):
        if not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float tensor, got {v.dtype}")
        t = v.detach().reshape(-1).to(device=device, dtype=torch.float32)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        t = torch.full((1,), float(v), dtype=torch.float32, device=device)  # a fill, no H2D copy
    else:
        raise TypeError(f"{name} must be a float or a tensor of shape ({out_channels},), got {type(v).__name__}")
    if t.numel() == 1:
        t = t.expand(out_channels)
    if t.numel() != out_channels:
        raise ValueError(f"{name} must have shape ({out_channels},) (one per output channel) or 1 element, got {t.numel()} elements")
    return t.contiguous()


def pack_linear_weight(weight_codes: torch.Tensor, weight_step, weight_min, *, check: bool = True) -> PackedBinaryWeight:
    """Pack a linear layer's binary weight once.

    Args:
        weight_codes: (O, K) bool/integer 0/1 codes k.
        weight_step: (O,) float step s_c (or a number / 1-element tensor for all channels).
        weight_min: (O,) float lowest level m_c (or a number / 1-element tensor).
        check: check that the codes are 0/1 (see :func:`pack_bits`).

    Returns:
        :class:`PackedBinaryWeight` with ``packed`` of shape (O, ceil(K/32)), on the codes' device.
    """
    check_bits(weight_codes, "weight_codes", values=check)
    if weight_codes.dim() != 2:
        raise ValueError(f"weight_codes must be 2-D (out_features, in_features), got shape {tuple(weight_codes.shape)}")
    O, K = weight_codes.shape
    dev = weight_codes.device
    return PackedBinaryWeight(
        packed=pack_bits(weight_codes, dim=1, check=False),
        step=_per_channel(weight_step, O, "weight_step", dev),
        minimum=_per_channel(weight_min, O, "weight_min", dev),
        ones=weight_codes.to(torch.int32).sum(dim=1, dtype=torch.int32),
        tap_ones=None,
        in_features=K,
        in_channels=K,
        kernel_size=None,
    )


def pack_conv_weight(weight_codes: torch.Tensor, weight_step, weight_min, *, check: bool = True) -> PackedBinaryWeight:
    """Pack a conv layer's binary weight once.

    Args:
        weight_codes: (O, C, kh, kw) bool/integer 0/1 codes k.
        weight_step: (O,) float step s_c (or a number / 1-element tensor for all channels).
        weight_min: (O,) float lowest level m_c (or a number / 1-element tensor).
        check: check that the codes are 0/1 (see :func:`pack_bits`).

    Returns:
        :class:`PackedBinaryWeight` with ``packed`` of shape (O, kh*kw*ceil(C/32)) (tap-major,
        channels LSB first within a tap), on the codes' device.
    """
    check_bits(weight_codes, "weight_codes", values=check)
    if weight_codes.dim() != 4:
        raise ValueError(f"weight_codes must be 4-D (O, C, kh, kw), got shape {tuple(weight_codes.shape)}")
    O, C, kh, kw = weight_codes.shape
    dev = weight_codes.device
    # Channels innermost so that activations can be packed once per pixel (see binary_conv2d).
    packed = pack_bits(weight_codes.permute(0, 2, 3, 1), dim=3, check=False).reshape(O, kh * kw * num_words(C))
    tap_ones = weight_codes.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return PackedBinaryWeight(
        packed=packed.contiguous(),
        step=_per_channel(weight_step, O, "weight_step", dev),
        minimum=_per_channel(weight_min, O, "weight_min", dev),
        ones=tap_ones.sum(dim=(1, 2), dtype=torch.int32),
        tap_ones=tap_ones,
        in_features=C * kh * kw,
        in_channels=C,
        kernel_size=(kh, kw),
    )


def resolve_weight(weight_codes, weight_step, weight_min, conv: bool, check: bool = True) -> PackedBinaryWeight:
    """``weight_codes`` as a :class:`PackedBinaryWeight` (packed here when given as codes)."""
    if isinstance(weight_codes, PackedBinaryWeight):
        if weight_step is not None or weight_min is not None:
            raise ValueError("weight_step and weight_min must be None when weight_codes is a "
                             "PackedBinaryWeight (it stores them)")
        if (weight_codes.kernel_size is not None) != conv:
            kind = "pack_conv_weight" if conv else "pack_linear_weight"
            raise ValueError(f"weight_codes is a PackedBinaryWeight of the wrong kind; build it with {kind}")
        return weight_codes
    if weight_step is None or weight_min is None:
        raise ValueError("weight_step and weight_min are required when weight_codes is a tensor of codes")
    return (pack_conv_weight if conv else pack_linear_weight)(weight_codes, weight_step, weight_min, check=check)


_PACKED_WEIGHTS = WeakTensorKeyDictionary()


def remember(pw: PackedBinaryWeight) -> None:
    """Record ``pw`` under its packed words, for :func:`weight_of` inside the ops."""
    if _PACKED_WEIGHTS.get(pw.packed) is not pw:
        _PACKED_WEIGHTS[pw.packed] = pw


def weight_of(packed, step, minimum, ones, tap_ones, in_channels: int, kernel_size) -> PackedBinaryWeight:
    """The remembered weight of these exact tensors (with its cache), else a new one around them."""
    pw = _PACKED_WEIGHTS.get(packed)
    if (pw is not None and pw.step is step and pw.minimum is minimum and pw.ones is ones
            and pw.tap_ones is tap_ones):
        return pw
    kh, kw = kernel_size if kernel_size is not None else (1, 1)
    return PackedBinaryWeight(packed, step, minimum, ones, tap_ones, in_channels * kh * kw, in_channels,
                              kernel_size)
