"""Triton kernels for the GDNSQ quantizers: one fused forward and one fused backward per op.

* The parameters are read from device pointers inside the kernels (no ``.item()``, no host
  synchronisation). ``s = 2**log2_step`` and ``Q = 2**log2_range`` are computed *before* the
  launch with ``torch.exp2``, the very op the reference uses, on the same device: ``tl.exp2``
  compiles to ``ex2.approx.ftz.f32`` (2 ulp, denormals flushed), and one ulp of ``s`` can move
  a value across a rounding tie, so in-kernel ``exp2`` would break bit-equal codes.
* Every launch is ``exact`` (``enable_fp_fusion=False``, see ``_launch``): ``lo + s*round(v)``
  is two roundings in the reference, not one ``fma``.
* The dither ``r`` is regenerated in the backward from ``(key, flat index)`` with the hash of
  ``gdnsq_kernels.quantize.dither`` (uint32 arithmetic), so no noise tensor is stored. A seed given as a
  tensor (what the ``gdnsq::`` ops pass) is hashed to its key on the device and the kernels
  load the key from that pointer (``KEY_PTR``): no host read, so a CUDA graph replays a fresh
  draw each step. A Python-int seed is hashed on the host and passed by value.
* Activation backward in one launch: each program writes ``dx`` for its block and three
  partial sums to a small ``(programs, 3)`` buffer, then takes a ticket (one atomic add); the
  program with the last ticket reduces the whole buffer in a fixed order (deterministic: the
  same sums whichever program finishes last) and applies ``ln2*s`` / ``ln2*Q``. The partials,
  the outputs and the ticket counter share one zeroed allocation per launch (``_act_workspace``),
  so a launch that never finished (an interrupt, an error) leaves nothing that a later launch
  reads.
* channels_last activations are read in their memory order (no copy); the dither index is
  the NCHW index, recomputed in the kernel.
* Weights: one program per output channel loops over the channel's row (min, then quantize;
  the backward loops once for the per-channel sum). ResNet-sized rows are 144..4608 long, so a
  row is 1..5 blocks; a second stage is only needed for a per-tensor step (a ``sum`` over C_out).
  A channels_last conv weight is read in its memory order too (each channel's row is still one
  block of memory); the backward's dither index is the logical one, as for activations.
* Rounding is half-to-even via the ``(v + 2**23) - 2**23`` trick (exact in float32 for
  ``|v| < 2**23``; larger values are integers already), which runs identically on the GPU
  and in the interpreter (libdevice is not available there).
* Division uses ``div_rn`` (correctly rounded) so codes match the reference exactly.

Block sizes on CUDA: the two forward kernels are autotuned (``triton.autotune``, a few
configs keyed on ``n`` / ``K``: ``ACT_FWD_CONFIGS``, ``W_FWD_CONFIGS``). They are elementwise
plus an exact ``min``, so every config gives the same bits and the choice (made by timing,
which varies from run to run) cannot change a result. The two backward kernels reduce in
floating point, and ``tl.sum``'s reduction tree depends on ``BLOCK`` and ``num_warps``: they run
one pinned config (``ACT_BLOCK``/``REDUCE_WARPS``, ``_row_block(K)``/``REDUCE_WARPS``), so the
gradients are the same on every run, whatever the autotuner picked for the forwards. Under the
interpreter (CPU tensors) every kernel runs its fixed default config, without the autotuner.

Other inputs are made contiguous, so element ``i`` of the flat row-major order is the dither
index.
Every launch goes through ``gdnsq_kernels._launch.launch`` (device guard, contiguity check).
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests only).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _checks
from .._launch import contiguous, is_channels_last, launch, targets_cuda
from .dither import DITHER_MAGNITUDE, seed_key_i32, seed_key_tensor
from .reference import is_per_channel

LN2 = math.log(2.0)
ACT_BLOCK = 1024      # activation kernels' block: fixed config (interpreter) and the backward's
FINISH_BLOCK = 1024
REDUCE_WARPS = 4      # pinned num_warps of the reducing (backward) kernels: see the docstring

# Autotuned configs of the forward kernels on CUDA (bit-identical results whichever wins).
# Guesses for ~ResNet sizes, not yet tuned on a GPU; the first is the default (recorded by
# ``_launch.record_launches``).
ACT_FWD_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
]
W_FWD_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 256}, num_warps=2),
    triton.Config({"BLOCK": 2048}, num_warps=8),
]


@triton.jit
def _lowbias32(x):
    # x: uint32. Constants >= 2**31 are typed uint32 by Triton, so products wrap mod 2**32.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dither(idx, key, MAG: tl.constexpr, CT: tl.constexpr):
    """+-MAG in CT from bit 31 of lowbias32(idx ^ key); idx int64 flat indices, key int32.

    ``tl.full`` materialises MAG in CT itself: a bare Python float would be an fp32 literal,
    1.6e-9 relative off the float64 value the reference uses for float64 inputs.
    """
    h = _lowbias32(idx.to(tl.uint32) ^ key.to(tl.uint32, bitcast=True))
    mag = tl.full([], MAG, CT)
    return tl.where((h >> 31) == 1, mag, -mag)


@triton.jit
def _round_half_even(v, MAGIC: tl.constexpr):
    c = tl.where(v < 0, -MAGIC, MAGIC)
    r = (v + c) - c
    return tl.where(tl.abs(v) < MAGIC, r, v)


@triton.jit
def _to_bf16_rne(v):
    """float32 -> bfloat16 rounded half to even on the bits (Tensor.to's rounding). The GPU's
    cast rounds the same way; the interpreter's truncates, which would make a float32 gradient
    of a bfloat16 input differ from the reference under TRITON_INTERPRET=1."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(v != v, (u >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _div(a, b, CT: tl.constexpr):
    # div_rn (correctly rounded; plain `/` may be approximate on the GPU) exists for fp32 only;
    # fp64 division is always correctly rounded.
    if CT == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def _act_grid(s_ptr, q_ptr, off_ptr, CT: tl.constexpr):
    """(s, Q, lo, hi) of the activation grid: step, range, lowest and highest level."""
    s = tl.load(s_ptr)
    q = tl.load(q_ptr)
    lo = tl.load(off_ptr).to(CT)
    return s, q, lo, lo + q - s


@triton.jit
def _channel_step(s_ptr, c, PER_CHANNEL: tl.constexpr):
    """The step of weight channel ``c`` (one shared step unless PER_CHANNEL)."""
    if PER_CHANNEL:
        return tl.load(s_ptr + c)
    else:
        return tl.load(s_ptr)


@triton.jit
def _act_fwd_kernel(x_ptr, y_ptr, s_ptr, q_ptr, off_ptr, n,
                    BLOCK: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s, q, lo, hi = _act_grid(s_ptr, q_ptr, off_ptr, CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    xc = tl.where(x < lo, lo, x)  # comparisons, not min/max: NaN propagates like torch.clamp
    xc = tl.where(xc > hi, hi, xc)
    v = _div(xc - lo, s, CT)
    y = lo + s * _round_half_even(v, MAGIC)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logical_index(offs, C, H, Wd, CHANNELS_LAST: tl.constexpr):
    """Row-major (N, C, H, W) index of memory position ``offs`` (int64): the identity for a
    contiguous tensor; for a channels_last one (memory order N, H, W, C) the NCHW index, so
    the dither depends on the element, not on the layout."""
    if CHANNELS_LAST:
        c = offs % C
        r = offs // C
        w = r % Wd
        r = r // Wd
        h = r % H
        nb = r // H
        return ((nb * C + c) * H + h) * Wd + w
    else:
        return offs


@triton.jit(do_not_specialize=["key"])
def _act_bwd_kernel(g_ptr, x_ptr, dx_ptr, part_ptr, ticket_ptr, out_ptr, s_ptr, q_ptr, off_ptr,
                    n, n_prog, key, C, H, Wd,
                    BLOCK: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr,
                    NEED_DX: tl.constexpr, NEED_PARAMS: tl.constexpr, DITHER: tl.constexpr,
                    MAG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                    FINISH_BLOCK: tl.constexpr, LN2_C: tl.constexpr, KEY_PTR: tl.constexpr = False):
    """dx for this block; with NEED_PARAMS also the block's three partial sums, and the
    program that takes the last ticket reduces every block's partials in a fixed order
    (deterministic, one launch) into out = (d log2_step, d log2_range, d offset)."""
    if KEY_PTR:
        key = tl.load(key)  # int32 key hashed on the device from the seed tensor
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s, q, lo, hi = _act_grid(s_ptr, q_ptr, off_ptr, CT)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CT)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CT)
    above = x > hi
    if NEED_DX:
        inside = (x >= lo) & (x <= hi)  # False for NaN: no gradient through a NaN input
        dx = tl.where(inside, g, 0.0)  # g read in its own dtype: may be wider than x's
        if dx_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(dx_ptr + offs, _to_bf16_rne(dx), mask=mask)
        else:
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_PARAMS:
        below = x < lo
        xc = tl.where(below, lo, x)
        xc = tl.where(xc > hi, hi, xc)
        v = _div(xc - lo, s, CT)
        t = (_round_half_even(v, MAGIC) - v) - above.to(CT)
        if DITHER:
            t = t + s * _dither(_logical_index(offs, C, H, Wd, CHANNELS_LAST), key, MAG, CT)
        zero = tl.zeros_like(g)
        s_step = tl.sum(tl.where(mask, g * t, zero), axis=0)
        s_range = tl.sum(tl.where(mask & above, g, zero), axis=0)
        s_off = tl.sum(tl.where(mask & (below | above), g, zero), axis=0)
        tl.store(part_ptr + pid * 3 + 0, s_step)
        tl.store(part_ptr + pid * 3 + 1, s_range)
        tl.store(part_ptr + pid * 3 + 2, s_off)
        # acq_rel at GPU scope: this program's partials are visible before its ticket, and the
        # last program sees every partial stored before the other tickets.
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        if ticket == n_prog - 1:
            acc0 = tl.zeros([FINISH_BLOCK], dtype=CT)
            acc1 = tl.zeros([FINISH_BLOCK], dtype=CT)
            acc2 = tl.zeros([FINISH_BLOCK], dtype=CT)
            for start in range(0, n_prog, FINISH_BLOCK):
                rows = start + tl.arange(0, FINISH_BLOCK)
                m = rows < n_prog
                # .cg: read from L2, never a stale L1 line of another SM's partials
                acc0 += tl.load(part_ptr + rows * 3 + 0, mask=m, other=0.0, cache_modifier=".cg")
                acc1 += tl.load(part_ptr + rows * 3 + 1, mask=m, other=0.0, cache_modifier=".cg")
                acc2 += tl.load(part_ptr + rows * 3 + 2, mask=m, other=0.0, cache_modifier=".cg")
            ln2 = tl.full([], LN2_C, CT)  # a bare float literal would be fp32
            tl.store(out_ptr + 0, ln2 * s * tl.sum(acc0, axis=0))
            tl.store(out_ptr + 1, ln2 * q * tl.sum(acc1, axis=0))
            tl.store(out_ptr + 2, tl.sum(acc2, axis=0))


@triton.jit
def _w_fwd_kernel(w_ptr, y_ptr, z_ptr, s_ptr, K, PER_CHANNEL: tl.constexpr,
                  BLOCK: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr):
    c = tl.program_id(0)
    base = c.to(tl.int64) * K
    s = _channel_step(s_ptr, c, PER_CHANNEL)
    m = tl.full([BLOCK], float("inf"), CT)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mk = offs < K
        w = tl.load(w_ptr + base + offs, mask=mk, other=float("inf")).to(CT)
        m = tl.where(w < m, w, m)
        nan += (w != w).to(tl.int32)  # min ignores NaN; track it so the zero point is NaN
    z = tl.min(m, axis=0)
    z = tl.where(tl.sum(nan, axis=0) > 0, float("nan"), z)
    tl.store(z_ptr + c, z.to(z_ptr.dtype.element_ty))
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mk = offs < K
        w = tl.load(w_ptr + base + offs, mask=mk, other=0.0).to(CT)
        v = _div(w - z, s, CT)
        y = z + s * _round_half_even(v, MAGIC)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mk)


@triton.jit(do_not_specialize=["key"])
def _w_bwd_kernel(g_ptr, w_ptr, z_ptr, s_ptr, out_ptr, K, key, C, H, Wd, PER_CHANNEL: tl.constexpr,
                  BLOCK: tl.constexpr, CT: tl.constexpr, MAGIC: tl.constexpr,
                  DITHER: tl.constexpr, MAG: tl.constexpr, LN2_C: tl.constexpr,
                  KEY_PTR: tl.constexpr = False, CHANNELS_LAST: tl.constexpr = False):
    """Per output channel c: out[c] = ln2 * s_c * sum_row g*(round(v) - v + s_c*r). A
    channels_last weight (C_out, C, H, Wd) is read in memory order (CHANNELS_LAST)."""
    if KEY_PTR:
        key = tl.load(key)
    c = tl.program_id(0)
    base = c.to(tl.int64) * K
    s = _channel_step(s_ptr, c, PER_CHANNEL)
    z = tl.load(z_ptr + c).to(CT)
    acc = tl.zeros([BLOCK], dtype=CT)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mk = offs < K
        w = tl.load(w_ptr + base + offs, mask=mk, other=0.0).to(CT)
        g = tl.load(g_ptr + base + offs, mask=mk, other=0.0).to(CT)
        v = _div(w - z, s, CT)
        t = _round_half_even(v, MAGIC) - v
        if DITHER:
            t = t + s * _dither(_logical_index(base + offs, C, H, Wd, CHANNELS_LAST), key, MAG, CT)
        acc += tl.where(mk, g * t, tl.zeros_like(g))
    tl.store(out_ptr + c, tl.full([], LN2_C, CT) * s * tl.sum(acc, axis=0))


# The autotuned forms, used where launches target CUDA (see _tuned). The forwards only write
# their outputs, so the autotuner's benchmark launches need no reset.
_act_fwd_tuned = triton.autotune(configs=ACT_FWD_CONFIGS, key=["n"])(_act_fwd_kernel)
_w_fwd_tuned = triton.autotune(configs=W_FWD_CONFIGS, key=["K"])(_w_fwd_kernel)


def _tuned(t) -> bool:
    """Whether launches for ``t`` use the autotuned kernels: on CUDA (or recording for it);
    under the interpreter the fixed default config runs instead (fast, deterministic tests)."""
    return targets_cuda(t)


def _ct(dtype):
    """(triton compute dtype, round-to-integer magic constant) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, 2.0**52
    return tl.float32, 2.0**23


def _key_arg(seed):
    """(key argument, KEY_PTR): a seed tensor -> its int32 key on the device; an int -> by value."""
    if isinstance(seed, torch.Tensor):
        return seed_key_tensor(seed), True
    return seed_key_i32(seed), False


def _row_block(k: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(k, 1))))


def _exp2(log2_param, x_dtype, shape):
    """``2**param`` in the compute dtype, computed exactly as ``gdnsq_kernels.quantize.reference`` does
    (``torch.exp2`` of the parameter converted to the compute dtype), contiguous. Asynchronous:
    a device op, no host sync. A strided or expanded per-channel view is fine here."""
    ct = _checks.compute_dtype(x_dtype)
    return torch.exp2(log2_param.detach().to(ct).reshape(shape)).contiguous()


def _act_params(x, log2_step, log2_range, offset):
    s = _exp2(log2_step, x.dtype, ())
    q = _exp2(log2_range, x.dtype, ())
    return s, q, contiguous(offset.detach())


def _act_layout(x):
    """(x as the kernels read it, (C, H, W) if that is a channels_last 4-D tensor else None).

    A channels_last activation is read in its own memory order (no copy); the dither index is
    then recomputed as the NCHW index in the kernel. Other non-contiguous inputs are copied."""
    if is_channels_last(x):
        return x, tuple(x.shape[1:])
    return contiguous(x), None


def _act_workspace(n_prog, dtype, device):
    """(partials (n_prog, 3), out (3,), ticket (1,) int32): views of one zeroed allocation.

    Allocated per launch (one small fill): the ticket counter starts at 0 for every launch
    whatever became of earlier ones, so a launch that stopped part-way cannot make a later one
    reduce too early or never. The ticket takes the last element (4 or 8 bytes, zero bits = 0).
    """
    work = torch.zeros(n_prog * 3 + 3 + 1, dtype=dtype, device=device)
    part = work[:n_prog * 3].view(n_prog, 3)
    out = work[n_prog * 3:n_prog * 3 + 3]
    ticket = work[-1:].view(torch.int32)[:1]
    return part, out, ticket


def activation_forward(x, log2_step, log2_range, offset):
    xc, _ = _act_layout(x)
    y = torch.empty_like(xc)  # keeps a channels_last layout
    n = xc.numel()
    ct, magic = _ct(x.dtype)
    s, q, off = _act_params(x, log2_step, log2_range, offset)
    if _tuned(xc):
        launch(_act_fwd_tuned, lambda meta: (triton.cdiv(n, meta["BLOCK"]),), xc, y, s, q, off, n,
               exact=True, dense_ok=True, CT=ct, MAGIC=magic)
    else:
        launch(_act_fwd_kernel, (triton.cdiv(n, ACT_BLOCK),), xc, y, s, q, off, n,
               exact=True, dense_ok=True, BLOCK=ACT_BLOCK, CT=ct, MAGIC=magic)
    return y


def activation_backward(grad_y, x, log2_step, log2_range, offset, seed, dither,
                        need_grad_x=True, need_grad_params=True):
    """One launch: dx and (when asked) the three parameter gradients (see _act_bwd_kernel)."""
    xc, chw = _act_layout(x)
    if chw is None:
        g = grad_y.contiguous()
    else:  # read grad_y in x's memory order (a copy only if its layout differs)
        g = grad_y.contiguous(memory_format=torch.channels_last)
    n = xc.numel()
    ct, magic = _ct(x.dtype)
    acc_dtype = _checks.compute_dtype(x.dtype)
    n_prog = triton.cdiv(n, ACT_BLOCK)
    s, q, off = _act_params(x, log2_step, log2_range, offset)
    dx = torch.empty_like(xc) if need_grad_x else xc  # dummy pointer when not written
    if need_grad_params:
        part, out, ticket = _act_workspace(n_prog, acc_dtype, x.device)
    else:
        part = out = ticket = g  # dummy pointers, never touched
    C, H, Wd = chw if chw is not None else (1, 1, 1)
    key, key_ptr = _key_arg(seed)
    launch(_act_bwd_kernel, (n_prog,), g, xc, dx, part, ticket, out, s, q, off, n, n_prog,
           key, C, H, Wd, exact=True, dense_ok=True, num_warps=REDUCE_WARPS,
           BLOCK=ACT_BLOCK, CT=ct, MAGIC=magic, NEED_DX=bool(need_grad_x),
           NEED_PARAMS=bool(need_grad_params), DITHER=bool(dither), MAG=DITHER_MAGNITUDE,
           CHANNELS_LAST=chw is not None, FINISH_BLOCK=FINISH_BLOCK, LN2_C=LN2, KEY_PTR=key_ptr)
    grad_x = dx if need_grad_x else None
    if not need_grad_params:
        return grad_x, None, None, None
    return grad_x, out[0], out[1], out[2]


def _w_layout(w):
    """(w as the kernels read it, (C_in, kh, kw) if that is a channels_last conv weight)."""
    if is_channels_last(w):
        return w, tuple(w.shape[1:])
    return contiguous(w), None


def weight_forward(w, log2_step):
    wc, _ = _w_layout(w)
    c_out = wc.shape[0]
    k = wc.numel() // c_out
    ct, magic = _ct(w.dtype)
    y = torch.empty_like(wc)  # keeps a channels_last layout
    z = torch.empty(c_out, dtype=_checks.compute_dtype(w.dtype), device=w.device)
    s = _exp2(log2_step, w.dtype, (-1,))
    per_channel = is_per_channel(log2_step, c_out)
    if _tuned(wc):
        launch(_w_fwd_tuned, (c_out,), wc, y, z, s, k, exact=True, dense_ok=True,
               PER_CHANNEL=per_channel, CT=ct, MAGIC=magic)
    else:
        launch(_w_fwd_kernel, (c_out,), wc, y, z, s, k, exact=True, dense_ok=True,
               PER_CHANNEL=per_channel, BLOCK=_row_block(k), CT=ct, MAGIC=magic)
    return y, z


def weight_backward(grad_w_hat, w, log2_step, zero_point, seed, dither,
                    need_grad_w=True, need_grad_step=True):
    grad_w = grad_w_hat if need_grad_w else None
    if not need_grad_step:
        return grad_w, None
    wc, chw = _w_layout(w)
    # grad_w_hat in w's memory order (a copy only when its layout differs)
    g = grad_w_hat.contiguous(memory_format=torch.channels_last if chw else torch.contiguous_format)
    c_out = wc.shape[0]
    k = wc.numel() // c_out
    ct, magic = _ct(w.dtype)
    acc_dtype = _checks.compute_dtype(w.dtype)
    per_channel = is_per_channel(log2_step, c_out)
    s = _exp2(log2_step, w.dtype, (-1,))
    out = torch.empty(c_out, dtype=acc_dtype, device=w.device)
    key, key_ptr = _key_arg(seed)
    C, H, Wd = chw if chw is not None else (1, 1, 1)
    launch(_w_bwd_kernel, (c_out,), g, wc, contiguous(zero_point.to(acc_dtype)), s, out, k,
           key, C, H, Wd, exact=True, dense_ok=True, num_warps=REDUCE_WARPS,
           PER_CHANNEL=per_channel, BLOCK=_row_block(k),
           CT=ct, MAGIC=magic, DITHER=bool(dither), MAG=DITHER_MAGNITUDE, LN2_C=LN2,
           KEY_PTR=key_ptr, CHANNELS_LAST=chw is not None)
    grad = out if per_channel else out.sum()
    return grad_w, grad.reshape(log2_step.shape)
