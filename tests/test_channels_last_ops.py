"""channels_last through the gdnsq:: quantizer ops: outputs keep the input's memory format, the
values equal the plain-torch reference computed on the contiguous tensor (the dither index is
the logical NCHW index whatever the layout), opcheck passes with channels_last inputs (its
fake-tensor check compares the fake outputs' strides with the real ones), a compiled
channels_last QAT step matches eager, and no activation-sized tensor is copied on the way.

The oracle is ``gdnsq_kernels.quantize.reference`` applied to ``x.contiguous()``: plain torch, its own
dither generator over row-major indices, no layout handling at all.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import gdnsq  # noqa: F401  (registers gdnsq::qconv2d / qlinear)
import gdnsq_kernels
from gdnsq.convert import quantize_model
from gdnsq_kernels.quantize import reference as ref
from gdnsq_kernels._launch import record_launches
from gdnsq_kernels.backend import triton_interpreter_enabled

ops = torch.ops.gdnsq
CL = torch.channels_last
BACKENDS = ["cpu", "torch", "reference"] + (["triton"] if triton_interpreter_enabled() else [])
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def is_channels_last(t):
    """channels_last strides, told from the strides themselves (not from the code under test)."""
    n, c, h, w = t.shape
    return t.stride() == (h * w * c, 1, w * c, c)


def _cl(t):
    out = t.contiguous(memory_format=CL)
    assert is_channels_last(out)
    return out


def _act_params(dtype=torch.float32, requires_grad=False):
    return [torch.tensor(v, dtype=dtype, requires_grad=requires_grad) for v in (-3.0, 1.0, -1.0)]


def _seed(v):
    return torch.tensor([v], dtype=torch.int64)


def _shape(backend):
    # > one Triton block (1,024) for triton (the interpreter is slow); > one C++ reduction chunk
    # (16,384) for cpu; odd sizes everywhere so that C, H and W are told apart.
    return (2, 5, 11, 13) if backend == "triton" else (3, 7, 33, 29)


def test_memory_format_rule():
    from gdnsq_kernels._launch import memory_format_of

    x = torch.randn(2, 3, 4, 5)
    assert memory_format_of(x) == torch.contiguous_format
    assert memory_format_of(_cl(x)) == CL
    assert memory_format_of(torch.randn(2, 1, 4, 5).contiguous(memory_format=CL)) == torch.contiguous_format
    assert memory_format_of(x.transpose(2, 3)) == torch.contiguous_format
    assert memory_format_of(torch.randn(3, 4)) == torch.contiguous_format


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_ops_channels_last(backend, dtype):
    torch.manual_seed(1)
    x = torch.randn(_shape(backend), dtype=dtype) * 1.5
    xc = _cl(x)
    g = _cl(torch.randn_like(x))
    s, r, o = _act_params(dtype)
    y = ops.act_forward(xc, s, r, o, backend)
    assert is_channels_last(y)
    assert torch.equal(y, ref.activation_forward(x, s, r, o))
    for seed, dither in [(11, True), (2**31 - 2, True), (5, False)]:
        gx, gs, gr, go = ops.act_backward(g, xc, s, r, o, _seed(seed), dither, backend, True, True)
        rx, rs, rr, ro = ref.activation_backward(g.contiguous(), x, s, r, o, seed, dither)
        assert is_channels_last(gx)
        assert torch.equal(gx, rx)
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
        for got, want in [(gs, rs), (gr, rr), (go, ro)]:
            torch.testing.assert_close(got, want, **tol)
    # the dither index is the logical one: the channels_last step gradient equals the
    # contiguous one, and differs from what memory-order indices would give (a permuted dither)
    _, gs_contig, _, _ = ops.act_backward(g.contiguous(), x, s, r, o, _seed(11), True, backend, False, True)
    _, gs_cl, _, _ = ops.act_backward(g, xc, s, r, o, _seed(11), True, backend, False, True)
    torch.testing.assert_close(gs_cl, gs_contig, **tol)
    nhwc = ref.activation_backward(g.permute(0, 2, 3, 1).contiguous(), x.permute(0, 2, 3, 1).contiguous(),
                                   s, r, o, 11, True)[1]
    assert not torch.allclose(nhwc, gs_cl, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 33, 31), (1, 48, 20, 19), (3, 24, 9, 9)],
                         ids=["C16-two-chunks", "C48", "C24-straddling"])
def test_activation_channels_last_vector_shapes(shape, dtype):
    """The cpu backend's vector loops on channels_last inputs whose channel count fills whole
    16-lane vectors (the in-register dither index), or not (C=24: vectors straddle pixels)."""
    torch.manual_seed(2)
    x = (torch.randn(shape) * 1.5).to(dtype)
    g = torch.randn(shape).to(dtype)
    s, r, o = _act_params()
    xc, gc = _cl(x), _cl(g)
    assert torch.equal(ops.act_forward(xc, s, r, o, "cpu"), ref.activation_forward(x, s, r, o))
    for dither in (True, False):
        gx, gs, gr, go = ops.act_backward(gc, xc, s, r, o, _seed(5), dither, "cpu", True, True)
        rx, rs, rr, ro = ref.activation_backward(g, x, s, r, o, 5, dither)
        assert torch.equal(gx, rx)
        for got, want in [(gs, rs), (gr, rr), (go, ro)]:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        # the params-only variant gives the same sums
        _, gs2, _, _ = ops.act_backward(gc, xc, s, r, o, _seed(5), dither, "cpu", False, True)
        assert torch.equal(gs2, gs)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_ops_channels_last(backend, per_channel):
    torch.manual_seed(2)
    w = torch.randn(6, 5, 3, 7) * 0.2
    wc = _cl(w)
    step = torch.linspace(-5.0, -3.0, 6) if per_channel else torch.tensor(-4.0)
    w_hat, z = ops.w_forward(wc, step, backend)
    r_hat, rz = ref.weight_forward(w, step)
    assert is_channels_last(w_hat)
    assert torch.equal(w_hat, r_hat) and torch.equal(z, rz)
    g = _cl(torch.randn_like(w))
    for seed, dither in [(3, True), (2**31 - 2, True), (4, False)]:
        gs = ops.w_step_grad(g, wc, step, z, _seed(seed), dither, backend)
        _, rs = ref.weight_backward(g.contiguous(), w, step, rz, seed, dither)
        torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_ops_channels_last(backend):
    """Autograd through gdnsq::quantize_activation / quantize_weight: gradients in the input's
    format, equal to the reference's on contiguous tensors."""
    torch.manual_seed(3)
    x = torch.randn(_shape(backend))
    xc = _cl(x).requires_grad_()
    xr = x.clone().requires_grad_()
    p = _act_params(requires_grad=True)
    pr = _act_params(requires_grad=True)
    g = _cl(torch.randn_like(x))
    y = gdnsq_kernels.quantize_activation(xc, *p, seed=9, backend=backend)
    assert is_channels_last(y)
    y.backward(g)
    yr = ref.quantize_activation(xr, *pr, seed=9)
    yr.backward(g.contiguous())
    assert torch.equal(y, yr) and is_channels_last(xc.grad) and torch.equal(xc.grad, xr.grad)
    for a, b in zip(p, pr):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-4)
    w = torch.randn(4, 6, 3, 3)
    wc = _cl(w).requires_grad_()
    step = torch.full((4,), -4.0, requires_grad=True)
    w_hat = gdnsq_kernels.quantize_weight(wc, step, seed=4, backend=backend)
    assert is_channels_last(w_hat)
    gw = _cl(torch.randn_like(w))
    w_hat.backward(gw)
    wr, stepr = w.clone().requires_grad_(), torch.full((4,), -4.0, requires_grad=True)
    ref.quantize_weight(wr, stepr, seed=4).backward(gw.contiguous())
    assert torch.equal(wc.grad, wr.grad)
    torch.testing.assert_close(step.grad, stepr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_channels_last(backend):
    x = _cl(torch.randn(2, 3, 5, 4))
    s, r, o = _act_params()
    g = _cl(torch.randn_like(x))
    torch.library.opcheck(ops.act_forward.default, (x, s, r, o, backend), test_utils=OPCHECK_TESTS)
    for need_x, need_p in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(ops.act_backward.default, (g, x, s, r, o, _seed(1), True, backend, need_x, need_p),
                              test_utils=OPCHECK_TESTS)
    w = _cl(torch.randn(6, 4, 3, 3))
    step = torch.full((6,), -3.0)
    _, z = ops.w_forward(w, step, backend)
    torch.library.opcheck(ops.w_forward.default, (w, step, backend), test_utils=OPCHECK_TESTS)
    torch.library.opcheck(ops.w_step_grad.default, (_cl(torch.randn_like(w)), w, step, z, _seed(2), True, backend),
                          test_utils=OPCHECK_TESTS)
    xg = x.clone().requires_grad_()
    sg, rg, og = _act_params(requires_grad=True)
    torch.library.opcheck(ops.quantize_activation.default, (xg, sg, rg, og, _seed(3), True, backend),
                          test_utils=OPCHECK_TESTS)
    wg = w.clone().requires_grad_()
    torch.library.opcheck(ops.quantize_weight.default, (wg, step.clone().requires_grad_(), _seed(4), True, backend),
                          test_utils=OPCHECK_TESTS)


# ----------------------------------------------------------------------------- copies


COPY_OPS = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")


def _count_copies(fn, numel):
    """Copies of ``numel``-element tensors made while ``fn`` runs (every copy, however nested:
    the profiler sees inside the custom ops). The Triton interpreter's own argument transfer
    copies untyped storages (shape ``[bytes]``), which this does not count."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    n = 0
    for e in prof.events():
        if e.name in COPY_OPS and e.input_shapes and e.input_shapes[0]:
            shape = e.input_shapes[0]
            count = 1
            for d in shape:
                count *= d
            n += count == numel
    return n


def _qat_quantizer_step(x, backend):
    p = _act_params(requires_grad=True)
    y = gdnsq_kernels.quantize_activation(x, *p, seed=5, backend=backend)
    y.backward(_like_grad(y))


def _like_grad(y):
    """A gradient for ``y`` in y's own layout (what a following channels_last op hands back)."""
    return torch.full_like(y, 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_activation_copies_channels_last(backend):
    """forward + backward of the activation quantizer on a channels_last input makes no more
    copies of an activation-sized tensor than on a contiguous one, and none at all on the fused
    backends (cpu, triton)."""
    shape = (2, 3, 5, 7)
    numel = 2 * 3 * 5 * 7
    counts = {}
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(shape)
        x = (_cl(x) if layout == "channels_last" else x).requires_grad_()
        counts[layout] = _count_copies(lambda: _qat_quantizer_step(x, backend), numel)
    assert counts["channels_last"] == counts["contiguous"], counts
    if backend in ("cpu", "triton"):
        assert counts["channels_last"] == 0, counts


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_weight_copies_channels_last(backend):
    """The weight quantizer on a channels_last conv weight copies it no more often than a
    contiguous one: once, and that copy is autograd's (AccumulateGrad clones the STE gradient,
    which the caller still holds), not the op's."""
    if backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("needs the Triton interpreter")
    counts = {}
    for layout in ("contiguous", "channels_last"):
        w = torch.randn(6, 4, 3, 5)
        w = (_cl(w) if layout == "channels_last" else w).requires_grad_()
        step = torch.full((6,), -4.0, requires_grad=True)

        def run():
            w_hat = gdnsq_kernels.quantize_weight(w, step, seed=3, backend=backend)
            w_hat.backward(_like_grad(w_hat))

        counts[layout] = _count_copies(run, w.numel())
    assert counts == {"contiguous": 1, "channels_last": 1}


def test_triton_host_code_hands_the_input_itself():
    """What the Triton host code would launch on a GPU (recorded, not run): the kernels get the
    channels_last input's own memory and a channels_last gradient, no copy of either."""
    x = _cl(torch.randn(2, 5, 11, 13)).requires_grad_()
    w = _cl(torch.randn(6, 4, 3, 5)).requires_grad_()
    p = _act_params(requires_grad=True)
    step = torch.full((6,), -4.0, requires_grad=True)
    with record_launches() as records:
        y = gdnsq_kernels.quantize_activation(x, *p, seed=5, backend="triton")
        g = _like_grad(y)
        y.backward(g)
        w_hat = gdnsq_kernels.quantize_weight(w, step, seed=3, backend="triton")
        gw = _like_grad(w_hat)
        w_hat.backward(gw)
    names = [r.kernel.__name__ if hasattr(r.kernel, "__name__") else str(r.kernel) for r in records]
    assert len(records) == 4, names
    ptrs = [{a.data_ptr() for a in r.args if hasattr(a, "data_ptr")} for r in records]
    assert x.data_ptr() in ptrs[0] and y.data_ptr() in ptrs[0]
    assert x.data_ptr() in ptrs[1] and g.data_ptr() in ptrs[1]
    assert w.data_ptr() in ptrs[2] and w_hat.data_ptr() in ptrs[2]
    assert w.data_ptr() in ptrs[3] and gw.data_ptr() in ptrs[3]
    assert records[1].constexprs["CHANNELS_LAST"] and records[3].constexprs["CHANNELS_LAST"]


def _conv_student():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                       nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return quantize_model(fp, weight_bits=2, act_bits=2, keep_first=False, keep_last=False)


def test_fused_layer_keeps_channels_last():
    """A channels_last QAT step through gdnsq::qconv2d (cpu backend): the layer output and every
    gradient equal those of the contiguous model, the gradients keep the layout, and the
    quantizers copy no activation: the channels_last step makes no more copies of
    activation-sized tensors than the contiguous one."""
    model = _conv_student()
    model_cl = copy.deepcopy(model).to(memory_format=CL)
    x = torch.randn(3, 3, 9, 11)
    xc = _cl(x).requires_grad_()
    xr = x.clone().requires_grad_()

    def step(m, inp):
        torch.manual_seed(7)
        out = m(inp)
        out.square().sum().backward()
        return out

    out_cl = step(model_cl, xc)
    out = step(model, xr)
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert is_channels_last(xc.grad)
    for (name, p_cl), (_, p) in zip(model_cl.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p_cl.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        if p.dim() == 4:
            assert is_channels_last(p_cl.grad), name
    sizes = [3 * 8 * 9 * 11, 3 * 3 * 9 * 11]
    for numel in sizes:
        n_cl = _count_copies(lambda: step(model_cl, xc), numel)
        n = _count_copies(lambda: step(model, xr), numel)
        assert n_cl <= n, (numel, n_cl, n)


def test_compiled_channels_last_qat_step_matches_eager():
    """torch.compile(fullgraph=True) of a channels_last QAT step (forward + backward) gives the
    eager outputs and gradients (the fake implementations give the real layouts)."""
    import torch._inductor.config as inductor_config

    eager = _conv_student().to(memory_format=CL)
    compiled_model = copy.deepcopy(eager)
    x = _cl(torch.randn(4, 3, 12, 12))

    def step(model, params, seed):
        for p in params.values():
            p.grad = None
        torch.manual_seed(seed)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(compiled_model, fullgraph=True)
        out_c, grads_c = step(compiled, dict(compiled_model.named_parameters()), 3)
    out_e, grads_e = step(eager, dict(eager.named_parameters()), 3)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-7)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 17
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-9, msg=name)
