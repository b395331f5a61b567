"""Every Triton kernel compiled for sm_90 (no GPU needed), checked in its PTX.

The interpreter tests check the kernels' arithmetic with NumPy; what the GPU compiler makes of
it only shows here: an ``exp2`` lowered to ``ex2.approx`` (2 ulp, flushed denormals), ``a + b*c``
contracted to one ``fma`` where the reference rounds twice, a popcount that is not the hardware
``popc``, a dot that does not reach the tensor cores. ``tests/_sm90_compile.py`` runs the real
host wrappers with launches *recorded* (same kernels, argument types, constexprs and options
as on a GPU) and compiles each record with the installed Triton; it runs once per module in a
subprocess, because the kernels must be defined with TRITON_INTERPRET unset.
"""
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_sm90_compile.py"


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """(index list, out dir) of the compiled kernels; skips if Triton cannot compile for CUDA."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    out = tmp_path_factory.mktemp("sm90_ptx")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns while it is unset
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--fusion-control"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3 and "cannot_compile" in proc.stdout:
        pytest.skip(f"this Triton install cannot compile for CUDA: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "index.json").read_text()), out


def _ptx(sm90, label_prefix, kernel):
    index, out = sm90
    got = [(e, (out / e["file"]).read_text()) for e in index
           if e["label"].startswith(label_prefix) and e["kernel"] == kernel]
    assert got, f"no compiled {kernel} for {label_prefix}"
    return got


# Instructions that must not appear where the docstrings promise bit-equal results.
APPROX_EXP2 = re.compile(r"\bex2\.approx")
FLOAT_FMA = re.compile(r"\b(fma|mad)\.rn[a-z.]*\.f(32|64)\b")

QUANT_KERNELS = [
    ("act_fwd", "_act_fwd_kernel"),
    ("act_bwd", "_act_bwd_kernel"),
    ("w_fwd", "_w_fwd_kernel"),
    ("w_bwd", "_w_bwd_kernel"),
]


@pytest.mark.parametrize("dtype", ["f32", "f16", "f64"])
@pytest.mark.parametrize("label,kernel", QUANT_KERNELS, ids=[f"sm90-{k}" for _, k in QUANT_KERNELS])
def test_sm90_quantizer_kernel_is_exact(sm90, label, kernel, dtype):
    for entry, ptx in _ptx(sm90, f"{label}_{dtype}", kernel):
        assert entry["options"].get("enable_fp_fusion") is False, entry
        assert not APPROX_EXP2.search(ptx), f"{kernel}: approximate exp2 in the PTX"
        fma = FLOAT_FMA.search(ptx)
        assert fma is None, f"{kernel}: {fma.group(0)} where the reference rounds twice"
        if kernel in ("_act_fwd_kernel", "_w_fwd_kernel", "_w_bwd_kernel"):
            # the division is the correctly rounded one (an approximate div breaks codes)
            width = "f64" if dtype == "f64" else "f32"
            assert re.search(rf"\bdiv\.rn\.{width}\b", ptx), f"{kernel}: no div.rn.{width}"
            assert not re.search(r"\bdiv\.(approx|full)\.", ptx), kernel


@pytest.mark.parametrize("label,kernel", [("act_bwd_cl", "_act_bwd_kernel"), ("w_fwd_cl", "_w_fwd_kernel"),
                                          ("w_bwd_cl", "_w_bwd_kernel")])
def test_sm90_channels_last_variants_are_exact(sm90, label, kernel):
    """The channels_last variants (memory-order reads, NCHW dither index) are exact too."""
    for dtype in ("f32", "f16", "f64"):
        for entry, ptx in _ptx(sm90, f"{label}_{dtype}", kernel):
            assert entry["constexprs"].get("CHANNELS_LAST", "True") == "True", entry
            assert entry["options"].get("enable_fp_fusion") is False, entry
            fma = FLOAT_FMA.search(ptx)
            assert fma is None, f"{kernel} ({label}): {fma.group(0)}"


def test_sm90_activation_backward_is_one_launch_with_ordered_finish(sm90):
    """One launch per backward; the last-ticket reduction is an acq_rel GPU-scope atomic and
    reads the other programs' partials from L2 (ld.global.cg), not a possibly stale L1."""
    index, _ = sm90
    for dtype in ("f32", "f16", "f64"):
        assert [e["kernel"] for e in index if e["label"] == f"act_bwd_{dtype}"] == ["_act_bwd_kernel"]
    for _, ptx in _ptx(sm90, "act_bwd_f32", "_act_bwd_kernel"):
        atom = re.search(r"\batom\.[a-z.]*acq_rel[a-z0-9.]*\.add\b", ptx)
        assert atom and ".gpu." in atom.group(0), "no acq_rel gpu-scope atomic add"
        assert re.search(r"\bld\.global\.cg", ptx), "partials not read with .cg"


def test_sm90_every_autotune_config_is_compiled(sm90):
    """The autotuned forwards are compiled once per config (each then checked above); the
    reducing backwards run one pinned config (num_warps fixed: deterministic sums)."""
    from gdnsq_kernels.quantize import triton_quantize as TQ

    index, _ = sm90
    for label, kernel, configs in [("act_fwd_f32", "_act_fwd_kernel", TQ.ACT_FWD_CONFIGS),
                                   ("w_fwd_f32", "_w_fwd_kernel", TQ.W_FWD_CONFIGS)]:
        got = [e for e in index if e["label"] == label and e["kernel"] == kernel]
        assert sorted(int(e["constexprs"]["BLOCK"]) for e in got) == sorted(c.kwargs["BLOCK"] for c in configs)
        assert sorted(e["options"]["num_warps"] for e in got) == sorted(c.num_warps for c in configs)
    for label in ("act_bwd_f32", "w_bwd_f32"):
        got = [e for e in index if e["label"] == label]
        assert len(got) == 1 and got[0]["n_configs"] == 0
        assert got[0]["options"]["num_warps"] == TQ.REDUCE_WARPS


def test_sm90_fma_check_sees_a_contraction(sm90):
    """Control: the same activation forward compiled *with* fp fusion does contain fma, so the
    check above would catch a launch that forgot ``enable_fp_fusion=False``."""
    (entry, ptx), = _ptx(sm90, "control_act_fwd_fused", "_act_fwd_kernel")
    assert entry["options"]["enable_fp_fusion"] is True
    assert FLOAT_FMA.search(ptx)


@pytest.mark.parametrize("M", [1, 8])
@pytest.mark.parametrize("form", ["xnor", "and"])
def test_sm90_popcount_kernel_uses_popc(sm90, M, form):
    (entry, ptx), = _ptx(sm90, f"gemm_M{M}_{form}", "_packed_gemm_kernel")
    assert entry["constexprs"]["HW_POPC"] == "True"
    assert "popc.b32" in ptx


@pytest.mark.parametrize("form", ["xnor", "and"])
def test_sm90_bits_dot_kernel_uses_int8_tensor_cores(sm90, form):
    """M = 256 takes the tensor-core path: an int8 x int8 -> int32 (w)gmma in the PTX."""
    (entry, ptx), = _ptx(sm90, f"gemm_M256_{form}", "_bits_dot_kernel")
    assert re.search(r"\b(wgmma\.mma_async|mma\.sync)\.[a-z0-9.]*\.s32\.s8\.s8\b", ptx), \
        "no int8 mma/wgmma instruction"
    assert "popc" not in ptx


def test_sm90_every_kernel_is_compiled(sm90):
    """Each @triton.jit *_kernel of the kernel modules was reached by a recorded launch."""
    import importlib

    env_interp = os.environ.get("TRITON_INTERPRET")
    names = set()
    for mod in ("gdnsq_kernels.quantize.triton_quantize", "gdnsq_kernels.binary.triton_xnor"):
        src = inspect.getsource(importlib.import_module(mod))
        names |= set(re.findall(r"^def (_\w+_kernel)\(", src, flags=re.M))
    compiled = {e["kernel"] for e in sm90[0]}
    assert names and names <= compiled, (names - compiled, env_interp)


def test_sm90_grids_fit_cuda_limits(sm90):
    """Axes 1 and 2 of a CUDA grid are capped at 65,535 blocks: every launch is 1-D."""
    for entry in sm90[0]:
        if "grid" in entry:
            assert len(entry["grid"]) == 1, entry
