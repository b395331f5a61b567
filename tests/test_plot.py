"""bits.png: per-layer bit-width over training drawn with Pillow."""
import os

import pytest
from PIL import Image

from gdnsq.plot import PALETTE, plot_bit_history


def _history(n_epochs=6, layers=("layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1")):
    return [{"epoch": e, "layers": {name: {"weight": 10 - e * (1.2 + 0.1 * i), "act": 10 - e * (1.0 + 0.2 * i)}
                                    for i, name in enumerate(layers)}}
            for e in range(1, n_epochs + 1)]


def _colour_pixels(img, colour):
    return img.getcolors(maxcolors=1 << 22) and sum(c for c, rgb in img.getcolors(maxcolors=1 << 22) if rgb == colour)


def test_png_size_content_and_one_colour_per_layer(tmp_path):
    path = str(tmp_path / "bits.png")
    assert plot_bit_history(_history(), path, targets={"weight": 2, "act": 2}) == path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1400, 900)
        rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 22)
    white = sum(c for c, v in colours if v == (255, 255, 255))
    assert white < 0.97 * 1400 * 900  # not blank
    assert sum(c for c, v in colours if v == (0, 0, 0)) > 2000  # axes, ticks, labels, target
    for i in range(3):  # each layer's line (and legend swatch) is drawn in its own colour
        assert _colour_pixels(rgb, PALETTE[i]) > 500, i
    assert not _colour_pixels(rgb, PALETTE[3])  # no fourth layer
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_lines_go_down_with_the_bits(tmp_path):
    """The first layer's colour sits higher (smaller y) at the left than at the right in the
    weight panel: the plot follows the data."""
    path = str(tmp_path / "bits.png")
    plot_bit_history(_history(layers=("only",)), path, size=(800, 600))
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    px = rgb.load()
    ys_left = [y for y in range(h // 2) for x in range(90, 110) if px[x, y] == PALETTE[0]]
    ys_right = [y for y in range(h // 2) for x in range(w - 260, w - 240) if px[x, y] == PALETTE[0]]
    assert ys_left and ys_right and min(ys_left) < min(ys_right)


def test_single_epoch_missing_act_and_per_layer_targets(tmp_path):
    hist = [{"epoch": 1, "layers": {"a": {"weight": 3.0, "act": None}, "b": {"weight": 2.5, "act": 2.0}}}]
    path = str(tmp_path / "one.png")
    plot_bit_history(hist, path, targets={"weight": {"a": 2.0, "b": 3.0}, "act": None})
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    assert _colour_pixels(rgb, PALETTE[0]) > 20 and _colour_pixels(rgb, PALETTE[1]) > 20


def test_empty_history_still_draws_axes(tmp_path):
    path = str(tmp_path / "empty.png")
    plot_bit_history([], path)
    with Image.open(path) as img:
        assert img.size == (1400, 900)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="history"):
        plot_bit_history({"epoch": 1}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="size"):
        plot_bit_history([], str(tmp_path / "x.png"), size=(10, 10))
