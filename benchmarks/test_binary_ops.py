"""Microbenchmarks of the bit-packed ops against float32 on the same shapes, one group per op.

* ``packed GEMM``: ``xnor_gemm`` of 32-bit packed +-1 matrices vs a float32 matmul of the same
  logical size (M x K) @ (K x N).
* ``binary conv``: ``binary_conv2d`` of 0/1 activation codes with packed weights (the W1A1
  layer, epilogue included) vs ``F.conv2d`` in float32 (ResNet-20's first stage, batch 4).
"""
import pytest
import torch
import torch.nn.functional as F

from gdnsq_kernels import pack_bits, xnor_gemm
from gdnsq_kernels.binary import binary_conv2d, pack_conv_weight

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
M, K, N = 64, 1024, 256
CONV = dict(batch=4, channels=16, out=16, size=32)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", ["packed xnor_gemm", "fp32 matmul"])
def test_gemm(benchmark, provider):
    benchmark.group = f"gemm {M}x{K} @ {K}x{N}"
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (M, K), generator=g, dtype=torch.uint8).to(DEVICE)
    b = torch.randint(0, 2, (N, K), generator=g, dtype=torch.uint8).to(DEVICE)
    if provider == "packed xnor_gemm":
        ap, bp = pack_bits(a), pack_bits(b)
        fn = lambda: xnor_gemm(ap, bp, K)  # noqa: E731
    else:
        af, bt = (2.0 * a.float() - 1), (2.0 * b.float() - 1).t().contiguous()
        fn = lambda: af @ bt  # noqa: E731

    def run():
        out = fn()
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == (M, N)


@pytest.mark.parametrize("provider", ["packed binary_conv2d", "fp32 conv2d"])
def test_conv(benchmark, provider):
    n, c, o, h = CONV["batch"], CONV["channels"], CONV["out"], CONV["size"]
    benchmark.group = f"conv3x3 {c}->{o} {h}x{h} batch {n}"
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (n, c, h, h), generator=g, dtype=torch.uint8).to(DEVICE)
    k = torch.randint(0, 2, (o, c, 3, 3), generator=g, dtype=torch.uint8).to(DEVICE)
    if provider == "packed binary_conv2d":
        wq = pack_conv_weight(k, torch.rand(o, generator=g).to(DEVICE) * 0.1,
                              -torch.rand(o, generator=g).to(DEVICE) * 0.05)
        fn = lambda: binary_conv2d(codes, 0.5, 0.0, wq, padding=1)  # noqa: E731
    else:
        x, w = codes.float(), k.float()
        fn = lambda: F.conv2d(x, w, padding=1)  # noqa: E731

    def run():
        out = fn()
        _sync()
        return out

    out = benchmark(run)
    assert out.shape == (n, o, h, h)
