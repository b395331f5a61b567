"""bits.png and curves.png drawn with matplotlib: PNG written atomically, lines follow the data."""
import os

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from gdnsq.train.plot import plot_bit_history, plot_curves

TAB10 = [tuple(int(round(255 * c)) for c in colormaps["tab10"](i)[:3]) for i in range(10)]


def _history(n_epochs=6, layers=("layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1")):
    return [{"epoch": e, "layers": {name: {"weight": 10 - e * (1.2 + 0.1 * i), "act": 10 - e * (1.0 + 0.2 * i)}
                                    for i, name in enumerate(layers)},
             "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_top1": 50 + 5 * e, "converged": e > 3}
            for e in range(1, n_epochs + 1)]


def _rgb(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def _mask(rgb, colour, tol=10):
    return (np.abs(rgb - np.array(colour)).max(axis=2) <= tol)


def test_png_size_content_and_one_colour_per_layer(tmp_path):
    path = str(tmp_path / "bits.png")
    assert plot_bit_history(_history(), path, targets={"weight": 2, "act": 2}) == path
    rgb = _rgb(path)
    assert rgb.shape == (900, 1400, 3)
    assert (rgb == 255).all(axis=2).mean() < 0.97  # not blank
    assert _mask(rgb, (0, 0, 0), tol=40).sum() > 2000  # axes, ticks, labels, target
    for i in range(3):  # each layer's line (and legend swatch) is drawn in its own colour
        assert _mask(rgb, TAB10[i]).sum() > 300, i
    assert _mask(rgb, TAB10[3]).sum() == 0  # no fourth layer
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_lines_go_down_with_the_bits(tmp_path):
    """The layer's colour sits higher (smaller row) at the left than at the right of the weight
    panel: the plot follows the data."""
    path = str(tmp_path / "bits.png")
    plot_bit_history(_history(layers=("only",)), path, size=(800, 600))
    m = _mask(_rgb(path), TAB10[0])[:300, :560]  # weight panel, left of the legend
    cols = np.nonzero(m.any(axis=0))[0]
    left, right = cols.min(), cols.max()
    top_row = lambda c: np.nonzero(m[:, c])[0].min()  # noqa: E731
    assert right - left > 200 and top_row(left + 2) < top_row(right - 2)


def test_single_epoch_missing_act_and_per_layer_targets(tmp_path):
    hist = [{"epoch": 1, "layers": {"a": {"weight": 3.0, "act": None}, "b": {"weight": 2.5, "act": 2.0}}}]
    path = str(tmp_path / "one.png")
    plot_bit_history(hist, path, targets={"weight": {"a": 2.0, "b": 3.0}, "act": None})
    rgb = _rgb(path)
    assert _mask(rgb, TAB10[0]).sum() > 20 and _mask(rgb, TAB10[1]).sum() > 20


def _axes_without_lines(rgb):
    """Axes, ticks and labels are drawn (dark pixels), and no data line in any tab10 colour
    (but its grey, tab10[7], which anti-aliased text and the grid also produce)."""
    assert _mask(rgb, (0, 0, 0), tol=40).sum() > 2000
    for i, colour in enumerate(TAB10):
        if i != 7:
            assert _mask(rgb, colour).sum() == 0, i


def test_empty_history_still_draws_axes(tmp_path):
    path = str(tmp_path / "empty.png")
    assert plot_bit_history([], path) == path
    rgb = _rgb(path)
    assert rgb.shape == (900, 1400, 3)
    _axes_without_lines(rgb)
    path = str(tmp_path / "c.png")
    assert plot_curves([], path) == path
    rgb = _rgb(path)
    assert rgb.shape == (500, 1200, 3)  # the default size
    _axes_without_lines(rgb)


def test_curves_follow_the_data(tmp_path):
    """curves.png: the val top-1 line (C2) rises: its pixels in the lower part of the right panel
    lie left of those in the upper part (rows below the legend)."""
    path = str(tmp_path / "curves.png")
    assert plot_curves(_history(), path, size=(1200, 500)) == path
    rgb = _rgb(path)
    assert rgb.shape == (500, 1200, 3)
    m = _mask(rgb, TAB10[2])[:, 600:]
    lower_cols = np.nonzero(m[300:450].any(axis=0))[0]
    upper_cols = np.nonzero(m[100:200].any(axis=0))[0]
    assert lower_cols.size and upper_cols.size and lower_cols.mean() + 100 < upper_cols.mean()
    for i in range(2):  # train and val loss lines on the left panel
        assert _mask(rgb[:, :600], TAB10[i]).sum() > 100, i


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="history"):
        plot_bit_history({"epoch": 1}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="size"):
        plot_bit_history([], str(tmp_path / "x.png"), size=(10, 10))
    with pytest.raises(TypeError, match="history"):
        plot_curves("x", str(tmp_path / "x.png"))
