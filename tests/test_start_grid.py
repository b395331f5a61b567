"""The start of a run: ``calibrate(bits=, grid=)`` and the ``start_bits`` / ``start_grid`` config."""
import math

import pytest
import torch
from torch import nn

import gdnsq
from gdnsq.calibrate import mse_span
from gdnsq.train.presets import TrainConfig


def _quant_err(x, lo, span, levels):
    step = span / levels
    q = torch.round((x.clamp(lo, lo + span) - lo) / step) * step + lo
    return float(((x - q) ** 2).mean())


def test_mse_span_beats_minmax_on_heavy_tails_and_keeps_uniform_data_whole():
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(20000, generator=g).abs() ** 3  # a few huge values
    lo, span = 0.0, float(heavy.max())
    chosen = mse_span(heavy, lo, span, 3.0)
    assert chosen < 0.5 * span
    assert _quant_err(heavy, lo, chosen, 3.0) < 0.5 * _quant_err(heavy, lo, span, 3.0)
    # brute force over a finer grid: nothing much better exists
    best = min(_quant_err(heavy, lo, span * i / 1000, 3.0) for i in range(1, 1001))
    assert _quant_err(heavy, lo, chosen, 3.0) <= best * 1.05
    uniform = torch.rand(20000, generator=g)
    # uniform data: at 3 bits (7 steps) the whole range is (nearly) optimal
    assert mse_span(uniform, 0.0, float(uniform.max()), 7.0) > 0.9 * float(uniform.max())


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize("grid", ["minmax", "mse"])
def test_calibrate_start_bits_and_grid(grid):
    torch.manual_seed(0)
    q = gdnsq.quantize_model(_Net(), 2, 2)
    x = torch.randn(16, 3, 8, 8)
    x[0, 0, 0, 0] = 40.0  # an outlier the MSE clamp should cut
    report = gdnsq.calibrate(q, [x], bits=4, grid=grid)
    aq = q.b.act_quantizer
    bits = float(aq.log2_range - aq.log2_step)
    assert bits == pytest.approx(4.0)
    top = float(aq.offset) + 2.0 ** float(aq.log2_range) - 2.0 ** float(aq.log2_step)
    if grid == "minmax":
        assert top == pytest.approx(report["b"]["max"], rel=1e-5)
    else:
        assert top < report["b"]["max"]


def test_calibrate_rejects_unknown_grid():
    q = gdnsq.quantize_model(_Net(), 2, 2)
    with pytest.raises(ValueError, match="grid"):
        gdnsq.calibrate(q, [torch.randn(2, 3, 8, 8)], grid="percentile")


def test_train_config_start_fields():
    assert TrainConfig().start_bits == 10.0 and TrainConfig().start_grid == "minmax"
    with pytest.raises(ValueError, match="start_grid"):
        TrainConfig(start_grid="x")
    with pytest.raises(ValueError, match="start_bits"):
        TrainConfig(start_bits=0)


def test_cli_start_flags_reach_the_config():
    from gdnsq import cli

    args = cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x",
                                          "--start-bits", "4", "--start-grid", "mse"])
    cfg, src = cli.quantize.resolve_train_config(args)
    assert cfg.start_bits == 4.0 and cfg.start_grid == "mse"
    assert src["flags"]["start_bits"] == 4.0
    args = cli.build_parser().parse_args(["quantize", "--weight-bits", "2", "--act-bits", "2", "--out", "x"])
    cfg, _ = cli.quantize.resolve_train_config(args)
    assert cfg.start_bits == 10.0 and cfg.start_grid == "minmax"


def test_a_checkpoint_predating_a_config_field_resumes_without_a_change_warning():
    from gdnsq.train.checkpoint import config_changes

    new = TrainConfig().to_dict()
    old = {k: v for k, v in new.items() if k not in ("start_bits", "start_grid")}
    assert config_changes(old, new) == []
    assert config_changes(old, dict(new, start_bits=4.0)) == ["start_bits"]
