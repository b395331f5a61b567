"""The gdnsq:: custom ops: schemas/fake/autograd registrations (opcheck), torch.compile of a QAT
step against eager, torch._dynamo.explain graph breaks, torch.export of frozen models."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import gdnsq_kernels  # noqa: F401
from gdnsq.convert import quantize_model
from gdnsq_kernels import binary as binary_ops
from gdnsq_kernels.quantize import dither
from gdnsq_kernels.binary.bitpack import pack_bits

sys.path.insert(0, os.path.dirname(__file__))
from _deploy_helpers import make_qmodel  # noqa: E402

ops = torch.ops.gdnsq
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_TESTS)


def _act_params(requires_grad=True):
    return [torch.tensor(v, requires_grad=requires_grad) for v in (-3.0, 1.0, -1.0)]


def _seed(v=123):
    return torch.tensor([v], dtype=torch.int64)


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_quantizer_ops(backend):
    x = torch.randn(3, 5, 7, dtype=torch.float32)
    s, r, o = _act_params(False)
    g = torch.randn_like(x)
    _opcheck(ops.act_forward.default, (x, s, r, o, backend))
    for need_x, need_p in [(True, True), (True, False), (False, True)]:
        _opcheck(ops.act_backward.default, (g, x, s, r, o, _seed(), True, backend, need_x, need_p))
    w = torch.randn(6, 4, 3, 3)
    step = torch.full((6,), -3.0)
    w_hat, z = ops.w_forward(w, step, backend)
    _opcheck(ops.w_forward.default, (w, step, backend))
    _opcheck(ops.w_step_grad.default, (torch.randn_like(w), w, step, z, _seed(), True, backend))
    _opcheck(ops.w_step_grad.default, (torch.randn_like(w), w, step[:1].clone(), z, _seed(), False, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_trainable_quantizer_ops(dtype):
    x = torch.randn(4, 9, dtype=dtype, requires_grad=True)
    s, r, o = (t.to(dtype).detach().requires_grad_() for t in _act_params())
    _opcheck(ops.quantize_activation.default, (x, s, r, o, _seed(), True, "cpu"))
    w = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    step = torch.full((5,), -3.0, dtype=dtype, requires_grad=True)
    _opcheck(ops.quantize_weight.default, (w, step, _seed(), True, "cpu"))


def _layer_args(kind, has_act, has_bias):
    torch.manual_seed(0)
    if kind == "conv":
        x = torch.randn(2, 4, 7, 6, requires_grad=True)
        w = torch.randn(5, 4, 3, 3, requires_grad=True)
    else:
        x = torch.randn(3, 2, 8, requires_grad=True)
        w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if has_bias else None
    a = _act_params() if has_act else [None, None, None]
    w_step = torch.full((5,), -3.0, requires_grad=True)
    return [x, w, b, *a, w_step, _seed(7), _seed(8)]


@pytest.mark.parametrize("has_act,has_bias,estimator", [(True, True, "ste"), (False, False, "ste"),
                                                        (True, False, "aewgs")])
def test_opcheck_fused_layer_ops(has_act, has_bias, estimator):
    args = _layer_args("conv", has_act, has_bias)
    _opcheck(ops.qconv2d.default, tuple(args) + ([2, 1], [1, 0], [1, 2], 1, estimator, True, True, None, "cpu"))
    args = _layer_args("linear", has_act, has_bias)
    _opcheck(ops.qlinear.default, tuple(args) + (estimator, True, True, None, "cpu"))


def test_fused_layer_ops_are_registered_by_the_kernels_alone():
    """gdnsq::qconv2d / qlinear exist after ``import gdnsq_kernels`` without the method package."""
    probe = ("import sys, torch, gdnsq_kernels\n"
             "torch.ops.gdnsq.qconv2d.default, torch.ops.gdnsq.qlinear.default\n"
             "print(sorted(m for m in sys.modules if m == 'gdnsq' or m.startswith('gdnsq.')))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_opcheck_packed_ops(backend):
    torch.manual_seed(0)
    bits = torch.randint(0, 2, (3, 70, 5), dtype=torch.uint8)
    _opcheck(ops.pack_bits.default, (bits, 1))
    packed = pack_bits(bits, dim=1)
    _opcheck(ops.unpack_bits.default, (packed, 70, 1))
    a = pack_bits(torch.randint(0, 2, (9, 77), dtype=torch.uint8))
    b = pack_bits(torch.randint(0, 2, (4, 77), dtype=torch.uint8))
    for xnor in (True, False):
        _opcheck(ops.packed_gemm.default, (a, b, 77, xnor, backend))
    lw = binary_ops.pack_linear_weight(torch.randint(0, 2, (6, 77)), torch.rand(6) + 0.1, -torch.rand(6))
    j = torch.randint(0, 2, (9, 77), dtype=torch.uint8)
    s_a, beta = torch.tensor(0.5, dtype=torch.float64), torch.tensor(-0.25, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    _opcheck(ops.binary_linear.default, (j, s_a, beta, lw.packed, lw.step, lw.minimum, lw.ones, bias, backend))
    cw = binary_ops.pack_conv_weight(torch.randint(0, 2, (6, 35, 3, 2)), torch.rand(6) + 0.1, -torch.rand(6))
    act = torch.randint(0, 2, (2, 35, 7, 9), dtype=torch.uint8)
    _opcheck(ops.binary_conv2d.default, (act, s_a, beta, cw.packed, cw.step, cw.minimum, cw.ones,
                                         cw.tap_ones, None, [2, 1], [1, 1, 0, 1], [1, 2], backend))


def test_packed_op_values_through_public_api():
    """The public wrappers, which call the ops, return what the plain-torch oracle gives."""
    from gdnsq_kernels.binary import reference as ref

    torch.manual_seed(1)
    a_bits = torch.randint(0, 2, (5, 45), dtype=torch.uint8)
    b_bits = torch.randint(0, 2, (3, 45), dtype=torch.uint8)
    a, b = pack_bits(a_bits), pack_bits(b_bits)
    assert torch.equal(gdnsq_kernels.xnor_gemm(a, b, 45), ref.xnor_gemm_reference(a, b, 45))
    pm = 2 * a_bits.long() - 1, 2 * b_bits.long() - 1
    assert torch.equal(gdnsq_kernels.xnor_gemm(a, b, 45).long(), pm[0] @ pm[1].T)
    assert torch.equal(gdnsq_kernels.unpack_bits(a, 45), a_bits)


def test_bad_bits_still_rejected_on_cpu():
    with pytest.raises(ValueError, match="bits must contain only 0 and 1"):
        pack_bits(torch.tensor([0, 2, 1]))


# ----------------------------------------------------------------------------- seeds


def test_seed_tensor_draw_follows_the_generator_state():
    """The CPU draw comes from torch's default generator, so restoring its state (what a trainer
    checkpoint holds) repeats the seeds and the run resumes bit-exactly."""
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, b = dither.new_seed_tensor(), dither.new_seed_tensor()
    torch.set_rng_state(state)
    assert torch.equal(dither.new_seed_tensor(), a) and torch.equal(dither.new_seed_tensor(), b)
    assert a.dtype == torch.int64 and a.shape == (1,) and 0 <= int(a[0]) < 2**31 - 1


def test_int_and_tensor_seed_give_the_same_gradient():
    x = torch.randn(300, requires_grad=True)
    s, r, o = _act_params()
    grads = []
    for seed in (987654, torch.tensor([987654])):
        for p in (x, s, r, o):
            p.grad = None
        gdnsq_kernels.quantize_activation(x, s, r, o, seed=seed).square().sum().backward()
        grads.append(s.grad.clone())
    assert torch.equal(grads[0], grads[1])


# ----------------------------------------------------------------------------- compile / export


def _three_conv_student():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                       nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return quantize_model(fp, weight_bits=2, act_bits=2, keep_first=False, keep_last=False)


def test_explain_has_no_graph_break():
    q = _three_conv_student()
    x = torch.randn(2, 3, 10, 10)
    explanation = torch._dynamo.explain(q)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_qat_step_matches_eager():
    """forward + backward of a converted 3-conv student under torch.compile(fullgraph=True):
    same output and gradients as eager for the same seeds (inductor's RNG replaced by torch's
    through fallback_random so that the in-graph seed draws equal eager's), and a fresh dither
    per step (a different generator state gives a different step gradient)."""
    import torch._inductor.config as inductor_config

    eager = _three_conv_student()
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 3, 12, 12)

    def step(model, params, seed):
        for p in params.values():
            p.grad = None
        torch.manual_seed(seed)
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(compiled_model, fullgraph=True)
        params_c = dict(compiled_model.named_parameters())
        out_c, grads_c = step(compiled, params_c, 3)
        _, grads_c2 = step(compiled, params_c, 4)
    params_e = dict(eager.named_parameters())
    out_e, grads_e = step(eager, params_e, 3)
    _, grads_e2 = step(eager, params_e, 4)
    # inductor's own kernels (ReLU, pooling, the loss) may round differently in the last bit
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-7)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 17
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(grads_c2[name], grads_e2[name], rtol=1e-5, atol=1e-9, msg=name)
    # The dither changes the step gradients from one step to the next (seeds drawn in-graph).
    step_names = [n for n in grads_e if n.endswith("weight_quantizer.log2_step")]
    assert all(not torch.allclose(grads_c[n], grads_c2[n], rtol=1e-4, atol=0) for n in step_names)


@pytest.mark.parametrize("wbits,abits,path", [(1, 1, "binary"), (2, 2, "bitplane"), (2, 2, "int")])
def test_frozen_model_exports(wbits, abits, path):
    from gdnsq.deploy import freeze

    frozen = freeze(make_qmodel(wbits, abits), path=path)
    assert {m.config["path"] for m in frozen.modules() if hasattr(m, "config")} == {path}
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        ref = frozen(x)
    program = torch.export.export(frozen, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if path == "binary":
        assert "gdnsq.binary_conv2d.default" in targets and "gdnsq.binary_linear.default" in targets
    elif path == "bitplane":
        assert "gdnsq.packed_gemm.default" in targets and "gdnsq.pack_bits.default" in targets
    x2 = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(program.module()(x), ref)
        assert torch.equal(program.module()(x2), frozen(x2))


# ----------------------------------------------------------------------------- device-side key


def test_seed_key_tensor_matches_host_key():
    seeds = [0, 1, 7, 2**31 - 2, 123456789, 0x9E3779B9 & 0x7FFFFFFF]
    keys = [int(dither.seed_key_tensor(torch.tensor([s]))[0]) for s in seeds]
    assert keys == [dither.seed_key_i32(s) for s in seeds]
    assert any(k < 0 for k in keys) and any(k > 0 for k in keys)  # both halves of the int32 range


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or CUDA")
def test_triton_backward_takes_seed_tensor():
    """The Triton backwards load the key from the device (tensor seed) and give the same
    gradients as the host-hashed int seed, which the other tests compare with the reference."""
    from gdnsq_kernels.quantize import triton_quantize as tq

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    x = torch.randn(3000, device=dev) * 2
    g = torch.randn_like(x)
    s, r, o = (torch.tensor(v, device=dev) for v in (-3.0, 1.0, -1.0))
    for seed in (5, 2**31 - 2):
        by_int = tq.activation_backward(g, x, s, r, o, seed, True)
        by_tensor = tq.activation_backward(g, x, s, r, o, torch.tensor([seed], device=dev), True)
        for a, b in zip(by_int, by_tensor):
            assert torch.equal(a, b)
        w = torch.randn(6, 50, device=dev)
        step = torch.full((6,), -3.0, device=dev)
        _, z = tq.weight_forward(w, step)
        gw = torch.randn_like(w)
        assert torch.equal(tq.weight_backward(gw, w, step, z, seed, True)[1],
                           tq.weight_backward(gw, w, step, z, torch.tensor([seed], device=dev), True)[1])
