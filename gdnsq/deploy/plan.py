"""Deploy plan compiler: any frozen model runs its quantized layers as fast integer segments.

    frozen = freeze(qmodel)           # the plan is attached: frozen(x) runs it
    frozen(x)                         # first call per input shape builds + checks a plan
    plan_report(frozen)               # segments: layer, kind, GEMM, folded, fallback reason
    with per_layer(frozen):           # the old per-layer path (the oracle)
        ref = frozen(x)

**Graph.** ``torch.fx`` traces the frozen model (``type(model).forward``) with the deployed layers
and torch.nn's standard modules as leaves. Submodules that do not trace (data-dependent control
flow: ``gdnsq.attention.QMultiheadAttention``, ``nn.TransformerEncoderLayer``'s fast-path checks;
torch.nn's own containers are leaves anyway) are found bottom-up and run as opaque calls; every
deployed layer inside them still runs on its own integer segment (its ``forward`` is swapped for
the segment's while the opaque call runs).

**Segments.** A deployed conv / linear with an activation quantizer (path int, bitplane or
binary) runs as: float32 input -> uint8 codes (``gdnsq_kernels.plan_ops.quantize``, bit for bit
``layer.float_codes``) -> exact int32 sums (``gdnsq_kernels.int_ops.int_conv2d`` on NHWC codes,
padded taps code 0; ``int_linear``; ``popcount_conv2d`` / ``popcount_linear`` for W1A1; chosen by
:func:`choose_gemm`) -> the epilogue ``(w_step s_a) S_kj + (w_min s_a) S_j + C`` in float64, rounded
once (``plan_ops.epilogue_float``; order of ``_DeployedBase._epilogue``, or that of the binary ops
for a layer on the ``binary`` path, so the plan equals the layer's own path bit for bit). Conv
outputs are float32 NHWC, i.e. ``channels_last`` NCHW tensors; ops whose result could depend on
the memory layout (pooling, reductions, FP convs, views, anything not in ``_LAYOUT_SAFE``) get a
contiguous copy, so every value equals the per-layer path's.

**Folding.** A deployed conv whose output flows only through per-channel element-wise modules
(eval BatchNorm, ReLU, ReLU6, Hardtanh, Identity, Dropout; ``F.relu``) into deployed convs with
identical activation quantizers never materialises that float tensor: its epilogue value ``y``
is counted against per-channel float32 thresholds (``plan_ops.epilogue_codes``) found by
bisection over the float32 order through the model's own modules and the quantizer
(``monotone_thresholds``) and checked at and next to every threshold, on random values and on
the layer's real output for the input that built the plan.

**Fallback.** Every segment is checked when its plan is built (the executor's output against
the layer's own forward on the real input, the fold thresholds as above); a failure, an
unsupported layer (weights > 7 bits, activations > 8 bits, a reduction whose int32 sums could
wrap) or a missing C++ build makes that segment (alone) run the per-layer path, with a
``warnings.warn`` naming the layer and the reason. Inputs off the CPU, floating inputs other than
float32, keyword arguments, training mode, and ``torch.compile`` / ``torch.export`` / fx tracing run
the whole per-layer forward. Plans are cached per input signature (shapes, dtypes, devices) and
dropped when a deployed layer's derived cache is (``load_state_dict``, ``.to()``, ``set_path``),
or by :func:`invalidate` after editing parameters in place. Forward hooks on a deployed layer
or an element-wise module (which a segment does not call) switch the model to the per-layer path
while they are registered, so they see every call.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layers import DeployedConv2d, DeployedLinear, _DeployedBase
from .runtime import PlanError, codes_from_thresholds, monotone_thresholds

__all__ = ["attach_plan", "detach_plan", "per_layer", "reference_forward", "plan_report", "format_plan_report",
           "invalidate", "choose_gemm", "PlanRunner", "PlanError"]

_TOKEN_KEY = "gdnsq_plan_token"
_FAST_PATHS = ("int", "bitplane", "binary")


# --------------------------------------------------------------------------------------------
# tracing


class _Tracer(fx.Tracer):
    """Leaves: the deployed layers, torch.nn's standard modules, and ``opaque`` submodules."""

    def __init__(self, opaque=frozenset()):
        super().__init__()
        self.opaque = set(opaque)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _DeployedBase) or qualname in self.opaque or super().is_leaf_module(m, qualname)


def _traces(root: nn.Module, module: nn.Module, prefix: str, opaque: set) -> bool:
    inner = {n[len(prefix) + 1:] if prefix else n for n in opaque if not prefix or n.startswith(prefix + ".")}
    try:
        _Tracer(inner).trace(module)
        return True
    except Exception:  # any tracing failure: data-dependent control flow, unsupported ops
        return False


def trace(model: nn.Module) -> tuple:
    """``(graph, opaque names)``: the fx graph of ``model`` and the qualified names of the
    submodules that had to become opaque leaves (found bottom-up); ``(None, ...)`` when even
    that does not trace."""
    opaque: set = set()
    tracer = _Tracer()
    try:
        return tracer.trace(model), opaque
    except Exception:
        pass

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            qual = f"{prefix}.{name}" if prefix else name
            if _Tracer().is_leaf_module(child, qual):  # deployed layers, torch.nn's own modules
                continue
            if not _traces(model, child, qual, opaque):
                visit(child, qual)
                if not _traces(model, child, qual, opaque):
                    opaque.add(qual)

    visit(model, "")
    try:
        return _Tracer(opaque).trace(model), opaque
    except Exception:
        return None, opaque


# --------------------------------------------------------------------------------------------
# GEMM choice and per-layer executor


# W1A1 convs with at least this many input channels run on ``popcount_conv2d``: measured in
# benchmarks/results/int_ops.md (1 thread, batch 1), popcount beats the uint8 conv from 64
# channels (1.5x-4x on ResNet-18 / CIFAR 64-channel convs) and loses at 16 and 32 channels, where
# its per-pixel word packing and 64-bit words half empty cost more than the bytes it saves.
POPCOUNT_CONV_MIN_CHANNELS = 64


def choose_gemm(layer: _DeployedBase) -> str:
    """The integer GEMM of ``layer``'s segment: ``popcount_conv2d`` for W1A1 convs with groups 1
    and >= ``POPCOUNT_CONV_MIN_CHANNELS`` input channels, else ``int_conv2d`` (bytes);
    ``popcount_linear`` for 1-bit linear layers, else ``int_linear``."""
    c = layer.config
    one_bit = c["weight_bits"] == 1 and c.get("act_bits") == 1
    if layer.kind == "linear":
        return "popcount_linear" if one_bit else "int_linear"
    groups = int(c.get("groups", 1))
    if one_bit and groups == 1 and int(c["weight_shape"][1]) >= POPCOUNT_CONV_MIN_CHANNELS:
        return "popcount_conv2d"
    return "int_conv2d"


def _unsupported(layer: _DeployedBase):
    """Why ``layer`` cannot run as a segment (None when it can)."""
    c = layer.config
    if c.get("act_bits") is None:
        return "no activation quantizer (A32: dequant path)"
    if c["path"] not in _FAST_PATHS:
        return f"path {c['path']!r} requested (float32 ops on dequantized codes)"
    if not 1 <= int(c["weight_bits"]) <= 7:
        return f"{c['weight_bits']}-bit weights do not fit the int8 GEMM"
    if not 1 <= int(c["act_bits"]) <= 8:
        return f"{c['act_bits']}-bit activations do not fit the uint8 GEMM"
    from gdnsq_kernels.int_ops import MAX_EXACT_K

    reduction = math.prod(c["weight_shape"][1:])
    if reduction > MAX_EXACT_K:
        return f"reduction of {reduction} taps could wrap the int32 sums"
    if any(not bool(torch.isfinite(t)) for t in (layer.act_log2_step, layer.act_log2_range, layer.act_offset)):
        return "non-finite activation quantizer parameters"
    return None


class LayerExec:
    """One deployed layer as an integer segment (float32 or codes in, float32 or codes out).

    Built from the layer's buffers (packed weights, epilogue scales, quantizer bounds); the
    constant term comes from the layer's own cached ``_const`` so it is the reference's.
    """

    def __init__(self, layer: _DeployedBase, name: str, isa: str | None = None):
        from gdnsq_kernels import int_ops, plan_ops

        self.layer, self.name = layer, name
        self.ops = plan_ops.ops(isa)
        self.int_ext = int_ops.load_extension(isa)
        c = layer.config
        self.gemm = choose_gemm(layer)
        self.order = 1 if c["path"] == "binary" else 0
        with torch.no_grad():
            s = torch.exp2(layer.act_log2_step.float().reshape(()))
            q = torch.exp2(layer.act_log2_range.float().reshape(()))
            lo = layer.act_offset.float().reshape(())
            self.s, self.lo, self.hi = float(s), float(lo), float(lo + q - s)  # float_codes' float32 ops
            s_a = torch.exp2(layer.act_log2_step.float()).double()  # as _DeployedBase._epilogue
            self.a = (layer.weight_step.double() * s_a).reshape(-1).contiguous()
            self.b = (layer.weight_min.double() * s_a).reshape(-1).contiguous()
            k = layer.weight_codes()
            self.out_ch = int(c["weight_shape"][0])
            if layer.kind == "conv2d":
                self.stride, self.padding, self.dilation, self.groups = (list(v) if isinstance(v, tuple) else v
                                                                         for v in layer._geom())
                self.kernel = [int(k.shape[2]), int(k.shape[3])]
                k_ohwi = k.permute(0, 2, 3, 1).to(torch.int8).contiguous()
                w = int_ops.pack_int_conv_weight(k_ohwi, self.groups)
                self.w_packed, self.w_shape = w.packed, list(w.shape)
                if self.gemm == "popcount_conv2d":  # 1-bit weight codes are 0/1: S_kj = sum x & w
                    self.w_pop = int_ops.pack_popcount_conv_weight(k_ohwi)
                self.pointwise = self.kernel == [1, 1] and self.stride == [1, 1] and self.padding == [0, 0]
            else:
                self.groups = 1
                self.in_f = int(k.shape[1])
                if self.gemm == "popcount_linear":
                    bits = self.ops.pack_bits(k.to(torch.uint8).contiguous())
                    self.w_pop = int_ops.pack_popcount_weight(bits, self.in_f)
                else:
                    self.w_packed = int_ops.pack_int_linear_weight(k.to(torch.int8).contiguous()).packed
        self._consts: dict = {}

    # -- pieces ------------------------------------------------------------------------------
    def quant_params(self) -> tuple:
        return (self.s, self.lo, self.hi)

    def _const(self, H: int, W: int) -> torch.Tensor:
        key = (H, W)
        if key not in self._consts:
            probe = torch.empty(0, 1, H, W)
            cst = self.layer._const(probe)  # float64 (1, O, Ho, Wo)
            self._consts[key] = cst[0].permute(1, 2, 0).reshape(-1, self.out_ch).contiguous()
        return self._consts[key]

    def quantize(self, x: torch.Tensor):
        """``(codes, sums)`` of a float32 input: conv (N, H, W, C) uint8 + (N, H, W, G) int32,
        linear (M, K) uint8 + (M, 1) int32."""
        if self.layer.kind == "conv2d":
            if not x.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
            N, C, H, W = x.shape
            codes, sums = self.ops.quantize(x.permute(0, 2, 3, 1).reshape(N * H * W, C), self.s, self.lo, self.hi,
                                            self.groups)
            return codes.view(N, H, W, C), sums.view(N, H, W, self.groups)
        x2 = x.reshape(-1, self.in_f)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return self.ops.quantize(x2, self.s, self.lo, self.hi, 1)

    def sums(self, codes: torch.Tensor, csum: torch.Tensor):
        """``(acc int32 (M, O), S_j int32 (M, G), cst float64 (P, O), out shape)``."""
        if self.layer.kind == "conv2d":
            N, H, W, C = codes.shape
            if self.gemm == "popcount_conv2d":
                # 1-bit codes are 0/1: padded taps (code 0) add nothing to either sum, and the
                # kernel's window sums S are S_j (groups 1), so no box sum is needed
                bits = self.int_ext.pack_channel_bits(codes.view(-1, C)).view(N, H, W, -1)
                acc, sj = self.int_ext.popcount_conv2d(bits, self.w_pop.packed, list(self.w_pop.shape), self.stride,
                                                       self.padding, self.dilation, self.w_pop.tight,
                                                       not self.pointwise)
                if self.pointwise:
                    sj = csum
                return acc.view(-1, self.out_ch), sj.reshape(-1, 1), self._const(H, W), (N, acc.shape[1], acc.shape[2])
            acc = self.int_ext.conv2d(codes, self.w_packed, self.w_shape, self.stride, self.padding, self.dilation,
                                      self.groups, 0)
            Ho, Wo = acc.shape[1], acc.shape[2]
            sj = csum if self.pointwise else self.ops.box_sum(csum, self.kernel, self.stride, self.padding,
                                                             self.dilation)
            return acc.view(-1, self.out_ch), sj.view(-1, self.groups), self._const(H, W), (N, Ho, Wo)
        if self.gemm == "popcount_linear":
            acc = self.int_ext.popcount_linear(self.ops.pack_bits(codes), self.w_pop.packed, self.out_ch, self.in_f,
                                               False)
        else:
            acc = self.int_ext.linear(codes, self.w_packed, self.out_ch)
        if "lin_const" not in self._consts:
            self._consts["lin_const"] = self.layer._const(torch.device("cpu")).reshape(1, -1).contiguous()
        return acc, csum, self._consts["lin_const"], None

    def finish_float(self, acc, sj, cst, shape, lead=None) -> torch.Tensor:
        y = self.ops.epilogue_float(acc, sj, self.a, self.b, cst, self.order)
        if shape is not None:
            N, Ho, Wo = shape
            return y.view(N, Ho, Wo, self.out_ch).permute(0, 3, 1, 2)  # channels_last NCHW
        return y.view(*lead, self.out_ch)

    # -- entry points ------------------------------------------------------------------------
    def run_float(self, x: torch.Tensor) -> torch.Tensor:
        """float32 in -> float32 out (the layer's forward, fast); other inputs: the layer's own."""
        if not self._ok_input(x):
            return type(self.layer).forward(self.layer, x)
        lead = x.shape[:-1]
        codes, csum = self.quantize(x)
        return self.finish_float(*self.sums(codes, csum), lead=lead)

    def _ok_input(self, x) -> bool:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        if self.layer.kind == "conv2d":
            return x.dim() == 4 and x.shape[1] == self.w_shape[3] * self.groups and x.shape[0] > 0
        return x.dim() >= 1 and x.shape[-1] == self.in_f and x.numel() > 0


@dataclass
class _Fold:
    """A producer conv whose epilogue emits the consumers' codes through thresholds."""

    producer: str
    chain: list                      # fx nodes of the element-wise chain
    consumers: list                  # fx nodes of the consumer layers
    thr_t: torch.Tensor = None       # (L, O) signed thresholds (kernel layout)
    sign: torch.Tensor = None        # (O,)
    thr: torch.Tensor = None         # (O, L)
    direction: torch.Tensor = None
    fns: list = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# layout: which ops give the same values on channels_last inputs


def _bn_layout_safe() -> bool:
    return _bn_layout_check()


@functools.lru_cache(maxsize=1)
def _bn_layout_check() -> bool:
    """Whether this torch build's eval BatchNorm2d gives the same values on channels_last and
    contiguous inputs, odd sizes included (checked once per process)."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(19).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(19, generator=g))
        bn.bias.copy_(torch.randn(19, generator=g))
        bn.running_mean.copy_(torch.randn(19, generator=g))
        bn.running_var.copy_(torch.rand(19, generator=g) + 0.1)
        x = torch.randn(2, 19, 7, 5, generator=g) * 3
        return torch.equal(bn(x), bn(x.contiguous(memory_format=torch.channels_last)))


_SAFE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.Flatten)
_SAFE_FUNCTIONS = {operator.add, operator.iadd, operator.getitem, getattr, torch.add, F.relu, torch.relu, F.relu6,
                   F.hardtanh, torch.flatten, F.max_pool2d, F.pad, torch.cat}
_SAFE_METHODS = {"relu", "relu_", "flatten", "size", "dim", "add", "add_", "__getitem__"}


def _layout_safe(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.BatchNorm2d) and not m.training:
            return _bn_layout_safe()
        return isinstance(m, _SAFE_MODULES) and not (isinstance(m, nn.Dropout) and m.training)
    if node.op == "call_function":
        return node.target in _SAFE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _SAFE_METHODS
    return False


def _is_max_pool(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.MaxPool2d)
    return node.op == "call_function" and node.target is F.max_pool2d


def _to_channels_last(x):
    """A channels_last copy of a 4-D tensor (same values), anything else as is."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _contig(x):
    """A contiguous copy of a channels_last 4-D tensor (values unchanged), anything else as is."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous():
        return x.contiguous()
    return x


# --------------------------------------------------------------------------------------------
# folding: element-wise chains


_CHAIN_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Dropout)
_CHAIN_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh}
_CHAIN_METHODS = {"relu"}


def _chain_fn(node: fx.Node, modules: dict):
    """The per-channel element-wise function of ``node`` on its first argument, or None."""
    if not node.args or any(isinstance(a, fx.Node) for a in node.args[1:]) or \
            any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    if node.op == "call_module":
        m = modules[node.target]
        if not isinstance(m, _CHAIN_MODULES) or len(node.args) != 1 or node.kwargs:
            return None
        if isinstance(m, nn.BatchNorm2d) and (m.training or not m.track_running_stats or m.running_var is None):
            return None
        if isinstance(m, nn.Dropout) and m.training:
            return None
        return m
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("inplace", None)
    if node.op == "call_function" and node.target in _CHAIN_FUNCTIONS:
        return lambda t, f=node.target: f(t, *rest, **kwargs)
    if node.op == "call_method" and node.target in _CHAIN_METHODS:
        return lambda t, name=node.target: getattr(t, name)(*rest, **kwargs)
    return None


def _same_quantizer(a: _DeployedBase, b: _DeployedBase) -> bool:
    return all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("act_log2_step", "act_log2_range", "act_offset"))


def _probe_values(thr: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """(m, C) probe matrix: column c holds channel c's thresholds and their float neighbours,
    shared random and boundary values, and the channel's real values (``extra`` (n, C))."""
    C = thr.shape[0]
    t = torch.where(torch.isfinite(thr), thr, torch.zeros(()))
    down = torch.nextafter(t, torch.tensor(-math.inf))
    up = torch.nextafter(t, torch.tensor(math.inf))
    g = torch.Generator().manual_seed(0)
    shared = torch.cat([torch.randn(2048, generator=g) * 4, torch.randn(256, generator=g) * 1e3,
                        torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38])])
    cols = [t.t(), down.t(), up.t(), shared.view(-1, 1).expand(-1, C)]
    if extra is not None and extra.numel():
        cols.append(extra[:65536].float())
    return torch.cat(cols).contiguous()


def fold_thresholds(fold: _Fold, consumer: _DeployedBase, channels: int):
    """Thresholds of ``codes(chain(y))`` per channel, by bisection through the model's modules."""
    params = (consumer.act_log2_step.float().reshape(()), consumer.act_log2_range.float().reshape(()),
              consumer.act_offset.float().reshape(()))
    from gdnsq_kernels.quantize.reference import activation_codes

    levels = 2 ** int(consumer.config["act_bits"]) - 1
    fns = fold.fns

    def chain(y):  # (C, m) -> (C, m) codes
        m = y.shape[1]
        v = y.t().reshape(m, channels, 1, 1).contiguous()
        for f in fns:
            v = f(v)
        return activation_codes(v, *params).reshape(m, channels).t()

    with torch.no_grad():
        thr, direction, _ = monotone_thresholds(chain, channels, levels)
    return thr, direction, params


def check_fold(fold: _Fold, consumer: _DeployedBase, captured: torch.Tensor | None) -> None:
    """Raise PlanError unless the thresholds give the chain's codes on the probe values, run
    through the modules in the layouts the plan and the reference use (channels_last and
    contiguous, several spatial sizes)."""
    from gdnsq_kernels.quantize.reference import activation_codes

    C = fold.thr.shape[0]
    extra = None if captured is None else captured.transpose(0, 1).reshape(C, -1).t()
    probe = _probe_values(fold.thr, extra)  # (m, C)
    want_codes = codes_from_thresholds(probe, fold.thr, fold.direction)
    params = (consumer.act_log2_step.float().reshape(()), consumer.act_log2_range.float().reshape(()),
              consumer.act_offset.float().reshape(()))
    m = probe.shape[0]
    with torch.no_grad():
        for side_h, side_w in ((1, 1), (7, 5)):
            per = side_h * side_w
            n = -(-m // per)
            padded = torch.cat([probe, torch.zeros(n * per - m, C)])
            y = padded.view(n, side_h, side_w, C).permute(0, 3, 1, 2)  # channels_last NCHW
            for layout in (y, y.contiguous()):
                v = layout
                for f in fold.fns:
                    v = f(v)
                got = activation_codes(v, *params).permute(0, 2, 3, 1).reshape(-1, C)[:m]
                if not torch.equal(got.to(want_codes.dtype), want_codes):
                    bad = int((got.to(want_codes.dtype) != want_codes).sum())
                    raise PlanError(f"fold thresholds disagree with the modules they replace on {bad} probe values")


# --------------------------------------------------------------------------------------------
# steps (fx call_function targets)


class _Step:
    """A callable fx target with a name (fx's code generation needs ``__name__``)."""

    def __init__(self, name: str, fn):
        self.__name__ = "gdnsq_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        self._fn = fn

    def __call__(self, *args):
        return self._fn(*args)


def _codes_in(ex: LayerExec):
    def run(pair):
        codes, csum = pair
        return ex.finish_float(*ex.sums(codes, csum))
    return run


def _codes_in_out(ex: LayerExec, fold: _Fold, groups_out: int):
    def run(inp):
        if isinstance(inp, tuple):
            codes, csum = inp
        else:
            codes, csum = ex.quantize(inp)
        acc, sj, cst, shape = ex.sums(codes, csum)
        q, qs = ex.ops.epilogue_codes(acc, sj, ex.a, ex.b, cst, ex.order, fold.thr_t, fold.sign, groups_out)
        N, Ho, Wo = shape
        return q.view(N, Ho, Wo, ex.out_ch), qs.view(N, Ho, Wo, groups_out)
    return run


class _Opaque:
    """An opaque submodule whose deployed layers run their segments during the call."""

    def __init__(self, module: nn.Module, execs: list):
        self.module, self.execs = module, execs

    def __call__(self, *args, **kwargs):
        for layer, ex in self.execs:
            layer.forward = ex.run_float
        try:
            return self.module(*args, **kwargs)
        finally:
            for layer, _ in self.execs:
                layer.__dict__.pop("forward", None)


# --------------------------------------------------------------------------------------------
# the plan of one input signature


@dataclass
class Segment:
    name: str
    kind: str
    gemm: str | None
    folded_into: list
    codes_in: bool
    fallback: str | None
    opaque: bool = False
    fused: str | None = None

    def as_dict(self) -> dict:
        return {"layer": self.name, "kind": self.kind, "gemm": self.gemm, "folded_into": list(self.folded_into),
                "codes_in": self.codes_in, "fallback": self.fallback, "inside_opaque": self.opaque,
                "fused": self.fused}


def _warn(name: str, reason: str) -> None:
    warnings.warn(f"gdnsq.deploy.plan: layer {name} runs the per-layer path ({reason})", RuntimeWarning,
                  stacklevel=4)


class Plan:
    """The compiled forward of one input signature: a ``GraphModule`` over the model's modules."""

    def __init__(self, model: nn.Module, graph: fx.Graph, opaque: set, args: tuple, isa: str | None):
        self.segments: list = []
        modules = dict(model.named_modules())
        deployed = {n: m for n, m in modules.items() if isinstance(m, _DeployedBase)}
        # 1. capture every deployed layer's first input and output on the real input (reference)
        cap_in, cap_out = {}, {}
        hooks = []
        for n, m in deployed.items():
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=n: cap_in.setdefault(n, a[0])))
            hooks.append(m.register_forward_hook(lambda mod, a, o, n=n: cap_out.setdefault(n, o)))
        try:
            with torch.no_grad():
                want = type(model).forward(model, *args)
        finally:
            for h in hooks:
                h.remove()
        # 2. executors, each checked against its layer on the captured input
        execs, self.fallbacks = {}, {}
        for n, m in deployed.items():
            reason = _unsupported(m)
            if reason is None and n not in cap_in:
                reason = "not reached by this input"
            if reason is None:
                try:
                    ex = LayerExec(m, n, isa)
                    check_executor(ex, cap_in[n], cap_out[n])
                    execs[n] = ex
                except Exception as exc:  # a failed build or check: this layer alone falls back
                    reason = f"segment check failed: {exc}"
                    if m.config.get("act_bits") is not None:
                        _warn(n, reason)
            self.fallbacks[n] = reason
        self.execs = execs
        # 3. folds
        call_nodes = [nd for nd in graph.nodes if nd.op == "call_module" and nd.target in execs]
        folds = {}
        for nd in call_nodes:
            if deployed[nd.target].kind != "conv2d":
                continue
            chain, cur = [], nd
            while len(cur.users) == 1:
                user = next(iter(cur.users))
                fn = _chain_fn(user, modules)
                if fn is None or user.args[0] is not cur:
                    break
                chain.append((user, fn))
                cur = user
            consumers = list(cur.users)
            if not consumers:
                continue
            ok = all(c.op == "call_module" and c.target in execs and deployed[c.target].kind == "conv2d"
                     and len(c.args) == 1 and not c.kwargs and c.args[0] is cur for c in consumers)
            if not ok:
                continue
            first = deployed[consumers[0].target]
            if not all(_same_quantizer(first, deployed[c.target]) for c in consumers):
                continue
            groups = {execs[c.target].groups for c in consumers}
            if len(groups) != 1:
                continue
            fold = _Fold(nd.target, [c for c, _ in chain], consumers, fns=[f for _, f in chain])
            try:
                out_ch = execs[nd.target].out_ch
                fold.thr, fold.direction, _ = fold_thresholds(fold, first, out_ch)
                check_fold(fold, first, cap_out.get(nd.target))
                from gdnsq_kernels.plan_ops import thresholds_for_kernel

                fold.thr_t, fold.sign = thresholds_for_kernel(fold.thr, fold.direction)
                fold.groups_out = groups.pop()
                folds[nd] = fold
            except Exception as exc:
                _warn(nd.target, f"not folded into {[c.target for c in consumers]}: {exc}")
                self.fallbacks.setdefault(nd.target + " (fold)", str(exc))
        # 4. the new graph
        new = fx.Graph()
        env: dict = {}
        removed = {c for f in folds.values() for c in f.chain}
        codes_from = {}  # chain-end node -> producer node (its value is a (codes, sums) pair)
        for nd, f in folds.items():
            end = f.chain[-1] if f.chain else nd
            codes_from[end] = nd
        tainted: set = set()
        seg_info = {}
        for nd in graph.nodes:
            if nd in removed:
                continue
            if nd.op == "call_module" and nd.target in execs:
                ex = execs[nd.target]
                src = nd.args[0]
                codes_in = src in codes_from
                fold = folds.get(nd)
                if fold is not None:
                    fn = _codes_in_out(ex, fold, fold.groups_out)
                elif codes_in:
                    fn = _codes_in(ex)
                else:
                    fn = ex.run_float
                arg = env[codes_from[src]] if codes_in else env[src]
                env[nd] = new.call_function(_Step(nd.target, fn), (arg,))
                if fold is None:
                    tainted.add(nd)
                seg_info[nd.target] = (fold, codes_in)
                continue
            if nd.op == "call_module" and any(isinstance(m, _DeployedBase) for m in modules[nd.target].modules()):
                mod = modules[nd.target]
                inner = [(m, execs[f"{nd.target}.{n}"]) for n, m in mod.named_modules()
                         if isinstance(m, _DeployedBase) and f"{nd.target}.{n}" in execs]
                if not isinstance(mod, _DeployedBase):
                    args = fx.node.map_arg(nd.args, lambda a: env[a])
                    kwargs = fx.node.map_arg(nd.kwargs, lambda a: env[a])
                    args = tuple(new.call_function(_contig, (a,)) if isinstance(a, fx.Node) and a in
                                 {env[t] for t in tainted} else a for a in args)
                    env[nd] = new.call_function(_Step(nd.target, _Opaque(mod, inner)), args, kwargs)
                    for n, _ in mod.named_modules():
                        if f"{nd.target}.{n}" in execs:
                            seg_info[f"{nd.target}.{n}"] = (None, False, True)
                    continue
            safe = _layout_safe(nd, modules) if nd.op != "output" else False
            tainted_new = {env[t] for t in tainted}
            if _is_max_pool(nd, modules) and nd.args and isinstance(nd.args[0], fx.Node) \
                    and nd.args[0] not in tainted:
                # max pooling gives the same values in either layout, and torch's NCHW kernel is
                # tens of times slower than its channels_last one: pool a channels_last copy
                env[nd.args[0]] = new.call_function(_to_channels_last, (env[nd.args[0]],))
                tainted.add(nd.args[0])
                tainted_new.add(env[nd.args[0]])

            def remap(a, safe=safe, tainted_new=tainted_new):
                v = env[a]
                if not safe and v in tainted_new:
                    return new.call_function(_contig, (v,))
                return v

            env[nd] = new.node_copy(nd, remap)
            if safe and any(isinstance(a, fx.Node) and a in tainted for a in nd.all_input_nodes):
                tainted.add(nd)
        new.lint()
        self.gm = fx.GraphModule(model, new)
        self.folds = folds
        # 5. pattern fusion: a CIFAR ResNet trunk on the fused runtime (one C++ call)
        self.fused, self.fused_reason, fused_layers = _fuse_cifar_trunk(model, args, execs, cap_in, cap_out, want,
                                                                        isa)
        for n, m in deployed.items():
            info = seg_info.get(n)
            fold = info[0] if info else None
            self.segments.append(Segment(
                n, m.kind, choose_gemm(m) if n in execs else None,
                [c.target for c in fold.consumers] if fold else [], bool(info and info[1]),
                None if n in execs else self.fallbacks.get(n), opaque=bool(info and len(info) > 2),
                fused="runtime_trunk" if n in fused_layers else None))

    def __call__(self, *args):
        with torch.no_grad():
            if self.fused is not None:
                return self.fused(*args)
            return self.gm(*args)


# --------------------------------------------------------------------------------------------
# pattern fusion: CIFAR ResNet trunks on the fused runtime (gdnsq.deploy.runtime)


class _FusedCifar:
    """A CIFAR ResNet's forward with its basic blocks in one fused runtime call: the stem and
    the classifier as ``CifarResNet.forward`` runs them (their deployed convs / linear on the
    plan's segments), the trunk as ``RuntimeModel.forward`` runs it."""

    def __init__(self, model: nn.Module, rt, stem, head):
        self.model, self.rt = model, rt
        self.stem = stem if stem is not None else model.conv1
        self.head = head if head is not None else model.linear
        # a segment's conv output is channels_last: bn1 gets a contiguous copy unless this
        # torch's BatchNorm gives the same values in both layouts
        self.stem_contig = stem is not None and not _bn_layout_safe()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        out = self.stem(x)
        if self.stem_contig:
            out = _contig(out)
        out = F.relu(m.bn1(out))
        z = self.rt.forward(out.permute(0, 2, 3, 1).contiguous())
        out = z.permute(0, 3, 1, 2).contiguous()  # NCHW again: pooling sums in the model's order
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)


def _fuse_cifar_trunk(model, args, execs, cap_in, cap_out, want, isa):
    """``(fused forward or None, reason it is not fused or None, names of the fused layers)``.

    Only a ``CifarResNet`` is tried (anything else: ``(None, None, set())``, no warning). Its
    trunk runs fused when ``gdnsq.deploy.runtime`` accepts it (``trunk_blocks``), every block
    conv is on the ``binary`` path (the runtime's epilogue order: it equals that path bit for
    bit, not the ``int`` path's order; other paths run the generic segments, no warning), and
    the fused logits equal the per-layer path's (``want``) on the input that builds the plan;
    otherwise a warning names the reason and the generic segments run.
    """
    from gdnsq.models.resnet_cifar import CifarResNet

    if not isinstance(model, CifarResNet):
        return None, None, set()
    from .runtime import _Plan as TrunkPlan, trunk_blocks

    names = [f"{stage}.{i}" for stage in ("layer1", "layer2", "layer3") for i in range(len(getattr(model, stage)))]
    try:
        blocks = trunk_blocks(model)
        if len(args) != 1 or args[0].dim() != 4:
            raise PlanError("the input is not one (N, C, H, W) image batch")
        convs = [f"{n}.conv{j}" for n in names for j in (1, 2)]
        off = [c for c in convs if model.get_submodule(c).config["path"] != "binary"]
        if off:  # a deliberate configuration, not a failure: recorded, no warning
            return None, (f"trunk convs {off[:2]}{'...' if len(off) > 2 else ''} are not on the binary path (the "
                          "runtime's epilogue order)"), set()
        if convs[0] not in cap_in:
            raise PlanError("the trunk is not reached by this input")
        H, W = cap_in[convs[0]].shape[-2:]
        examples = {i: (cap_out[f"{n}.conv1"], cap_out[f"{n}.conv2"]) for i, n in enumerate(names)}
        from gdnsq_kernels.cpu_deploy import default_isa

        trunk = TrunkPlan(blocks, int(H), int(W), isa or default_isa(), examples)
        stem, head = execs.get("conv1"), execs.get("linear")
        fused = _FusedCifar(model, trunk.rt, stem.run_float if stem else None, head.run_float if head else None)
        with torch.no_grad():
            got = fused(*args)
        if got.shape != want.shape or not torch.equal(got, want):
            raise PlanError("the fused trunk's logits differ from the per-layer path's")
        return fused, None, set(convs)
    except Exception as exc:  # PlanError, a failed C++ build: the generic segments run
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, PlanError) else str(exc)
        warnings.warn(f"gdnsq.deploy.plan: the CIFAR ResNet trunk runs generic segments, not the fused runtime "
                      f"({reason})", RuntimeWarning, stacklevel=4)
        return None, reason, set()


def check_executor(ex: LayerExec, x: torch.Tensor, want: torch.Tensor) -> None:
    """Raise PlanError unless the segment reproduces the layer's output on ``x`` bit for bit."""
    if not ex._ok_input(x):
        raise PlanError(f"input {x.dtype} {tuple(x.shape)} on {x.device} is not a float32 CPU tensor of the "
                        "layer's shape")
    with torch.no_grad():
        got = ex.run_float(x)
    if got.shape != want.shape or not torch.equal(got, want):
        raise PlanError("the segment's output differs from the layer's own forward")


# --------------------------------------------------------------------------------------------
# the runner attached to a frozen model


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        if compiler.is_compiling():
            return True
        is_exporting = getattr(compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
    from torch.fx import _symbolic_trace

    # is_fx_tracing() also answers for export (and logs a warning saying so): prefer the narrow one
    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return check()


class PlanRunner:
    """The non-module object a planned model keeps (``model.gdnsq_plan``): plans per input
    signature, the traced graph, the per-layer switch. Not thread-safe; inference only."""

    def __init__(self, isa: str | None = None):
        self.isa = isa
        self.plans: dict = {}
        self.disabled = 0
        self._graph = None
        self._opaque = None
        self._tokens = None
        self._bypassed = []
        self.last_plan = None

    def __deepcopy__(self, memo):
        return PlanRunner(self.isa)

    def __getstate__(self):
        return {"isa": self.isa}

    def __setstate__(self, state):
        self.__init__(state.get("isa"))

    def invalidate(self) -> None:
        self.plans = {}
        self._graph = self._opaque = self._tokens = None
        self.last_plan = None

    def _fresh(self, model: nn.Module) -> bool:
        tokens = self._tokens
        if tokens is None:
            return False
        return all(layer._cache.get(_TOKEN_KEY) is tok for layer, tok in tokens)

    def _hooked(self) -> bool:
        """Whether a module the plan does not call (a deployed layer, a folded chain module) or
        every module has forward hooks: they must see their calls, so the per-layer path runs."""
        mod = nn.modules.module
        if mod._global_forward_hooks or mod._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._bypassed)

    def _stamp(self, model: nn.Module) -> None:
        tokens = []
        for m in model.modules():
            if isinstance(m, _DeployedBase):
                tok = object()
                m._cache[_TOKEN_KEY] = tok
                tokens.append((m, tok))
        self._tokens = tokens
        self._bypassed = [m for m, _ in tokens]
        for m in model.modules():
            if isinstance(m, _CHAIN_MODULES):
                self._bypassed.append(m)

    def run(self, model: nn.Module, args: tuple, kwargs: dict):
        if self.disabled or kwargs or model.training or not self._eligible(args):
            return type(model).forward(model, *args, **kwargs)
        if not self._fresh(model):
            self.invalidate()
            self._stamp(model)
        if self._hooked():
            return type(model).forward(model, *args)
        key = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("obj", repr(a))
                    for a in args)
        plan = self.plans.get(key)
        if plan is None:
            if self._graph is None:
                self._graph, self._opaque = trace(model)
            if self._graph is None:
                warnings.warn("gdnsq.deploy.plan: the model does not trace; running the per-layer path",
                              RuntimeWarning, stacklevel=3)
                self.plans[key] = plan = False
            else:
                try:
                    plan = Plan(model, self._graph, self._opaque, args, self.isa)
                except Exception as exc:  # the whole plan failed: this signature runs per layer
                    warnings.warn(f"gdnsq.deploy.plan: no plan for input {key}: {type(exc).__name__}: {exc}; "
                                  "running the per-layer path", RuntimeWarning, stacklevel=3)
                    plan = False
                self.plans[key] = plan
            self._stamp_keep(model)
        if plan is False:
            return type(model).forward(model, *args)
        self.last_plan = plan
        return plan(*args)

    def _stamp_keep(self, model):
        # building a plan may have refilled the layers' caches; the tokens stay in them
        for layer, tok in self._tokens:
            layer._cache[_TOKEN_KEY] = tok

    @staticmethod
    def _eligible(args: tuple) -> bool:
        if not args:
            return False
        for a in args:
            if isinstance(a, torch.Tensor):
                if type(a) is not torch.Tensor or a.device.type != "cpu" or a.requires_grad or not a.numel():
                    return False
                if a.is_floating_point() and a.dtype != torch.float32:
                    return False
        return any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)

    def report(self) -> list:
        """One dict per deployed layer of the most recent plan (empty before the first call)."""
        plan = self.last_plan
        return [s.as_dict() for s in plan.segments] if plan else []


def _make_forward(cls_forward):
    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        runner = self.__dict__.get("gdnsq_plan")
        if runner is None or _tracing():
            return cls_forward(self, *args, **kwargs)
        return runner.run(self, args, kwargs)
    return forward


def attach_plan(model: nn.Module, isa: str | None = None) -> nn.Module:
    """Make ``model`` (a frozen model) run its plan on every call; returns ``model``.

    Stores a :class:`PlanRunner` as ``model.gdnsq_plan`` (not a module: the state dict is
    unchanged) and overrides the instance's ``forward`` (``copy.deepcopy`` rebinds it to the copy).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isa is not None:
        from gdnsq_kernels.cpu_deploy import ISAS

        if isa not in ISAS:
            raise ValueError(f"isa must be one of {ISAS} or None, got {isa!r}")
    model.gdnsq_plan = PlanRunner(isa)
    model.forward = types.MethodType(_make_forward(type(model).forward), model)
    return model


def detach_plan(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_plan`: the model runs its class ``forward`` (the per-layer path)."""
    model.__dict__.pop("gdnsq_plan", None)
    model.__dict__.pop("forward", None)
    return model


def invalidate(model: nn.Module) -> None:
    """Drop ``model``'s plans (after editing its parameters or buffers in place)."""
    runner = model.__dict__.get("gdnsq_plan")
    if runner is not None:
        runner.invalidate()


@contextlib.contextmanager
def per_layer(model: nn.Module):
    """Within the block, ``model(x)`` runs the per-layer path (the plan's oracle)."""
    runner = model.__dict__.get("gdnsq_plan")
    if runner is not None:
        runner.disabled += 1
    try:
        yield model
    finally:
        if runner is not None:
            runner.disabled -= 1


def reference_forward(model: nn.Module, *args, **kwargs):
    """``model``'s output on the per-layer path (its class ``forward``), whatever is attached."""
    return type(model).forward(model, *args, **kwargs)


def plan_report(model: nn.Module) -> list:
    """Segments of the model's most recent plan: ``layer``, ``kind``, ``gemm``, ``folded_into``,
    ``codes_in``, ``fallback`` (None: the segment runs fast), ``inside_opaque``. Empty when no
    plan is attached or none was built yet."""
    runner = model.__dict__.get("gdnsq_plan")
    return runner.report() if runner is not None else []


def format_plan_report(model: nn.Module) -> str:
    """Markdown table of :func:`plan_report`."""
    lines = ["| layer | kind | GEMM | folded into | codes in | fallback |", "|---|---|---|---|---|---|"]
    for r in plan_report(model):
        lines.append(f"| {r['layer']} | {r['kind']} | {r['gemm'] or '-'} | {', '.join(r['folded_into']) or '-'} | "
                     f"{'yes' if r['codes_in'] else 'no'} | {r['fallback'] or '-'} |")
    return "\n".join(lines)
