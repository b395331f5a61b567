"""``precision="auto"``: bf16 autocast only where the hardware runs bf16 natively.

On a CPU without native bf16 (an AVX-512 Xeon lacking ``avx512_bf16`` and ``amx_bf16``) oneDNN
emulates it, and a bf16 + channels_last ResNet-20 training step measured 2x *slower* than fp32;
with native support it measured 2.3x faster (``benchmarks/bench_qat_step.py``). So ``auto``
resolves to:

* CUDA: ``bf16`` when ``torch.cuda.is_bf16_supported()`` (compute capability >= 8.0), else fp32;
* CPU with ``/proc/cpuinfo`` flags: ``bf16`` when ``avx512_bf16`` or ``amx_bf16`` is listed, else
  ``fp32``;
* a CPU whose flags cannot be read (not Linux): a quick measurement, a 128-channel 3x3
  convolution timed in both precisions; ``bf16`` only when it is at least 1.2x faster;
* anything else: ``fp32``.

The result and the reason are recorded in the trainer's report (``precision``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple

import torch

__all__ = ["resolve_precision", "measure_bf16_speedup", "NATIVE_BF16_CPU_FLAGS"]

#: /proc/cpuinfo flags of CPUs that execute bf16 dot products natively
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

#: bf16 must beat fp32 by this factor in the fallback measurement to be chosen
_MEASURED_SPEEDUP_NEEDED = 1.2


def measure_bf16_speedup(repeats: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """fp32 time / bf16-autocast time of a (8, 128, 16, 16) x (128, 128, 3, 3) convolution on
    the CPU, best of ``repeats`` each (a ratio above 1 means bf16 is faster)."""
    gen = torch.Generator().manual_seed(0)  # not the global generator: a Trainer touches none
    x = torch.randn(8, 128, 16, 16, generator=gen)
    w = torch.randn(128, 128, 3, 3, generator=gen)

    def best(bf16: bool) -> float:
        times = []
        for _ in range(repeats + 1):  # the first call warms up oneDNN's kernel choice
            t0 = clock()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                torch.nn.functional.conv2d(x, w, padding=1)
            times.append(clock() - t0)
        return min(times[1:])

    return best(False) / max(best(True), 1e-12)


def resolve_precision(requested: str, device: torch.device, *,
                      cpu_flags: Optional[set] = None,
                      measure: Callable[[], float] = measure_bf16_speedup) -> Tuple[str, str]:
    """The precision a run uses for ``requested`` ("fp32", "bf16" or "auto") on ``device``.

    Returns ``(precision, reason)`` with precision "fp32" or "bf16". ``cpu_flags`` defaults to
    the flags of ``/proc/cpuinfo`` (an empty set where there is none); ``measure`` returns the
    bf16 speed-up used when the flags are unknown (injectable for tests)."""
    if requested in ("fp32", "bf16"):
        return requested, "requested"
    if requested != "auto":
        raise ValueError(f"precision: expected 'fp32', 'bf16' or 'auto', got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16 natively"
        return "fp32", "auto: the GPU has no native bf16"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    if cpu_flags is None:
        from gdnsq_kernels._build import cpu_flags as read_flags
        cpu_flags = read_flags()
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in cpu_flags]
    if native:
        return "bf16", f"auto: the CPU runs bf16 natively ({', '.join(native)})"
    if cpu_flags:
        return "fp32", f"auto: the CPU lacks {' and '.join(NATIVE_BF16_CPU_FLAGS)} (bf16 would be emulated)"
    speedup = measure()
    if speedup >= _MEASURED_SPEEDUP_NEEDED:
        return "bf16", f"auto: CPU flags unknown; bf16 measured {speedup:.2f}x faster than fp32"
    return "fp32", f"auto: CPU flags unknown; bf16 measured {speedup:.2f}x the fp32 speed"
