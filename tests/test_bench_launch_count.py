"""benchmarks/bench_qat_step.py's launch count: on CPU it counts the gdnsq:: op calls of a step
(checked here against what one fused quantized conv does by construction)."""
from __future__ import annotations

import importlib.util
import pathlib

import torch
from torch import nn

from gdnsq.convert import quantize_model

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qat_step.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_qat_step", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_launch_count_is_the_op_calls_of_a_step():
    bench = _bench()
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten())
    model = quantize_model(fp, weight_bits=2, act_bits=2, keep_first=False, keep_last=False)
    x = torch.randn(2, 3, 8, 8)

    def step():
        model(x).square().sum().backward()

    counts = bench.count_launches(step, torch.device("cpu"))
    assert counts["kind"] == "cpu_op_calls"
    # per quantized conv: the fused op only; in eager mode it calls the quantizer kernels
    # (forward, recomputed input, backwards) directly, not through nested gdnsq:: ops
    assert counts["gdnsq_ops"] == {"gdnsq::qconv2d": 2}
    assert counts["gdnsq_op_calls"] == 2 and counts["aten_op_calls"] > 0
    assert "2 gdnsq:: op calls" in bench.launches_text(counts)
