"""Fused bit-packed runtime for the quantized trunk of a frozen CIFAR ResNet.

    frozen = freeze(student)                 # or load("model.gdnsq")
    fast = runtime(frozen)                   # same logits, one C++ call for the whole trunk
    logits = fast(images)

The stem (``conv1``/``bn1``/ReLU), pooling and classifier run as PyTorch ops, in the order the
model's own ``forward`` uses. Every basic block (``conv1 -> bn1 -> ReLU -> conv2 -> bn2 ->
+ shortcut -> ReLU``, both convs deployed with activation quantizers) runs in
``gdnsq_kernels/csrc/deploy_runtime.cpp`` on NHWC data from one plan built per input size:

* entry / block-to-block: the per-tensor activation code is monotone in its input, so it is
  ``#{l : x >= t_l}`` for float32 thresholds ``t_l`` = the smallest float whose code is >= l,
  found by bisection over the float32 order through ``gdnsq_kernels.quantize.reference.activation_codes``;
* inside a block: ``code(relu(bn1(y)))`` is monotone in conv1's output ``y`` per channel
  (increasing or decreasing with the BN scale's sign), so it is folded into per-channel
  thresholds the same way, by bisection through the model's own ``bn1`` module, ``F.relu`` and
  the code function: the codes match by construction, the activation between the two convs
  is never a float;
* ``bn2``: ``fmaf(y, alpha, beta)``, the formula PyTorch's CPU BatchNorm evaluates
  (``alpha = rsqrt(var + eps) * weight``, ``beta = bn2(0)``);
* the convolutions: exact integer sums in one of two input formats per conv (``choose_format``,
  a measured per-ISA rule): bit-plane popcount on packed codes, or uint8 x int8 codes with
  AVX-512 VNNI ``vpdpbusd`` ("bytes"); then the exact {0,1} affine corrections of
  ``gdnsq_kernels.binary_conv2d`` (float64 epilogue in the same order, rounded once).

Every fused step is checked against the PyTorch op it replaces when the plan is built
(thresholds at and next to every boundary, the BN formula on random and boundary values); when
a check fails, or the model is not a CIFAR ResNet of deployed blocks, the wrapper warns and runs
the frozen model's per-layer path instead (``RuntimeModel.fallback_reason``).

Every frozen model (this one included) already runs the generic deploy plan by default
(:mod:`gdnsq.deploy.plan`, attached by ``freeze`` / ``load``), which fuses a CIFAR ResNet trunk
on binary-path convs into this runtime itself (``plan._fuse_cifar_trunk``); ``runtime(frozen)``
stays the explicit wrapper (any path, formats forced), and its fallback is the frozen model's plan.
``monotone_thresholds`` / ``codes_from_thresholds`` here are shared with the plan's folding.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gdnsq_kernels.quantize.reference import activation_codes

from .layers import DeployedConv2d, DropsDerivedOnLoad

_FMAX = 3.4028234663852886e38
_KEY_MAX = 0x7F7FFFFF  # ordered key of the largest finite float32


class PlanError(RuntimeError):
    """The model cannot run on the fused runtime (the wrapper falls back to per-layer ops)."""


# --------------------------------------------------------------------------------------------
# float32 <-> ordered integer keys (key order == float order; -0.0 and +0.0 share key 0)


def float_to_key(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def key_to_float(k: torch.Tensor) -> torch.Tensor:
    bits = torch.where(k >= 0, k, (-k) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)
    return bits.to(torch.int32).view(torch.float32)


def monotone_thresholds(fn, rows: int, levels: int) -> tuple:
    """Thresholds of a per-row monotone integer function of one float32.

    ``fn(y)`` maps float32 ``(rows, m)`` to integer codes ``(rows, m)``, each row monotone
    (nondecreasing or nonincreasing) in ``y`` over the finite floats. Returns ``thr`` float32
    ``(rows, levels)`` and ``direction`` int8 ``(rows,)`` such that, for every finite ``y``,
    ``fn(y) = #{l : y >= thr[l]}`` (direction +1) or ``#{l : y <= thr[l]}`` (-1) for codes in
    ``0..levels``; also returns ``fn_min`` (fn at the low end), which the runtime requires to be 0. A level never reached is NaN
    (compares false), one always reached is -inf/+inf.
    """
    lo_val = torch.full((rows, 1), -_FMAX)
    hi_val = torch.full((rows, 1), _FMAX)
    f_lo, f_hi = fn(lo_val).reshape(rows), fn(hi_val).reshape(rows)
    direction = torch.where(f_hi >= f_lo, 1, -1).to(torch.int8)
    sign = direction.to(torch.float32).view(rows, 1)

    def g(y):  # nondecreasing in y for every row
        return fn(y * sign)

    g_min = torch.minimum(f_lo, f_hi).view(rows, 1)
    g_max = torch.maximum(f_lo, f_hi).view(rows, 1)
    level = torch.arange(1, levels + 1).view(1, levels) + g_min * 0
    lo = torch.full((rows, levels), -_KEY_MAX, dtype=torch.int64)
    hi = torch.full((rows, levels), _KEY_MAX, dtype=torch.int64)
    # invariant: g(lo) < level <= g(hi) where the level is reachable and not always reached
    for _ in range(40):
        if bool((hi - lo <= 1).all()):
            break
        mid = lo + (hi - lo) // 2
        ok = g(key_to_float(mid)) >= level
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    t = key_to_float(hi)
    t = torch.where(g_min >= level, torch.tensor(-math.inf), t)  # always reached
    t = torch.where(g_max < level, torch.tensor(math.nan), t)  # never reached
    thr = t * sign  # decreasing rows: code counts y <= -t
    return thr.contiguous(), direction, g_min.view(rows)


def codes_from_thresholds(y: torch.Tensor, thr: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Reference of the runtime's compare-and-count: y (M, C), thr (C, L), direction (C,)."""
    ge = (y.unsqueeze(-1) >= thr.unsqueeze(0)).sum(-1)
    le = (y.unsqueeze(-1) <= thr.unsqueeze(0)).sum(-1)
    return torch.where(direction.view(1, -1) > 0, ge, le)


def _neighbours(t: torch.Tensor) -> torch.Tensor:
    """t, the next float below and the next float above (finite entries only)."""
    finite = t[torch.isfinite(t)]
    return torch.cat([finite, torch.nextafter(finite, torch.tensor(-math.inf)),
                      torch.nextafter(finite, torch.tensor(math.inf))])


# --------------------------------------------------------------------------------------------
# plan pieces


def _act_params(layer: DeployedConv2d):
    return (layer.act_log2_step.float().reshape(()), layer.act_log2_range.float().reshape(()),
            layer.act_offset.float().reshape(()))


def _levels(layer: DeployedConv2d) -> int:
    return 2 ** int(layer.config["act_bits"]) - 1


def per_tensor_thresholds(layer: DeployedConv2d) -> torch.Tensor:
    """float32 (levels,) thresholds of ``layer``'s activation codes, checked at every boundary."""
    params = _act_params(layer)
    lv = _levels(layer)
    thr, direction, g_min = monotone_thresholds(lambda y: activation_codes(y, *params), 1, lv)
    if int(direction[0]) != 1 or int(g_min[0]) != 0:
        raise PlanError("activation codes are not nondecreasing from 0")
    thr = thr.view(lv)
    probe = torch.cat([_neighbours(thr), torch.randn(4096) * 4, torch.tensor([0.0, -0.0, _FMAX, -_FMAX])])
    got = (probe.view(-1, 1) >= thr.view(1, -1)).sum(1)
    if not torch.equal(got, activation_codes(probe, *params).to(got.dtype)):
        raise PlanError("per-tensor thresholds disagree with activation_codes")
    return thr


def fused_bn_relu_thresholds(bn: nn.Module, next_layer: DeployedConv2d, example: torch.Tensor | None):
    """Per-channel thresholds of ``codes(relu(bn(y)))`` (next_layer's quantizer) on y (N, C, H, W)."""
    params = _act_params(next_layer)
    lv = _levels(next_layer)
    C = bn.num_features

    def chain(y):  # y (C, m) float32 -> codes (C, m), through the real modules
        m = y.shape[1]
        out = F.relu(bn(y.t().reshape(m, C, 1, 1).contiguous()))
        return activation_codes(out, *params).reshape(m, C).t()

    with torch.no_grad():
        thr, direction, g_min = monotone_thresholds(chain, C, lv)
        if bool((g_min != 0).any()):
            raise PlanError("fused BN/ReLU codes do not start at 0")
        # check in a real layout: every threshold and its neighbours, in every channel
        probe = torch.cat([_neighbours(thr), torch.randn(2048) * 8, torch.tensor([0.0, -0.0])])
        if example is not None:
            probe = torch.cat([probe, example.transpose(0, 1).reshape(-1)[:65536]])
        side = 8
        m = (probe.numel() + side * side - 1) // (side * side) * side * side
        probe = torch.cat([probe, torch.zeros(m - probe.numel())])
        y = probe.view(1, -1).expand(C, -1).t().reshape(-1, side, side, C).permute(0, 3, 1, 2).contiguous()
        want = activation_codes(F.relu(bn(y)), *params)  # (n, C, 8, 8)
        got = codes_from_thresholds(y.permute(0, 2, 3, 1).reshape(-1, C), thr, direction)
        if not torch.equal(got, want.permute(0, 2, 3, 1).reshape(-1, C).to(got.dtype)):
            raise PlanError("fused BN/ReLU thresholds disagree with the modules they replace")
    return thr, direction


def bn_affine(bn: nn.Module, ext, example: torch.Tensor | None):
    """(alpha, beta) float32 with ``bn(y) == fmaf(y, alpha, beta)``, checked."""
    if not isinstance(bn, nn.BatchNorm2d) or bn.training or not bn.track_running_stats or bn.running_var is None:
        raise PlanError("bn2 must be an eval-mode BatchNorm2d with running statistics")
    C = bn.num_features
    with torch.no_grad():
        w = bn.weight.float() if bn.weight is not None else torch.ones(C)
        alpha = (torch.rsqrt(bn.running_var.float() + bn.eps) * w).contiguous()
        beta = bn(torch.zeros(1, C, 1, 1)).reshape(C).contiguous()
        probe = torch.cat([torch.randn(4096) * 4, torch.randn(1024) * 1e3, torch.tensor([0.0, -0.0, 1.0, -1.0])])
        y = probe.view(-1, 1).expand(-1, C).contiguous()
        if example is not None:
            y = torch.cat([y, example.permute(0, 2, 3, 1).reshape(-1, C)[:16384]])
        want = bn(y.view(-1, C, 1, 1)).view(-1, C)
        got = ext.bn_fma(y.contiguous(), alpha, beta)
        if not torch.equal(got, want):
            raise PlanError("the fmaf BatchNorm formula disagrees with the BatchNorm module")
    return alpha, beta


FORMATS = ("packed", "bytes")
# Rule of the automatic format choice, per ISA build: a conv reads its input as bytes when
# act_bits * weight_bits >= this product (None: never), else as bit planes (popcount).
# Measured on ResNet-20 students, one thread, AMD Zen 4 (docs/runtime.md): with VNNI the bytes
# conv beats the popcount conv at every width (W1A1 included); the avx512 popcount build beats
# its plain-loop bytes conv even at W4A4; on avx2 the bytes conv wins at W4A4 only.
BYTES_MIN_BITS_PRODUCT = {"avx512vnni": 1, "avx512": None, "avx2": 16, "scalar": 16}


def bytes_feasible(layer: DeployedConv2d) -> bool:
    """Whether the bytes format holds ``layer`` exactly (uint8 x int8 codes, int32 sums)."""
    c = layer.config
    O, Cin, kh, kw = c["weight_shape"]
    bw, ba = int(c["weight_bits"]), int(c.get("act_bits") or 0)
    if not (1 <= ba <= 8 and 1 <= bw <= 7):
        return False
    return kh * kw * Cin * (2**ba - 1) * (2**bw - 1) < 2**31


def choose_format(layer: DeployedConv2d, isa: str, forced: str | None = None) -> str:
    """``packed`` or ``bytes`` for the input of ``layer`` (``forced`` wins where feasible)."""
    if forced is not None:
        if forced not in FORMATS:
            raise ValueError(f"formats must be one of {FORMATS} or None, got {forced!r}")
        return forced if forced == "packed" or bytes_feasible(layer) else "packed"
    c = layer.config
    least = BYTES_MIN_BITS_PRODUCT.get(isa)
    if least is not None and bytes_feasible(layer) and int(c["weight_bits"]) * int(c["act_bits"]) >= least:
        return "bytes"
    return "packed"


def _bytes_weights(k: torch.Tensor, Opad: int) -> torch.Tensor:
    """int8 (kh*kw*Cp/4, Opad, 4): codes k (O, Cin, kh, kw) at k-index (i*kw + j)*Cp + c."""
    O, Cin, kh, kw = k.shape
    Cp = (Cin + 3) // 4 * 4
    rows = torch.zeros(O, kh, kw, Cp, dtype=torch.int64)
    rows[..., :Cin] = k.permute(0, 2, 3, 1)
    rows = rows.reshape(O, kh * kw * Cp // 4, 4).permute(1, 0, 2)
    out = torch.zeros(kh * kw * Cp // 4, Opad, 4, dtype=torch.int8)
    out[:, :O] = rows.to(torch.int8)
    return out.contiguous()


def conv_tables(layer: DeployedConv2d, H: int, W: int, fmt: str = "packed") -> dict:
    """Weight table (in ``fmt``), epilogue scales and the per-position constant of one conv."""
    c = layer.config
    O, Cin, kh, kw = c["weight_shape"]
    if int(c.get("groups", 1)) != 1 or tuple(c["dilation"]) != (1, 1):
        raise PlanError("only groups=1, dilation=1 convs run on the runtime")
    if c.get("act_bits") is None:
        raise PlanError("conv without an activation quantizer")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if fmt == "bytes" and not bytes_feasible(layer):
        raise PlanError("conv does not fit the bytes format (act_bits <= 8, weight_bits <= 7, int32 sums)")
    (sh, sw), (ph, pw) = tuple(c["stride"]), tuple(c["padding"])
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if Ho <= 0 or Wo <= 0:
        raise PlanError("input too small for the conv")
    bw, ba = int(c["weight_bits"]), int(c["act_bits"])
    K = kh * kw * Cin
    Kw = (K + 63) // 64
    Opad = (O + 15) // 16 * 16
    k = layer.weight_codes().to(torch.int64)  # (O, Cin, kh, kw)
    if fmt == "bytes":
        wT = _bytes_weights(k, Opad)
    else:
        rows = k.permute(0, 2, 3, 1).reshape(O, K)  # bit index (i*kw + j)*Cin + c
        shifts = torch.arange(64, dtype=torch.int64)
        planes = []
        for p in range(bw):
            bits = torch.zeros(O, Kw * 64, dtype=torch.int64)
            bits[:, :K] = (rows >> p) & 1
            words = (bits.view(O, Kw, 64) << shifts).sum(-1)  # distinct bits: sum == OR (wraps at bit 63)
            wt = torch.zeros(Kw, Opad, dtype=torch.int64)
            wt[:, :O] = words.t()
            planes.append(wt)
        wT = torch.stack(planes).contiguous()
    f64 = torch.float64
    s_a = torch.exp2(layer.act_log2_step.float()).to(f64)
    step, minimum = layer.weight_step.to(f64), layer.weight_min.to(f64)
    beta = layer.act_offset.to(f64)
    # real (in-image) taps per output position, as gdnsq_kernels.binary_conv2d
    valid = F.pad(torch.ones(1, 1, H, W, dtype=f64), (pw, pw, ph, ph))
    n_real = torch.zeros(1, 1, Ho, Wo, dtype=f64)
    k_real = torch.zeros(1, O, Ho, Wo, dtype=f64)
    tap_sum = k.sum(1).to(f64)  # (O, kh, kw): sum of codes over channels at each tap
    for i in range(kh):
        for j in range(kw):
            v = valid[..., i: i + sh * (Ho - 1) + 1: sh, j: j + sw * (Wo - 1) + 1: sw]
            n_real += v
            k_real += tap_sum[:, i, j].reshape(1, O, 1, 1) * v
    n_real = Cin * n_real
    s4, m4 = step.reshape(1, O, 1, 1), minimum.reshape(1, O, 1, 1)
    const = (s4 * beta) * k_real + (m4 * beta) * n_real
    if layer.bias is not None:
        const = const + layer.bias.to(f64).reshape(1, O, 1, 1)
    cst = const.reshape(O, Ho * Wo).t().contiguous()
    meta = [Cin, O, kh, kw, sh, sw, ph, pw, H, W, Ho, Wo, ba, bw, FORMATS.index(fmt)]
    return dict(meta=meta, wT=wT, s=(step * s_a).contiguous(), ms=(minimum * s_a).contiguous(), cst=cst,
                Ho=Ho, Wo=Wo, fmt=fmt)



# --------------------------------------------------------------------------------------------
# model structure


def trunk_blocks(model: nn.Module) -> list:
    """The basic blocks of a CIFAR ResNet whose convs are all deployed; raises PlanError."""
    from gdnsq.models.resnet_cifar import BasicBlock, CifarResNet, OptionAShortcut

    if not isinstance(model, CifarResNet) or type(model).forward is not CifarResNet.forward:
        raise PlanError(f"the runtime runs CifarResNet models, got {type(model).__name__}")
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    for b in blocks:
        if type(b) is not BasicBlock:
            raise PlanError(f"block {type(b).__name__} is not a BasicBlock")
        if not (isinstance(b.conv1, DeployedConv2d) and isinstance(b.conv2, DeployedConv2d)):
            raise PlanError("a block conv is not a deployed quantized conv")
        if b.conv1.config.get("act_bits") is None or b.conv2.config.get("act_bits") is None:
            raise PlanError("a block conv has no activation quantizer (A32)")
        if not isinstance(b.shortcut, (nn.Identity, OptionAShortcut)):
            raise PlanError("unknown shortcut")
        for bn in (b.bn1, b.bn2):
            if not isinstance(bn, nn.BatchNorm2d) or bn.training:
                raise PlanError("block BatchNorms must be eval-mode BatchNorm2d")
    return blocks


class _Plan:
    """The C++ runtime object for one trunk input size (H, W)."""

    def __init__(self, blocks, H, W, isa, examples: dict | None, formats: str | None = None):
        from gdnsq_kernels.cpu_deploy import load_extension

        self.ext = load_extension(isa)
        self.isa = isa
        self.formats = []  # (conv1 format, conv2 format) per block
        rt = self.ext.Runtime()
        rt.set_entry(per_tensor_thresholds(blocks[0].conv1))
        h, w = H, W
        for i, b in enumerate(blocks):
            ex = examples.get(i) if examples else None
            if isinstance(formats, (list, tuple)):  # one per trunk conv
                f1, f2 = choose_format(b.conv1, isa, formats[2 * i]), choose_format(b.conv2, isa, formats[2 * i + 1])
            else:
                f1, f2 = choose_format(b.conv1, isa, formats), choose_format(b.conv2, isa, formats)
            self.formats.append((f1, f2))
            t1 = conv_tables(b.conv1, h, w, f1)
            t2 = conv_tables(b.conv2, t1["Ho"], t1["Wo"], f2)
            thr1, dir1 = fused_bn_relu_thresholds(b.bn1, b.conv2, ex[0] if ex else None)
            alpha, beta = bn_affine(b.bn2, self.ext, ex[1] if ex else None)
            from gdnsq.models.resnet_cifar import OptionAShortcut

            pad = b.shortcut.pad if isinstance(b.shortcut, OptionAShortcut) else -1
            thrn = per_tensor_thresholds(blocks[i + 1].conv1) if i + 1 < len(blocks) else torch.zeros(0)
            rt.add_block(t1["meta"], t1["wT"], t1["s"], t1["ms"], t1["cst"], thr1.float(), dir1,
                         t2["meta"], t2["wT"], t2["s"], t2["ms"], t2["cst"], alpha, beta, int(pad),
                         thrn.float().contiguous())
            h, w = t2["Ho"], t2["Wo"]
        self.rt = rt


class RuntimeModel(DropsDerivedOnLoad):
    """A frozen CIFAR ResNet whose quantized trunk runs on the fused C++ runtime.

    ``model``: the frozen model (``freeze`` / ``load``); it stays a submodule, so its state dict
    is this module's under ``model.``. Input (N, 3, H, W) float32 on the CPU; output logits
    (N, classes) equal to the frozen model's. Plans are built per trunk input size on first use
    (and again after ``load_state_dict`` / ``.to``). Inference only; not thread-safe.
    """

    def __init__(self, model: nn.Module, isa: str | None = None, example_input: torch.Tensor | None = None,
                 formats: str | None = None):
        super().__init__()
        self.model = model.eval()
        from gdnsq_kernels.cpu_deploy import default_isa

        if isinstance(formats, (list, tuple)):
            if any(f not in FORMATS for f in formats):
                raise ValueError(f"formats entries must be in {FORMATS}, got {formats!r}")
            formats = tuple(formats)
        elif formats is not None and formats not in FORMATS:
            raise ValueError(f"formats must be one of {FORMATS}, a sequence of them or None, got {formats!r}")
        self.isa = isa or default_isa()
        self.formats = formats
        self._plans: dict = {}
        self.fallback_reason = None
        try:
            self._blocks = trunk_blocks(model)
            if isinstance(formats, tuple) and len(formats) != 2 * len(self._blocks):
                raise ValueError(f"formats needs one entry per trunk conv ({2 * len(self._blocks)}), got {len(formats)}")
        except PlanError as exc:
            self._fallback(exc)
        self._example = example_input
        if example_input is not None and self.fallback_reason is None:
            self._plan_for(example_input)

    def _fallback(self, exc: Exception) -> None:
        self.fallback_reason = str(exc)
        warnings.warn(f"gdnsq.deploy.runtime: running per-layer ops ({exc})", RuntimeWarning, stacklevel=3)

    def _drop_derived(self) -> None:
        self._plans = {}

    @torch.no_grad()
    def _stem(self, x):
        m = self.model
        return F.relu(m.bn1(m.conv1(x)))

    @torch.no_grad()
    def _plan_for(self, x: torch.Tensor):
        """Plan for the stem output size of x (built once per size)."""
        H, W = x.shape[-2:]
        key = (int(H), int(W))
        if key not in self._plans:
            examples = None
            if x.shape[0] > 0 and self._example is not None:
                examples = self._capture(self._example)
            try:
                self._plans[key] = _Plan(self._blocks, *self._stem_size(key), self.isa, examples, self.formats)
            except PlanError as exc:
                self._fallback(exc)
                return None
        return self._plans[key]

    def _stem_size(self, key):
        with torch.no_grad():
            out = self._stem(torch.zeros(1, self.model.conv1.in_channels, *key))
        return out.shape[-2], out.shape[-1]

    def _capture(self, x):
        """conv1/conv2 outputs of every block on x (real values for the plan checks)."""
        got = {}
        hooks = []
        for i, b in enumerate(self._blocks):
            hooks.append(b.conv1.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, [None, None]).__setitem__(0, o)))
            hooks.append(b.conv2.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, [None, None]).__setitem__(1, o)))
        from .plan import per_layer

        try:
            with per_layer(self.model):  # hooks fire on the per-layer path (a plan skips the modules)
                self.model(x[:32])
        finally:
            for h in hooks:
                h.remove()
        return got

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback_reason is not None or x.device.type != "cpu" or x.dtype != torch.float32:
            return self.model(x)
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        plan = self._plan_for(x)
        if plan is None:
            return self.model(x)
        m = self.model
        out = self._stem(x)
        z = plan.rt.forward(out.permute(0, 2, 3, 1).contiguous())
        out = z.permute(0, 3, 1, 2).contiguous()  # NCHW again: pooling sums in the model's order
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return m.linear(out)


def runtime(model: nn.Module, isa: str | None = None, example_input: torch.Tensor | None = None,
            formats: str | None = None) -> RuntimeModel:
    """Wrap a frozen model so that its quantized trunk runs on the fused runtime.

    ``isa``: ``"avx512"`` / ``"avx2"`` / ``"scalar"`` (default: the best this CPU has, or
    ``$GDNSQ_DEPLOY_ISA``). ``example_input``: optional images whose real intermediate values
    are added to the plan's checks. ``formats``: ``None`` chooses each conv's input format by
    the measured rule (``choose_format``: ``bytes`` when ``act_bits * weight_bits >=
    BYTES_MIN_BITS_PRODUCT[isa]``, else ``packed``); ``"packed"`` / ``"bytes"`` force one on every
    conv (bytes where it fits exactly), e.g. to test either path on any build; a sequence gives
    one format per trunk conv (block order, conv1 then conv2).
    """
    return RuntimeModel(model, isa=isa, example_input=example_input, formats=formats)
