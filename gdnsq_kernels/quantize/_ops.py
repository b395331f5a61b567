"""``gdnsq::`` custom ops: the quantizer kernels as real PyTorch operators (``torch.library``).

Every kernel of this package is registered here with ``torch.library.custom_op`` so that
``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA-graph capture see one opaque
operator with a schema and a fake (meta) implementation, instead of a pybind / NumPy call
they cannot trace. The public functions (``gdnsq_kernels.quantize_activation`` ...) validate
their arguments in Python, resolve the backend to a concrete name (``triton``, ``cpu``,
``torch`` or ``reference``; passed to the op as a string, so a compiled graph is specialised on
it) and call these ops.

Quantizer ops (schemas; ``seed`` is an int64 tensor of one element holding the dither seed,
drawn on the input's device, so that a compiled or captured graph draws fresh noise per step):

    gdnsq::act_forward(Tensor x, Tensor log2_step, Tensor log2_range, Tensor offset, str backend)
        -> Tensor                                        y, x's shape/dtype/memory format
    gdnsq::act_backward(Tensor grad_y, Tensor x, Tensor log2_step, Tensor log2_range,
        Tensor offset, Tensor seed, bool dither, str backend, bool need_grad_x,
        bool need_grad_params) -> (Tensor, Tensor, Tensor, Tensor)
        grad_x (x's shape/dtype) and the three 0-d parameter gradients in the compute dtype
        (float32; float64 for float64 x). An output not asked for is an empty (0,) tensor.
    gdnsq::w_forward(Tensor w, Tensor log2_step, str backend) -> (Tensor, Tensor)
        w_hat (w's shape/dtype/memory format), zero point (C_out,) in the compute dtype
    gdnsq::w_step_grad(Tensor grad_w_hat, Tensor w, Tensor log2_step, Tensor zero_point,
        Tensor seed, bool dither, str backend) -> Tensor    d log2_step, log2_step's shape
    gdnsq::quantize_activation(Tensor x, Tensor log2_step, Tensor log2_range, Tensor offset,
        Tensor seed, bool dither, str backend) -> Tensor    trainable (register_autograd)
    gdnsq::quantize_weight(Tensor w, Tensor log2_step, Tensor seed, bool dither, str backend)
        -> (Tensor, Tensor)      (w_hat, zero point): trainable (register_autograd); the zero
                                 point is returned so that the backward need not recompute it

Memory format: every activation- or weight-shaped output (y, grad_x, w_hat) has its input's
format (``_launch.memory_format_of``): channels_last for a channels_last 4-D tensor, else
contiguous, in the real implementation of every backend and in the fake one alike. The kernels
read channels_last tensors in memory order, so a channels_last network is quantized without a
single copy of an activation (tests/test_channels_last_ops.py counts them).

The weight gradient of the weight quantizer is the upstream gradient itself (STE), which an op
cannot return (outputs may not alias inputs), so ``w_step_grad`` returns the step gradient only.

Inside an op the Triton backend hashes the seed tensor on the device (the kernels load the key
from a pointer: no host read, CUDA-graph safe); the C++/torch/reference backends read it on the
host (``int(seed)``), which is free on CPU and invisible to the compiler (the op is opaque).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _checks
from .._launch import is_channels_last, memory_format_of, nhwc_view

__all__ = ["seed_value", "act_forward_impl", "act_backward_impl", "w_forward_impl", "w_step_grad_impl"]


def _impl(name: str):
    """The module implementing backend ``name`` (cpu may degrade to torch, warning once)."""
    if name == "reference":
        from . import reference

        return reference
    if name == "torch":
        from . import _torch_quantize

        return _torch_quantize
    if name == "triton":
        from . import triton_quantize

        return triton_quantize
    if name == "cpu":
        from . import cpu_quantize

        return cpu_quantize.implementation()
    raise ValueError(f"backend must be one of triton, reference, cpu, torch, got {name!r}")


def seed_value(seed: Tensor, backend: str):
    """The seed as the backend takes it: the tensor itself for ``triton`` (the kernels hash it
    on the device: no host read, CUDA-graph safe), else the Python int it holds (a host read;
    free on CPU)."""
    if backend == "triton":
        return seed
    return int(seed.reshape(-1)[0])


def _fresh(t: Tensor, *inputs: Tensor, memory_format=torch.contiguous_format) -> Tensor:
    """``t`` in ``memory_format`` (a no-op when it already is: the backends allocate their
    outputs so) and not sharing memory with any input (an op's outputs must not alias)."""
    t = t.contiguous(memory_format=memory_format)
    for i in inputs:
        if i is not None and i.numel() > 0 and t.numel() > 0 and t.untyped_storage().data_ptr() == i.untyped_storage().data_ptr():
            return t.clone(memory_format=memory_format)
    return t


def _like(t: Tensor) -> Tensor:
    """An uninitialised tensor like ``t`` in the format the ops give outputs computed from it."""
    return torch.empty_like(t, memory_format=memory_format_of(t))


def _empty(like: Tensor, dtype=None) -> Tensor:
    return torch.empty(0, dtype=like.dtype if dtype is None else dtype, device=like.device)


# ----------------------------------------------------------------------------- activation


# The op bodies are plain functions (``*_impl``) as well: the fused layer ops
# (``fused_layers.py``) call them directly from inside their own opaque op, where a nested
# ``torch.ops.gdnsq`` call would only add a dispatcher round trip and the custom-op autograd
# wrapper (tens of microseconds each, five per layer and step) and compute the same thing.


def act_forward_impl(x: Tensor, log2_step: Tensor, log2_range: Tensor, offset: Tensor, backend: str) -> Tensor:
    """The body of ``gdnsq::act_forward`` (no dispatch, no autograd)."""
    if x.numel() == 0:
        return _like(x)
    y = _impl(backend).activation_forward(x, log2_step, log2_range, offset)
    return _fresh(y, x, memory_format=memory_format_of(x))


@torch.library.custom_op("gdnsq::act_forward", mutates_args=())
def act_forward(x: Tensor, log2_step: Tensor, log2_range: Tensor, offset: Tensor, backend: str) -> Tensor:
    return act_forward_impl(x, log2_step, log2_range, offset, backend)


@act_forward.register_fake
def _(x, log2_step, log2_range, offset, backend):
    return _like(x)


def act_backward_impl(grad_y: Tensor, x: Tensor, log2_step: Tensor, log2_range: Tensor, offset: Tensor,
                      seed: Tensor, dither: bool, backend: str, need_grad_x: bool,
                      need_grad_params: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of ``gdnsq::act_backward`` (no dispatch)."""
    ct = _checks.compute_dtype(x.dtype)
    if x.numel() == 0:
        gx = torch.zeros_like(x, memory_format=memory_format_of(x)) if need_grad_x else _empty(x)
        z = (lambda: torch.zeros((), dtype=ct, device=x.device)) if need_grad_params else (lambda: _empty(x, ct))
        return gx, z(), z(), z()
    gx, gs, gr, go = _impl(backend).activation_backward(
        grad_y, x, log2_step, log2_range, offset, seed_value(seed, backend), bool(dither),
        need_grad_x=need_grad_x, need_grad_params=need_grad_params)
    gx = _fresh(gx, grad_y, x, memory_format=memory_format_of(x)) if need_grad_x else _empty(x)
    if need_grad_params:
        gs, gr, go = (g.to(ct).reshape(()).clone() for g in (gs, gr, go))
    else:
        gs, gr, go = _empty(x, ct), _empty(x, ct), _empty(x, ct)
    return gx, gs, gr, go


@torch.library.custom_op("gdnsq::act_backward", mutates_args=())
def act_backward(grad_y: Tensor, x: Tensor, log2_step: Tensor, log2_range: Tensor, offset: Tensor,
                 seed: Tensor, dither: bool, backend: str, need_grad_x: bool,
                 need_grad_params: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return act_backward_impl(grad_y, x, log2_step, log2_range, offset, seed, dither, backend,
                             need_grad_x, need_grad_params)


@act_backward.register_fake
def _(grad_y, x, log2_step, log2_range, offset, seed, dither, backend, need_grad_x, need_grad_params):
    ct = _checks.compute_dtype(x.dtype)
    gx = _like(x) if need_grad_x else _empty(x)
    shape = () if need_grad_params else (0,)
    return (gx,) + tuple(x.new_empty(shape, dtype=ct) for _ in range(3))


# ----------------------------------------------------------------------------- weight


def w_forward_impl(w: Tensor, log2_step: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """The body of ``gdnsq::w_forward`` (no dispatch, no autograd)."""
    ct = _checks.compute_dtype(w.dtype)
    if w.numel() == 0:
        return _like(w), torch.zeros(w.shape[0], dtype=ct, device=w.device)
    if backend == "torch" and is_channels_last(w):
        # per output channel (min, then elementwise): the same on the NHWC view of the memory,
        # where the torch backend's reshape to (C_out, K) is a view instead of a copy
        y, z = _impl(backend).weight_forward(nhwc_view(w), log2_step)
        y = y.permute(0, 3, 1, 2)
    else:
        y, z = _impl(backend).weight_forward(w, log2_step)
    return _fresh(y, w, memory_format=memory_format_of(w)), _fresh(z.to(ct), w, log2_step)


@torch.library.custom_op("gdnsq::w_forward", mutates_args=())
def w_forward(w: Tensor, log2_step: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return w_forward_impl(w, log2_step, backend)


@w_forward.register_fake
def _(w, log2_step, backend):
    ct = _checks.compute_dtype(w.dtype)
    return _like(w), w.new_empty((w.shape[0],), dtype=ct)


def w_step_grad_impl(grad_w_hat: Tensor, w: Tensor, log2_step: Tensor, zero_point: Tensor, seed: Tensor,
                     dither: bool, backend: str) -> Tensor:
    """The body of ``gdnsq::w_step_grad`` (no dispatch)."""
    ct = _checks.compute_dtype(w.dtype)
    if w.numel() == 0:
        return torch.zeros(log2_step.shape, dtype=ct, device=w.device)
    _, gs = _impl(backend).weight_backward(grad_w_hat, w, log2_step, zero_point, seed_value(seed, backend),
                                          bool(dither), need_grad_w=False, need_grad_step=True)
    return _fresh(gs.to(ct).reshape(log2_step.shape), log2_step)


@torch.library.custom_op("gdnsq::w_step_grad", mutates_args=())
def w_step_grad(grad_w_hat: Tensor, w: Tensor, log2_step: Tensor, zero_point: Tensor, seed: Tensor,
                dither: bool, backend: str) -> Tensor:
    return w_step_grad_impl(grad_w_hat, w, log2_step, zero_point, seed, dither, backend)


@w_step_grad.register_fake
def _(grad_w_hat, w, log2_step, zero_point, seed, dither, backend):
    return log2_step.new_empty(log2_step.shape, dtype=_checks.compute_dtype(w.dtype))


# ----------------------------------------------------------------------------- trainable ops


@torch.library.custom_op("gdnsq::quantize_activation", mutates_args=())
def quantize_activation(x: Tensor, log2_step: Tensor, log2_range: Tensor, offset: Tensor, seed: Tensor,
                        dither: bool, backend: str) -> Tensor:
    return act_forward(x, log2_step, log2_range, offset, backend)


@quantize_activation.register_fake
def _(x, log2_step, log2_range, offset, seed, dither, backend):
    return _like(x)


def _qa_setup(ctx, inputs, output):
    x, log2_step, log2_range, offset, seed, dither, backend = inputs
    # Only the input, three scalars and the seed are kept; the dither comes back from the seed.
    ctx.save_for_backward(x, log2_step, log2_range, offset, seed)
    ctx.dither, ctx.backend = dither, backend


def _qa_backward(ctx, grad_y):
    x, log2_step, log2_range, offset, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_params = need[1] or need[2] or need[3]
    if not (need[0] or need_params):
        return (None,) * 7
    # grad_y in x's layout: a copy only when autograd hands it over in another one
    gx, gs, gr, go = torch.ops.gdnsq.act_backward(
        grad_y.contiguous(memory_format=memory_format_of(x)), x, log2_step, log2_range, offset,
        seed, ctx.dither, ctx.backend, bool(need[0]), bool(need_params))

    def like(grad, p, needed):
        return grad.to(p.dtype).reshape(p.shape) if needed else None

    return (gx if need[0] else None, like(gs, log2_step, need[1]), like(gr, log2_range, need[2]),
            like(go, offset, need[3]), None, None, None)


quantize_activation.register_autograd(_qa_backward, setup_context=_qa_setup)


@torch.library.custom_op("gdnsq::quantize_weight", mutates_args=())
def quantize_weight(w: Tensor, log2_step: Tensor, seed: Tensor, dither: bool,
                    backend: str) -> Tuple[Tensor, Tensor]:
    return w_forward(w, log2_step, backend)


@quantize_weight.register_fake
def _(w, log2_step, seed, dither, backend):
    ct = _checks.compute_dtype(w.dtype)
    return _like(w), w.new_empty((w.shape[0],), dtype=ct)


def _qw_setup(ctx, inputs, output):
    w, log2_step, seed, dither, backend = inputs
    ctx.save_for_backward(w, log2_step, output[1], seed)  # input + O(C_out); no noise, no codes
    ctx.dither, ctx.backend = dither, backend


def _qw_backward(ctx, grad_y, _grad_zero_point):
    w, log2_step, zero_point, seed = ctx.saved_tensors
    need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gs = None
    if need_s:
        gs = torch.ops.gdnsq.w_step_grad(grad_y.contiguous(memory_format=memory_format_of(w)), w,
                                         log2_step, zero_point, seed,
                                         ctx.dither, ctx.backend).to(log2_step.dtype)
    return (grad_y if need_w else None), gs, None, None, None


quantize_weight.register_autograd(_qw_backward, setup_context=_qw_setup)
