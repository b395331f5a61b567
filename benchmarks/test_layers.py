"""Microbenchmarks of whole-model inference: deployed (integer-code) layers vs the fake-quant
student they were frozen from, on ResNet-20 (random FP weights, quantizers set to exactly
``2**bits`` levels), batch 4, one group per bit-width.

Providers: ``fake-quant`` (the trained student in eval mode), ``deployed <path>`` (gdnsq.deploy.freeze
with every layer forced onto one GEMM path: int, bitplane, float; binary for W1A1), ``fp32``
(the FP model, for scale).
"""
import functools

import pytest
import torch

from check_deploy_equality import set_bits
from gdnsq.calibrate import calibrate
from gdnsq.convert import quantize_model
from gdnsq.deploy import freeze
from gdnsq.models import get_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 4
CASES = {2: ("fp32", "fake-quant", "deployed int", "deployed bitplane", "deployed float"),
         1: ("fp32", "fake-quant", "deployed binary", "deployed float")}


@functools.lru_cache(maxsize=None)
def _models(bits: int) -> dict:
    torch.manual_seed(0)
    fp = get_model("resnet20", 10).to(DEVICE).eval()
    calib = torch.randn(32, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        q = quantize_model(fp, bits, bits).to(DEVICE)
        calibrate(q, [calib], device=DEVICE)
        set_bits(q, calib, bits)
        q.eval()
        models = {"fp32": fp, "fake-quant": q}
        for name in CASES[bits]:
            if name.startswith("deployed"):
                models[name] = freeze(q, path=name.split()[1])
    return models


@pytest.mark.parametrize("bits,provider", [(b, p) for b, names in CASES.items() for p in names])
def test_resnet20_inference(benchmark, bits, provider):
    benchmark.group = f"resnet20 W{bits}A{bits} inference batch {BATCH}"
    model = _models(bits)[provider]
    x = torch.randn(BATCH, 3, 32, 32, device=DEVICE)

    @torch.no_grad()
    def run():
        out = model(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(run)
    assert out.shape == (BATCH, 10) and torch.isfinite(out).all()
