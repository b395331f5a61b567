"""Training figures with matplotlib (Agg, no display needed), written atomically as PNG.

* :func:`plot_bit_history` -> ``bits.png``: per-layer continuous bit-width over training, the
  paper's capacity-dynamics figure. Two panels share the epoch axis: weight bit-width (top) and
  activation bit-width (bottom), one line per quantized layer, the target as a dashed black line.
* :func:`plot_curves` -> ``curves.png``: training / validation loss (left) and validation top-1
  (right) per epoch, with the epochs where the model met its bit targets marked.

Example::

    history = [{"epoch": 1, "layers": {"layer1.0.conv1": {"weight": 7.9, "act": 8.3}},
                "train_loss": 0.4, "val_loss": 0.5, "val_top1": 88.1, "converged": False}, ...]
    plot_bit_history(history, "runs/x/bits.png", targets={"weight": 2, "act": 2})
    plot_curves(history, "runs/x/curves.png")
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .._atomic import atomic_open

DPI = 100


def _check(fn: str, history, size) -> None:
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"{fn}: history must be a list of epoch records, got {type(history).__name__}")
    width, height = size
    if width < 400 or height < 300:
        raise ValueError(f"{fn}: size must be at least (400, 300) pixels, got {size!r}")


def _figure(size) -> Figure:
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg canvas: no GUI backend, works on headless machines
    return fig


def _save(fig: Figure, path: str) -> str:
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return path


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


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
    _check("plot_bit_history", history, size)
    names = []
    for rec in history:
        for name in rec.get("layers", {}):
            if name not in names:
                names.append(name)
    # one distinct colour per layer: tab10, or tab20 for deeper nets (ResNet-20 has 18 layers)
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    fig = _figure(size)
    axes = fig.subplots(2, 1, sharex=True)
    for ax, kind, label in ((axes[0], "weight", "weight bits"), (axes[1], "act", "activation bits")):
        for i, name in enumerate(names):
            pts = [(rec["epoch"], rec["layers"][name].get(kind)) for rec in history
                   if name in rec.get("layers", {})]
            pts = [(e, b) for e, b in pts if _finite(b)]
            if pts:
                ax.plot([e for e, _ in pts], [b for _, b in pts], marker="o" if len(pts) == 1 else None,
                        color=palette(i % palette.N), linewidth=1.5, label=name)
        target = (targets or {}).get(kind)
        if target is not None:
            target = max(target.values()) if isinstance(target, Mapping) else float(target)
            ax.axhline(target, color="black", linestyle="--", linewidth=1.5, label="target")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[1].set_xlabel("epoch")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize="small", frameon=False)
    fig.suptitle(title or "GDNSQ per-layer continuous bit-width")
    fig.tight_layout(rect=(0, 0, 0.8 if handles else 1, 1))
    return _save(fig, path)


def plot_curves(history: Sequence[Mapping], path: str, *, title: Optional[str] = None,
                size=(1200, 500)) -> str:
    """Loss and validation top-1 per epoch, written atomically to ``path`` (PNG).

    Args:
        history: epoch records with any of ``train_loss`` (the training objective),
            ``val_loss`` (cross-entropy on the validation split), ``val_top1`` (percent) and
            ``converged`` (bool; converged validated epochs are marked with a filled dot).
        path: output file (``.png``).
        title: text at the top.
        size: (width, height) in pixels.

    Returns ``path``.
    """
    _check("plot_curves", history, size)
    fig = _figure(size)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, label in (("train_loss", "train objective"), ("val_loss", "val cross-entropy")):
        pts = [(r["epoch"], r[key]) for r in history if _finite(r.get(key))]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o" if len(pts) == 1 else None, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    if any(_finite(r.get("train_loss")) and r["train_loss"] > 0 for r in history):
        ax_loss.set_yscale("log")
    pts = [(r["epoch"], r["val_top1"], bool(r.get("converged"))) for r in history if _finite(r.get("val_top1"))]
    if pts:
        ax_acc.plot([e for e, _, _ in pts], [a for _, a, _ in pts], color="C2", marker="o",
                    markerfacecolor="white", label="val top-1")
        conv = [(e, a) for e, a, c in pts if c]
        if conv:
            ax_acc.plot(*zip(*conv), linestyle="none", marker="o", color="C2", label="converged")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("val top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title or "GDNSQ training curves")
    fig.tight_layout()
    return _save(fig, path)
