"""Loader of the fused deploy runtime (``csrc/deploy_runtime.cpp``), one build per ISA.

The instruction set is chosen at build time: ``avx512vnni`` (``avx512`` + AVX-512BW/VNNI: the
``bytes`` conv format runs ``vpdpbusd`` on uint8 activation codes x int8 weight codes),
``avx512`` (AVX-512F/DQ + VPOPCNTDQ: vector popcounts and a 16-channel vector epilogue,
when /proc/cpuinfo lists them; its ``bytes`` convs use plain compiler-vectorized loops), ``avx2`` (AVX2 + FMA + scalar ``popcnt``) or ``scalar`` (plain
x86-64 / any other CPU). ``load_extension()`` picks the best one the CPU has;
``load_extension(isa)`` forces one (tests build every ISA the CPU can run), and the environment
variable ``GDNSQ_DEPLOY_ISA`` forces it for the whole process. Every build uses
``-ffp-contract=off`` so that the float64 epilogue is not contracted into FMAs (its result
must equal ``gdnsq_kernels.binary``' epilogue bit for bit).
"""
from __future__ import annotations

import os
import platform
import threading

from ._build import Extension, build_spec
from ._build import cpu_flags as _cpu_flags

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "deploy_runtime.cpp")
_lock = threading.Lock()
_extensions: dict = {}  # isa -> Extension
# What runs without the runtime: nothing in this package (RuntimeModel raises the build error).
RUNTIME_FALLBACK = "no runtime (the frozen model still runs without RuntimeModel)"

ISAS = ("avx512vnni", "avx512", "avx2", "scalar")
_ISA_FLAGS = {
    "avx512vnni": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vnni", "-mavx512vpopcntdq", "-mavx2", "-mfma",
                   "-mpopcnt"],
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vpopcntdq", "-mavx2", "-mfma", "-mpopcnt"],
    "avx2": ["-mavx2", "-mfma", "-mpopcnt"],
    "scalar": [],
}


def supported_isas() -> tuple:
    """The ISAs this CPU can run, best first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ("scalar",)
    cpu = _cpu_flags()
    out = []
    if {"avx512f", "avx512dq", "avx512bw", "avx512_vnni", "avx512_vpopcntdq", "avx2", "fma", "popcnt"} <= cpu:
        out.append("avx512vnni")
    if {"avx512f", "avx512dq", "avx512_vpopcntdq", "avx2", "fma", "popcnt"} <= cpu:
        out.append("avx512")
    if {"avx2", "fma", "popcnt"} <= cpu:
        out.append("avx2")
    out.append("scalar")
    return tuple(out)


def has_vnni(isa: str) -> bool:
    """Whether the ``isa`` build runs the bytes conv format with ``vpdpbusd``."""
    return isa == "avx512vnni"


def default_isa() -> str:
    forced = os.environ.get("GDNSQ_DEPLOY_ISA")
    if forced:
        if forced not in ISAS:
            raise ValueError(f"GDNSQ_DEPLOY_ISA must be one of {ISAS}, got {forced!r}")
        return forced
    return supported_isas()[0]


def _extension(isa: str) -> Extension:
    """The ``Extension`` of the ``isa`` build (created on first use; one per ISA)."""
    with _lock:
        if isa not in _extensions:
            flags = ["-O3", "-fopenmp", "-ffp-contract=off"] + _ISA_FLAGS[isa]
            _extensions[isa] = Extension(f"the C++ deploy runtime ({isa})", RUNTIME_FALLBACK,
                                         lambda: build_spec(f"gdnsq_deploy_rt_{isa}", _SOURCE, flags))
        return _extensions[isa]


def load_extension(isa: str | None = None):
    """Build (first call) or load the runtime extension for ``isa`` (default: best available),
    under the cross-process build lock (``gdnsq_kernels._build``); raises on failure."""
    isa = isa or default_isa()
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa not in supported_isas():
        raise ValueError(f"isa {isa!r} is not supported by this CPU (supported: {supported_isas()})")
    return _extension(isa).load()


def describe(isa: str | None = None) -> tuple:
    """(True: loaded / False: failed / None: not tried yet, the reason) of the ``isa`` build."""
    return _extension(isa or default_isa()).describe()
