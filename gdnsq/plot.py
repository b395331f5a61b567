"""Per-layer bit-width over training as a PNG (Pillow only), the paper's capacity-dynamics figure.

Two panels share the epoch axis: weight bit-width (top) and activation bit-width (bottom), one
coloured line per quantized layer, the target as a dashed black line, a legend naming the layers.

Example::

    history = [{"epoch": 1, "layers": {"layer1.0.conv1": {"weight": 7.9, "act": 8.3}}}, ...]
    plot_bit_history(history, "runs/x/bits.png", targets={"weight": 2, "act": 2})
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from ._atomic import atomic_open

# Distinct, print-friendly colours (the 20 "tab20"-style hues, dark ones first).
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw, text, font):
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _nice_step(span: float, max_ticks: int) -> float:
    """Smallest step from {1, 2, 5} x 10^k giving at most ``max_ticks`` intervals over ``span``."""
    if span <= 0:
        return 1.0
    raw = span / max_ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _dashed_line(draw, p0, p1, fill, width=2, dash=8, gap=6):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    pos = 0.0
    while pos < length:
        end = min(pos + dash, length)
        a, b = pos / length, end / length
        draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                  fill=fill, width=width)
        pos = end + gap


def plot_bit_history(history: Sequence[Mapping], path: str, *, targets: Optional[Mapping] = None,
                     title: Optional[str] = None, size=(1400, 900)) -> str:
    """Draw per-layer bit-width vs epoch and write it atomically to ``path`` (PNG).

    Args:
        history: one record per epoch, ``{"epoch": int, "layers": {name: {"weight": bits,
            "act": bits or None}}}`` (bits in log2 levels; None/missing = not quantized).
        path: output file (``.png``).
        targets: optional ``{"weight": bits, "act": bits}`` drawn as dashed lines (per-layer
            dicts are drawn as their maximum).
        title: text at the top.
        size: (width, height) in pixels.

    Returns ``path``.
    """
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"plot_bit_history: history must be a list of epoch records, got {type(history).__name__}")
    width, height = size
    if width < 400 or height < 300:
        raise ValueError(f"plot_bit_history: size must be at least (400, 300) pixels, got {size!r}")
    names = []
    for rec in history:
        for name in rec.get("layers", {}):
            if name not in names:
                names.append(name)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_tick, f_legend = _font(22), _font(17), _font(14), _font(13)
    title = title or "GDNSQ per-layer bit-width over training"
    tw, th = _text_size(draw, title, f_title)
    draw.text(((width - tw) / 2, 12), title, fill="black", font=f_title)

    # Legend column on the right: as wide as the longest name.
    legend_w = max([_text_size(draw, n, f_legend)[0] for n in names] + [60]) + 50
    left, right = 80, width - legend_w - 20
    top = 30 + th
    bottom_margin = 60
    panel_gap = 50
    panel_h = (height - top - bottom_margin - panel_gap) / 2
    epochs = [rec["epoch"] for rec in history]
    x_min = min(epochs) if epochs else 0
    x_max = max(epochs) if epochs else 1
    if x_max == x_min:
        x_min, x_max = x_min - 0.5, x_max + 0.5

    def xpix(e):
        return left + (e - x_min) / (x_max - x_min) * (right - left)

    kinds = [("weight", "weight bits"), ("act", "activation bits")]
    for panel, (kind, label) in enumerate(kinds):
        y0 = top + panel * (panel_h + panel_gap)
        y1 = y0 + panel_h
        values = [rec["layers"][n].get(kind) for rec in history for n in rec.get("layers", {})]
        values = [v for v in values if v is not None and math.isfinite(v)]
        target = None
        if targets is not None and targets.get(kind) is not None:
            t = targets[kind]
            target = max(t.values()) if isinstance(t, Mapping) else float(t)
            values.append(target)
        y_hi = math.ceil(max(values) + 0.25) if values else 1.0
        y_lo = 0.0
        if y_hi <= y_lo:
            y_hi = y_lo + 1

        def ypix(b):
            return y1 - (b - y_lo) / (y_hi - y_lo) * (y1 - y0)

        # Axes, grid and ticks.
        draw.rectangle([left, y0, right, y1], outline="black", width=2)
        ystep = _nice_step(y_hi - y_lo, 8)
        v = y_lo
        while v <= y_hi + 1e-9:
            yy = ypix(v)
            draw.line([(left, yy), (right, yy)], fill=(225, 225, 225), width=1)
            draw.line([(left - 6, yy), (left, yy)], fill="black", width=2)
            txt = f"{v:g}"
            w, h = _text_size(draw, txt, f_tick)
            draw.text((left - 10 - w, yy - h / 2 - 2), txt, fill="black", font=f_tick)
            v += ystep
        xstep = max(1.0, _nice_step(x_max - x_min, 10))
        e = math.ceil(x_min / xstep) * xstep
        while e <= x_max + 1e-9:
            xx = xpix(e)
            draw.line([(xx, y1), (xx, y1 + 6)], fill="black", width=2)
            txt = f"{e:g}"
            w, _ = _text_size(draw, txt, f_tick)
            draw.text((xx - w / 2, y1 + 8), txt, fill="black", font=f_tick)
            e += xstep
        # Vertical axis label, drawn on its own image and rotated.
        lw, lh = _text_size(draw, label, f_label)
        lab = Image.new("RGB", (lw + 4, lh + 8), "white")
        ImageDraw.Draw(lab).text((2, 0), label, fill="black", font=f_label)
        lab = lab.rotate(90, expand=True)
        img.paste(lab, (8, int((y0 + y1) / 2 - lab.size[1] / 2)))
        if target is not None:
            _dashed_line(draw, (left, ypix(target)), (right, ypix(target)), fill="black", width=2)
            txt = f"target {target:g}"
            w, h = _text_size(draw, txt, f_tick)
            draw.text((left + 8, ypix(target) - h - 8), txt, fill="black", font=f_tick)
        # One line per layer (with markers so that one-epoch histories are visible).
        for i, name in enumerate(names):
            color = PALETTE[i % len(PALETTE)]
            pts = [(xpix(rec["epoch"]), ypix(rec["layers"][name][kind]))
                   for rec in history
                   if name in rec.get("layers", {}) and rec["layers"][name].get(kind) is not None
                   and math.isfinite(rec["layers"][name][kind])]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=3, joint="curve")
            for (px, py) in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    xlabel = "epoch"
    w, _ = _text_size(draw, xlabel, f_label)
    draw.text(((left + right) / 2 - w / 2, height - 30), xlabel, fill="black", font=f_label)
    # Legend.
    lx = right + 25
    ly = top
    draw.text((lx, ly), "layers", fill="black", font=f_label)
    ly += 26
    for i, name in enumerate(names):
        color = PALETTE[i % len(PALETTE)]
        draw.line([(lx, ly + 8), (lx + 28, ly + 8)], fill=color, width=4)
        draw.text((lx + 36, ly), name, fill="black", font=f_legend)
        ly += 20
        if ly > height - 30:
            draw.text((lx + 36, ly), f"... ({len(names) - i - 1} more)", fill="black", font=f_legend)
            break
    with atomic_open(path, "wb") as f:
        img.save(f, format="PNG")
    return path
