"""Calibration: start every quantizer at 10 bits from min/max statistics (METHOD Part B §4.2).

Run it after ``quantize_model`` and **before** the optimizer is built: it changes parameter
values and ``requires_grad`` flags (pruned quantizers and unsigned offsets are frozen).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .batches import ForwardFn, check_forward_fn, to_device
from .layers import QConv2d, QLinear
from .quantizers import WEIGHT_LOG2_STEP_INIT


def _batch_input(batch):
    """The model input of a loader item: the tensor itself, or the first element of a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "input" in batch:
        return batch["input"]
    raise TypeError("loader must yield tensors or (input, target) tuples/lists")


def _check_called(layers, called: set[str]) -> None:
    """Refuse a quantized layer whose forward never ran: its quantizers could not be set, and
    a layer the forward does not call is not quantized in the model either."""
    for name, _ in layers:
        if name not in called:
            raise ValueError(
                f"layer {name!r} was never called during calibration: its module is not used by "
                f"forward (is its weight read directly, as nn.MultiheadAttention does with "
                f"out_proj, or does it run only in training mode?); keep it FP with "
                f"quantize_model(..., exclude=[{name!r}])")


@torch.no_grad()
def calibrate(student: nn.Module, loader, *, bits: float = 10.0, num_batches: int | None = None,
              device=None, forward_fn: ForwardFn | None = None, grid: str = "minmax") -> dict:
    """Set every weight and activation quantizer of ``student`` to ``bits`` bits.

    Weights (per channel): ``log2_step_c = max(-12, log2((max_c - min_c)/(2**bits - 1)))``.
    Activations: one FP pass over ``loader`` (the layers run unquantized, so the statistics are
    those of the FP network) records the min and max of each quantized layer's raw input; then
    ``lo`` = min (signed) or 0 (unsigned), ``log2_step = log2((max - lo)/(2**bits - 1))``,
    ``log2_range = log2_step + bits``, ``offset = lo``, so the clamp top equals ``max``.
    ``signed="auto"`` quantizers become unsigned (offset fixed at 0) when min >= 0, else signed.
    With ``grid="mse"`` the activation clamp top is instead the one that minimises the mean
    squared quantization error of the observed inputs at ``bits`` bits (a 100-point search over
    ``lo + a * (max - lo)``, ``a`` in (0, 1]; the peers' start at low bits): worth it only when
    ``bits`` is small, since at 10 bits min/max loses nothing. A zero range (max == lo) prunes the quantizer: ``log2_step = log2_range = 0``, offset = lo,
    all frozen and excluded from the penalty.

    Args:
        student: model from :func:`gdnsq.quantize_model`.
        loader: iterable of batches: input tensors, (input, target) pairs, dicts with an
            ``"input"`` key, or dicts of model keyword arguments (a Hugging Face batch:
            ``student(**batch)``); any other batch with ``forward_fn``.
        bits: starting precision in bits (> 0).
        num_batches: stop after this many batches (default: the whole loader).
        device: where to put the batch's tensors (default: the student's parameter device).
        forward_fn: ``forward_fn(student, batch)`` runs the student on one batch, for any
            model signature (default :func:`gdnsq.batches.default_forward`).
        grid: ``"minmax"`` (default) or ``"mse"``: how the activation clamp top is chosen.

    Returns:
        {layer name: {"min": float, "max": float, "signed": bool, "pruned": bool}} for the
        calibrated activation quantizers.
    """
    if not (isinstance(bits, (int, float)) and not isinstance(bits, bool) and bits > 0):
        raise ValueError(f"bits must be a positive number, got {bits!r}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    forward_fn = check_forward_fn(forward_fn)
    levels = 2.0 ** bits - 1.0
    layers = [(n, m) for n, m in student.named_modules() if isinstance(m, (QConv2d, QLinear))]
    if not layers:
        raise ValueError("student has no QConv2d/QLinear layers: call gdnsq.quantize_model first")

    # Weights: per-channel range -> step, floored at the initial 2**-12.
    for _, layer in layers:
        wq = layer.weight_quantizer
        w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
        span = w.amax(1) - w.amin(1)
        if not wq.per_channel:
            span = span.max().reshape(1)
        with torch.no_grad():
            step = torch.log2(span / levels).clamp_min(WEIGHT_LOG2_STEP_INIT)
            wq.log2_step.copy_(step.to(wq.log2_step))

    # Activations: min/max of each quantized layer's raw input over the loader.
    act_layers = [(n, m) for n, m in layers if m.act_quantizer is not None and m.act_quantizer.enabled]
    stats = {n: [math.inf, -math.inf] for n, _ in act_layers}
    samples = {n: [] for n, _ in act_layers}  # grid="mse": a strided subset of each input
    hooks = []
    called: set[str] = set()  # names of the layers whose forward ran

    def make_hook(name):
        def hook(_module, inputs):
            x = inputs[0].detach()
            if x.numel():
                st = stats[name]
                st[0] = min(st[0], float(x.min()))
                st[1] = max(st[1], float(x.max()))
                if grid == "mse":
                    flat = x.reshape(-1)
                    samples[name].append(flat[:: max(1, flat.numel() // MSE_SAMPLES_PER_BATCH)].float().cpu())
        return hook

    if act_layers:
        if device is None:
            p = next(student.parameters(), None)
            device = p.device if p is not None else torch.device("cpu")
        was_training = student.training
        for n, m in act_layers:
            hooks.append(m.register_forward_pre_hook(make_hook(n)))
        for n, m in layers:
            hooks.append(m.register_forward_pre_hook(lambda _m, _inputs, n=n: called.add(n)))
        for _, m in layers:
            m._fp_passthrough = True
        try:
            student.eval()
            seen = 0
            for batch in loader:
                forward_fn(student, to_device(batch, device))
                seen += 1
                if num_batches is not None and seen >= num_batches:
                    break
            if seen == 0:
                raise ValueError("loader yielded no batches")
            _check_called(layers, called)
        finally:
            for h in hooks:
                h.remove()
            for _, m in layers:
                m._fp_passthrough = False
            student.train(was_training)

    report = {}
    for name, layer in act_layers:
        aq = layer.act_quantizer
        lo_obs, hi_obs = stats[name]
        if not math.isfinite(lo_obs) or not math.isfinite(hi_obs):
            raise ValueError(f"calibration saw no finite inputs for layer {name!r}")
        signed = aq.signed
        if signed == "auto":
            signed = lo_obs < 0.0
        aq.pruned.fill_(False)
        aq.set_signed(bool(signed))
        lo = lo_obs if signed else 0.0
        span = hi_obs - lo
        if grid == "mse" and span > 0.0:
            span = mse_span(torch.cat(samples[name]), lo, span, levels)
        with torch.no_grad():
            if span > 0.0:
                step = math.log2(span / levels)
                aq.log2_step.fill_(step)
                aq.log2_range.fill_(step + bits)
                aq.offset.fill_(lo)
            else:
                aq.log2_step.fill_(0.0)
                aq.log2_range.fill_(0.0)
                aq.offset.fill_(lo)
                aq.pruned.fill_(True)
        aq._apply_flags()
        aq.observed_bits.fill_(math.inf)
        report[name] = {"min": lo_obs, "max": hi_obs, "signed": bool(signed), "pruned": span <= 0.0}
    return report


GRIDS = ("minmax", "mse")
MSE_SAMPLES_PER_BATCH = 16384  # inputs kept per layer and batch for the grid="mse" search


def mse_span(x: torch.Tensor, lo: float, span: float, levels: float, points: int = 100) -> float:
    """The clamp span ``a * span`` (``a`` in ``1/points .. 1``) whose grid ``lo + s*k``,
    ``s = a*span/levels``, ``k = 0..levels``, quantizes the sample ``x`` (1-D float) with the
    smallest mean squared error (round to nearest after clamping, as the quantizer's forward);
    ties go to the larger span."""
    x = x.double()
    best_err, best = math.inf, span
    for i in range(points, 0, -1):
        cand = span * i / points
        step = cand / levels
        q = torch.round((x.clamp(lo, lo + cand) - lo) / step) * step + lo
        err = float(((x - q) ** 2).mean())
        if err < best_err:
            best_err, best = err, cand
    return best


class _PooledChannelStats:
    """Running per-channel count, mean and sum of squared deviations (float64) of the inputs a
    BatchNorm sees, merged batch by batch (Chan et al.'s pairwise update: no cancellation)."""

    def __init__(self):
        self.count = 0
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor) -> None:
        """Merge one BatchNorm input ``x`` (N, C, *): channel dim 1, every other dim pooled."""
        dims = [d for d in range(x.dim()) if d != 1]
        x = x.detach().double()
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        mean = x.mean(dims)
        m2 = ((x - mean.view([-1 if d == 1 else 1 for d in range(x.dim())])) ** 2).sum(dims)
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader, *, num_batches: int = 100, device=None) -> int:
    """Recompute every BatchNorm's running mean/variance with the model's current weights.

    During QAT the running statistics are an exponential average over steps whose weights kept
    changing (at 1 bit whole channels flip sign late in training), so they can lag the final
    weights. This runs ``num_batches`` batches of ``loader`` through the model in training mode
    (the quantized layers run exactly as in training; no parameter changes, no gradients) and
    sets each BatchNorm's running mean and variance to the pooled statistics of every value its
    channel received: the mean, and the unbiased variance (``n - 1``), over all those batches
    together, as if they were one batch. BatchNorms without running statistics are left alone;
    when the loader yields nothing the statistics are reset (mean 0, variance 1). The model is
    put back in its previous mode. Returns the number of images used.

    ``loader`` should yield training images without augmentation (never the test set).
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    stats = [_PooledChannelStats() for _ in bns]
    hooks = [bn.register_forward_pre_hook(lambda _mod, inputs, st=st: st.add(inputs[0]))
             for bn, st in zip(bns, stats)]
    for bn in bns:
        bn.reset_running_stats()
    model.train()
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if i >= num_batches:
                break
            x = _batch_input(batch)
            if device is not None:
                x = x.to(device)
            model(x)
            seen += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for bn, st in zip(bns, stats):
        if st.count > 1:
            bn.running_mean.copy_(st.mean)
            bn.running_var.copy_(st.m2 / (st.count - 1))
    return seen
