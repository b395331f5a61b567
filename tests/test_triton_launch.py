"""Launch-level defects of the Triton kernels that only a GPU used to show, pinned on CPU.

Exact codes (``s = 2**a`` computed as the reference computes it), per-channel steps given as
strided or expanded views, the float64 dither constant, the one launch helper (device guard,
contiguity), the GEMM's compile-error-only fallback and the TRITON_INTERPRET parsing.
"""
import contextlib
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from gdnsq_kernels import _launch, quantize as Q
from gdnsq_kernels.quantize import reference as R
from gdnsq_kernels.backend import triton_interpreter_enabled
from gdnsq_kernels.quantize.dither import DITHER_MAGNITUDE

CUDA = torch.cuda.is_available()
INTERP = triton_interpreter_enabled()
TRITON_DEVICES = (["cpu"] if INTERP else []) + (["cuda"] if CUDA else [])


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_activation_codes_bit_equal_for_many_steps(device, poison_empty):
    """Non-integer log2 parameters, inputs on and next to the rounding ties: the Triton output
    equals the reference bit for bit (an ulp of s flips a tie; tl.exp2 is ex2.approx)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        a = torch.empty((), dtype=torch.float64).uniform_(-9, 1, generator=gen).float()
        g = a + torch.empty((), dtype=torch.float64).uniform_(1, 6, generator=gen).float()
        lo = torch.empty(()).uniform_(-2, 0, generator=gen)
        s = torch.exp2(a)
        k = torch.arange(0, 40, dtype=torch.float32)
        ties = lo + s * (k + 0.5)  # (nearly) halfway between two codes
        x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                       torch.randn(200, generator=gen) * 3]).to(device)
        y = Q.activation_forward(x, a.to(device), g.to(device), lo.to(device), backend="triton")
        yr = R.activation_forward(x, a.to(device), g.to(device), lo.to(device))
        assert torch.equal(y, yr), (float(a), float(g), float(lo))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_weight_codes_bit_equal_for_many_steps(device, poison_empty):
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(64, 50, generator=gen) * 0.3).to(device)
    step = torch.empty(64, dtype=torch.float64).uniform_(-8, -1, generator=gen).float().to(device)
    y, z = Q.weight_forward(w, step, backend="triton")
    yr, zr = R.weight_forward(w, step)
    assert torch.equal(y, yr) and torch.equal(z, zr)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("view", ["strided", "expanded", "sliced"])
def test_weight_step_views(device, view, poison_empty):
    """A per-channel log2_step given as a non-contiguous view: forward and step gradient equal
    the reference (the kernel once read ``step_ptr + c`` from the view's storage)."""
    c = 6
    w = torch.randn(c, 3, 3, 3, device=device) * 0.3
    if view == "strided":
        step = (-4.0 - torch.rand(c, 2, device=device) * 2)[:, 1]
    elif view == "expanded":
        step = torch.tensor(-4.3, device=device).expand(c)
    else:
        step = torch.linspace(-6.0, -3.0, 2 * c, device=device)[1::2]
    assert not step.is_contiguous() or view == "expanded"
    y, z = Q.weight_forward(w, step, backend="triton")
    yr, zr = R.weight_forward(w, step)
    assert torch.equal(y, yr)
    g = torch.randn_like(w)
    gs = Q.weight_backward(g, w, step, z, 9, True, backend="triton")[1]
    gs_r = R.weight_backward(g, w, step, zr, 9, True)[1]
    torch.testing.assert_close(gs, gs_r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_float64_dither_constant_is_float64(device):
    """Inputs on the grid (e = 0): d log2_step = ln2*s^2*sum(g*r) is a multiple of the dither
    magnitude, so an fp32-rounded constant shows as a 1.6e-9 relative error in float64."""
    s = 0.25
    k = torch.randint(0, 8, (3000,), device=device, dtype=torch.float64)
    x = -1.0 + s * k
    g = torch.ones_like(x)
    a, gm, b = (torch.tensor(v, dtype=torch.float64, device=device) for v in (-2.0, 1.0, -1.0))
    for seed in (0, 11):
        got = Q.activation_backward(g, x, a, gm, b, seed, True, backend="triton")[1]
        ref = R.activation_backward(g, x, a, gm, b, seed, True)[1]
        assert got.dtype == torch.float64
        assert abs(float(got) - float(ref)) <= 1e-13 * abs(float(ref)), (float(got), float(ref))
    w = (s * torch.randint(0, 8, (4, 500), device=device)).double()
    w[:, 0] = 0.0
    step = torch.full((4,), -2.0, dtype=torch.float64, device=device)
    zero = torch.zeros(4, dtype=torch.float64, device=device)
    got = Q.weight_backward(torch.ones_like(w), w, step, zero, 3, True, backend="triton")[1]
    ref = R.weight_backward(torch.ones_like(w), w, step, zero, 3, True)[1]
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    # the fp32-rounded magnitude is this far off: the tolerance above would see it
    mag32 = float(torch.tensor(DITHER_MAGNITUDE, dtype=torch.float32))
    assert abs(mag32 - DITHER_MAGNITUDE) / DITHER_MAGNITUDE > 1e-9


# ----------------------------------------------------------------------------- launch helper


class _FakeKernel:
    """Stands in for a JITFunction: records the current (patched) device at launch."""

    arg_names = ["x_ptr", "n", "BLOCK"]

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("launch", _current[-1] if _current else None, grid, kwargs))
        return run

    def warmup(self, *args, grid, **kwargs):
        self.log.append(("warmup", _current[-1] if _current else None, grid, kwargs))


_current = []


class _FakeCudaTensor:
    """Enough of a tensor on cuda:1 for ``launch`` (never dereferenced)."""

    def __init__(self, index=1, contiguous=True):
        self.device = torch.device("cuda", index)
        self._contig = contiguous
        self.shape, self.dtype = (4,), torch.float32

    def is_contiguous(self):
        return self._contig

    def stride(self):
        return (2,)

    def data_ptr(self):  # what Triton (and _launch) take a pointer argument by
        return 0


@pytest.fixture
def fake_cuda(monkeypatch):
    @contextlib.contextmanager
    def device(d):
        _current.append(torch.device(d))
        try:
            yield
        finally:
            _current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    yield
    _current.clear()


def test_launch_runs_under_the_tensors_device(fake_cuda):
    log = []
    _launch.launch(_FakeKernel(log), (3,), _FakeCudaTensor(1), 4, exact=True, BLOCK=8)
    (kind, dev, grid, kwargs), = log
    assert kind == "launch" and dev == torch.device("cuda", 1) and grid == (3,)
    assert kwargs == {"BLOCK": 8, "enable_fp_fusion": False}
    _launch.launch(_FakeKernel(log), (3,), _FakeCudaTensor(0), 4, compile_only=True, BLOCK=8)
    assert log[-1][:2] == ("warmup", torch.device("cuda", 0))


def test_launch_rejects_strided_and_mixed_device_arguments(fake_cuda):
    with pytest.raises(RuntimeError, match="non-contiguous"):
        _launch.launch(_FakeKernel([]), (1,), _FakeCudaTensor(1, contiguous=False), 4, BLOCK=8)
    with pytest.raises(RuntimeError, match="cuda:1 and cuda:0"):
        _launch.launch(_FakeKernel([]), (1,), _FakeCudaTensor(1), _FakeCudaTensor(0), BLOCK=8)


def test_every_kernel_launch_goes_through_the_helper():
    """No module launches a kernel itself (``name[grid](...)``): the guard is in one place."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "gdnsq_kernels"
    for path in root.glob("*.py"):
        if path.name == "_launch.py":
            continue
        src = path.read_text()
        assert not re.search(r"_kernel\[[^\]]*\]\(", src), f"direct kernel launch in {path.name}"


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_second_device_quantizes_correctly():
    x = torch.randn(5000, device="cuda:1")
    p = [torch.tensor(v, device="cuda:1") for v in (-3.0, 1.0, -1.0)]
    with torch.cuda.device(0):
        y = Q.activation_forward(x, *p, backend="triton")
    assert torch.equal(y, R.activation_forward(x, *p))


# ----------------------------------------------------------------------------- GEMM fallback


def _gemm_args():
    from gdnsq_kernels.binary.bitpack import pack_bits

    a = pack_bits(torch.randint(0, 2, (2, 40)))
    return a, a.clone()


def test_gemm_falls_back_on_a_compilation_error_only(monkeypatch):
    """A failed compile of the inline-PTX popcount falls back to SWAR (with a warning naming the
    cause) for that target and configuration only; a launch error (illegal address, ...)
    propagates and is never retried."""
    from triton.compiler.errors import CompilationError

    from gdnsq_kernels.binary import triton_xnor as TX

    calls = []
    state = {"launch_error": False, "target": (8, 0)}

    def fake_launch(kernel, grid, *args, compile_only=False, **meta):
        calls.append((compile_only, meta.get("HW_POPC")))
        if compile_only:
            raise CompilationError("popc", None, "inline asm rejected")
        if state["launch_error"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TX, "launch", fake_launch)
    monkeypatch.setattr(TX, "_hw_popcount_available", lambda t: True)
    monkeypatch.setattr(TX, "_compile_target", lambda t: state["target"])
    monkeypatch.setattr(TX, "HW_POPCOUNT_FAILURES", {})
    a, b = _gemm_args()
    with pytest.warns(RuntimeWarning, match="hardware popcount .* failed to compile for \\(8, 0\\) "
                                            "\\(CompilationError: .*inline asm rejected"):
        TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    assert calls == [(True, True), (False, False)]
    calls.clear()
    state["launch_error"] = True
    with pytest.raises(RuntimeError, match="illegal memory access"):
        TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    assert calls == [(False, False)]  # broken popc remembered; the launch error not retried
    calls.clear()
    state["target"] = (9, 0)  # another GPU architecture decides anew
    with pytest.warns(RuntimeWarning, match="failed to compile for \\(9, 0\\)"):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    assert calls == [(True, True), (False, False)]

    monkeypatch.setattr(TX, "HW_POPCOUNT_FAILURES", {})
    calls.clear()

    def launch_fails(kernel, grid, *args, compile_only=False, **meta):
        calls.append((compile_only, meta.get("HW_POPC")))
        if not compile_only:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TX, "launch", launch_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="illegal memory access"):
            TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    assert calls == [(True, True), (False, True)] and TX.HW_POPCOUNT_FAILURES == {}


@pytest.mark.parametrize("exc", [torch.cuda.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt(),
                                 RuntimeError("Triton cache: [Errno 28] No space left on device")],
                         ids=["oom", "interrupt", "cache-disk-full"])
def test_gemm_warm_up_failure_that_is_not_a_compile_error_does_not_disable_the_popcount(monkeypatch, exc):
    """Only the toolchain rejecting the inline PTX selects SWAR; anything else at warm-up
    propagates, and the next call compiles the hardware popcount again."""
    from gdnsq_kernels.binary import triton_xnor as TX

    calls, failures = [], [exc]

    def fake_launch(kernel, grid, *args, compile_only=False, **meta):
        calls.append((compile_only, meta.get("HW_POPC")))
        if compile_only and failures:
            raise failures.pop()

    monkeypatch.setattr(TX, "launch", fake_launch)
    monkeypatch.setattr(TX, "_hw_popcount_available", lambda t: True)
    monkeypatch.setattr(TX, "_compile_target", lambda t: (8, 0))
    monkeypatch.setattr(TX, "HW_POPCOUNT_FAILURES", {})
    a, b = _gemm_args()
    with pytest.raises(type(exc)):
        TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TX.packed_gemm_triton(a, b, 40, True, path="popcount")
    assert calls == [(True, True), (True, True), (False, True)] and TX.HW_POPCOUNT_FAILURES == {}


# ----------------------------------------------------------------------------- TRITON_INTERPRET

INTERP_PROBE = r"""
import json, os, sys
import triton
from gdnsq_kernels.backend import triton_interpreter_enabled

@triton.jit
def k(x):
    pass

print(json.dumps([type(k).__name__ == "InterpretedFunction", triton_interpreter_enabled()]))
"""


def test_interpreter_flag_parsed_as_triton_parses_it(tmp_path):
    """For each spelling, whether ``triton.jit`` itself makes an interpreted function (the
    oracle) and what triton_interpreter_enabled says agree."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = tmp_path / "probe.py"  # @triton.jit needs its function's source in a file
    probe.write_text(INTERP_PROBE)
    seen = {}
    for value in ("1", "0", "", "true", "True", "on", "yes", "2", " 1", "off", None):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if value is not None:
            env["TRITON_INTERPRET"] = value
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, str(probe)], env=env, cwd=root,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        triton_says, ours = json.loads(out.stdout.strip().splitlines()[-1])
        assert ours == triton_says, (value, triton_says, ours)
        seen[value] = triton_says
    assert seen["1"] and not seen["0"] and not seen[None]


# ----------------------------------------------------------------------------- channels_last


def _act_params(device, dtype=torch.float32):
    return [torch.tensor(v, device=device, dtype=dtype) for v in (-2.7, 0.6, -0.3)]


def test_activation_backward_is_one_launch_and_reads_channels_last_in_place():
    """Recorded launches: the backward is one kernel launch; a channels_last x (and a
    channels_last grad) are handed to the kernels as they are, not copied."""
    from gdnsq_kernels.quantize import triton_quantize as TQ

    x = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)
    p = _act_params("cpu")
    with _launch.record_launches() as recs:
        TQ.activation_forward(x, *p)
        TQ.activation_backward(g, x, *p, 3, True)
    assert [r.kernel.fn.__name__ for r in recs] == ["_act_fwd_kernel", "_act_bwd_kernel"]
    fwd, bwd = recs
    assert fwd.args[0].data_ptr() == x.data_ptr()
    assert fwd.args[1].is_contiguous(memory_format=torch.channels_last)
    assert bwd.args[0].data_ptr() == g.data_ptr() and bwd.args[1].data_ptr() == x.data_ptr()
    assert bwd.constexprs["CHANNELS_LAST"] is True


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_channels_last_activation_matches_reference(device, grad_layout, poison_empty):
    """Values and gradients of a channels_last input equal the reference; the dither index is
    the logical (NCHW) one, so the step gradient equals that of the contiguous copy."""
    x = (torch.randn(3, 5, 6, 7, device=device) * 1.5).to(memory_format=torch.channels_last)
    g = torch.randn(3, 5, 6, 7, device=device)
    if grad_layout == "channels_last":
        g = g.to(memory_format=torch.channels_last)
    p = _act_params(device)
    y = Q.activation_forward(x, *p, backend="triton")
    assert torch.equal(y, R.activation_forward(x, *p))
    out = Q.activation_backward(g, x, *p, 17, True, backend="triton")
    ref = R.activation_backward(g, x, *p, 17, True)
    assert torch.equal(out[0], ref[0])
    for o, r in zip(out[1:], ref[1:]):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    flat = Q.activation_backward(g.contiguous(), x.contiguous(), *p, 17, True, backend="triton")
    torch.testing.assert_close(out[1], flat[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_activation_backward_many_blocks_is_deterministic(device):
    """Several programs feed the last-ticket reduction: equal to the reference and bitwise
    the same on a second call (fixed reduction order)."""
    from gdnsq_kernels.quantize.triton_quantize import ACT_BLOCK

    x = torch.randn(5 * ACT_BLOCK + 17, device=device)
    g = torch.randn_like(x)
    p = _act_params(device)
    a = Q.activation_backward(g, x, *p, 4, True, backend="triton")
    b = Q.activation_backward(g, x, *p, 4, True, backend="triton")
    ref = R.activation_backward(g, x, *p, 4, True)
    for o, o2, r in zip(a[1:], b[1:], ref[1:]):
        assert torch.equal(o, o2)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not INTERP, reason="stops a launch part-way inside the Triton interpreter")
def test_activation_backward_after_an_interrupted_launch(monkeypatch):
    """A backward launch that stops after some programs took their reduction ticket (an
    interrupt, an error) leaves no state behind: every later backward still reduces all of
    its blocks and writes its parameter gradients."""
    from triton.runtime import interpreter

    from gdnsq_kernels.quantize.triton_quantize import ACT_BLOCK

    x = torch.randn(3 * ACT_BLOCK + 5)  # 4 programs
    g = torch.randn_like(x)
    p = _act_params("cpu")
    builder = interpreter.interpreter_builder
    real_atomic = builder.create_atomic_rmw
    tickets_taken = []

    def stop_after_two_tickets(*args, **kwargs):
        if len(tickets_taken) == 2:
            raise RuntimeError("launch interrupted")
        tickets_taken.append(1)
        return real_atomic(*args, **kwargs)

    monkeypatch.setattr(builder, "create_atomic_rmw", stop_after_two_tickets)
    with pytest.raises(Exception, match="launch interrupted"):
        Q.activation_backward(g, x, *p, 4, True, backend="triton")
    monkeypatch.undo()
    assert len(tickets_taken) == 2
    ref = R.activation_backward(g, x, *p, 4, True)
    for _ in range(2):  # the next launch, and the one after it
        out = Q.activation_backward(g, x, *p, 4, True, backend="triton")
        for o, r in zip(out[1:], ref[1:]):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)
