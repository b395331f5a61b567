"""The ``cpu`` backend: fused C++ kernels (``csrc/quantize_cpu.cpp``) built on first use.

The extension is compiled with ``torch.utils.cpp_extension.load`` (ninja, -O3, OpenMP through
``at::parallel_for``, AVX2 when the CPU has it, no FP contraction so the forward matches the
reference exactly) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``, folder ``gdnsq_quantize_cpu_<hash of source and flags>``);
later processes load the cached build in well under a second.
If the compiler or ninja is missing or the build fails, ``implementation()`` warns with the
cause and returns the eager ``torch`` backend instead (a transient failure, such as running out
of memory, is retried a minute later; ``gdnsq_kernels._build``), unless ``GDNSQ_REQUIRE_CPP=1``
(the test suite sets it, so that a failed build fails the tests instead of testing the torch
path twice): then the build error is raised. Builds hold a cross-process file lock
(``gdnsq_kernels._build.build_lock``).

Each op is one pass over the data forward and one backward (the activation backward writes
``dx`` and reduces the three parameter sums in the same loop); only ``ln2*s`` scaling of the
O(1)/O(C_out) sums happens in Python. With AVX-512 the float32 / bfloat16 activation forward and
backward (gradient in the input's dtype) run hand-vectorised loops (vrndscaleps rounding, native
bf16 loads and stores, the sums in registers) that give the generic loops' values.

channels_last 4-D inputs (activations, and conv weights of a channels_last model) are not
copied: the kernels get the row-major NHWC view of their memory (``nhwc_view``) and the
outputs are allocated channels_last; the backwards are told ``(C, H*W)`` so that the dither
index is still the NCHW index of each element (the same noise as for a contiguous tensor).
"""
from __future__ import annotations

import math
import os
import sys

import torch

from . import _checks
from .._build import BuildSpec, Extension, build_spec
from .._build import cpu_flags as _cpu_flags
from .._launch import is_channels_last, nhwc_view
from .dither import DITHER_MAGNITUDE, seed_key
from .reference import is_per_channel

LN2 = math.log(2.0)
_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "quantize_cpu.cpp")

# AVX-512 subsets the loops use (bf16/fp16 loads and selects need BW, the 32-bit hash DQ/VL).
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")


def _isa_flags() -> list[str]:
    """Vector ISA flags for this machine: the elementwise loops are GCC auto-vectorised, so the
    widest available vectors double their throughput (results are identical: no FP contraction,
    and the reductions' lane order is fixed in the source, not by the vector width)."""
    cpu = _cpu_flags()
    if "avx2" not in cpu:
        return []
    if all(f in cpu for f in _AVX512):
        # AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids): one instruction per bf16 store
        bf16 = ["-mavx512bf16"] if "avx512_bf16" in cpu else []
        return ["-mavx2"] + ["-m" + f for f in _AVX512] + bf16 + ["-mprefer-vector-width=512"]
    return ["-mavx2"]


def _build_spec() -> BuildSpec:
    # -fno-trapping-math lets GCC if-convert the clamp/select loops (it then vectorises them); it
    # changes no value. -ffp-contract=off keeps mul+add unfused, as in the reference.
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"] + _isa_flags()
    return build_spec("gdnsq_quantize_cpu", _SOURCE, flags)


#: The extension of this backend; ``EXTENSION.module`` is the loaded module (None before).
EXTENSION = Extension("the fused C++ CPU quantizer", "the eager 'torch' backend", _build_spec)


def load_extension():
    """Build (first call) or load the C++ extension; raises on failure."""
    return EXTENSION.load()


def implementation():
    """This module when the extension is loaded or builds now, else ``_torch_quantize`` (with a
    warning naming the cause; see ``gdnsq_kernels._build`` for when the build is retried)."""
    if EXTENSION.available():
        return sys.modules[__name__]
    from . import _torch_quantize

    return _torch_quantize


def _flat(t):
    """(t's memory as a row-major tensor, the kernels' (cl_channels, cl_pixels) arguments)."""
    if is_channels_last(t):
        return nhwc_view(t), (t.shape[1], t.shape[2] * t.shape[3])
    return t.contiguous(), (0, 0)


def activation_forward(x, log2_step, log2_range, offset):
    xd = x.detach()
    if is_channels_last(xd):  # elementwise: read and write in memory order
        y = torch.empty_like(xd, memory_format=torch.channels_last)
        EXTENSION.module.act_forward(nhwc_view(xd), nhwc_view(y), log2_step.detach(),
                                     log2_range.detach(), offset.detach())
        return y
    xc = xd.contiguous()
    y = torch.empty_like(xc)  # allocated here so that tests can poison it
    EXTENSION.module.act_forward(xc, y, log2_step.detach(), log2_range.detach(), offset.detach())
    return y


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither,
                        need_grad_x=True, need_grad_params=True):
    xd = x.detach()
    fmt = torch.channels_last if is_channels_last(xd) else torch.contiguous_format
    # grad_y in x's layout (a copy only when its layout or dtype differs)
    g = grad_y.detach().to(_checks.kernel_grad_dtype(grad_y.dtype, x.dtype)).contiguous(memory_format=fmt)
    dx = torch.empty_like(xd, memory_format=fmt) if need_grad_x else None
    xf, cl = _flat(xd)
    gf = nhwc_view(g) if cl[0] else g
    dxf = (nhwc_view(dx) if cl[0] else dx) if need_grad_x else xf
    sums = EXTENSION.module.act_backward(gf, xf, dxf, log2_step.detach(),
                                         log2_range.detach(), offset.detach(),
                                         seed_key(seed), bool(dither), bool(need_grad_x),
                                         bool(need_grad_params), DITHER_MAGNITUDE, *cl)
    if not need_grad_params:
        return dx, None, None, None
    ct = _checks.compute_dtype(x.dtype)
    s = torch.exp2(log2_step.detach().to(ct).reshape(())).double()
    q = torch.exp2(log2_range.detach().to(ct).reshape(())).double()
    return dx, (LN2 * s * sums[0]).to(ct), (LN2 * q * sums[1]).to(ct), sums[2].to(ct)


def weight_forward(w, log2_step):
    c_out = w.shape[0]
    wd = w.detach()
    z = torch.empty(c_out, dtype=_checks.compute_dtype(w.dtype))
    if is_channels_last(wd):  # each output channel's row is still one block of memory
        y = torch.empty_like(wd, memory_format=torch.channels_last)
        EXTENSION.module.w_forward(nhwc_view(wd).reshape(c_out, -1), nhwc_view(y).reshape(c_out, -1),
                                   z, log2_step.detach())
        return y, z
    w2 = wd.contiguous().reshape(c_out, -1)
    y = torch.empty_like(w2)
    EXTENSION.module.w_forward(w2, y, z, log2_step.detach())
    return y.reshape(w.shape), z


def weight_backward(grad_w_hat, w, log2_step, zero_point, seed, dither,
                    need_grad_w=True, need_grad_step=True):
    grad_w = grad_w_hat if need_grad_w else None
    if not need_grad_step:
        return grad_w, None
    c_out = w.shape[0]
    ct = _checks.compute_dtype(w.dtype)
    wd = w.detach()
    fmt = torch.channels_last if is_channels_last(wd) else torch.contiguous_format
    g = grad_w_hat.detach().to(_checks.kernel_grad_dtype(grad_w_hat.dtype, w.dtype)).contiguous(memory_format=fmt)
    wf, cl = _flat(wd)
    gf = nhwc_view(g) if cl[0] else g
    sums = EXTENSION.module.w_backward(gf.reshape(c_out, -1), wf.reshape(c_out, -1),
                                       log2_step.detach(), zero_point.detach(), seed_key(seed),
                                       bool(dither), DITHER_MAGNITUDE, *cl)
    s = torch.exp2(log2_step.detach().to(ct).reshape(-1)).double()
    if is_per_channel(log2_step, c_out):
        grad = LN2 * s * sums
    else:
        grad = LN2 * s.reshape(()) * sums.sum()
    return grad_w, grad.to(ct).reshape(log2_step.shape)
