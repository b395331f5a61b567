"""Inference layers of a frozen GDNSQ model: integer codes instead of fake-quantized floats.

A trained ``QConv2d``/``QLinear`` computes ``y = conv(a_hat, w_hat) + bias`` with

* ``w_hat[o] = m[o] + s_w[o] * k``  (per output channel: zero point ``m`` = channel minimum,
  step ``s_w``, integer codes ``k`` in ``0 .. 2**b_w - 1``),
* ``a_hat = beta + s_a * j`` (per tensor: offset ``beta``, step ``s_a``, codes ``j`` in
  ``0 .. 2**b_a - 1``), and zero at the padded border of a convolution (the float layer
  zero-pads the dequantized activation, and 0 is off the grid when ``beta != 0``).

Expanding the product over the taps of one output position gives

    y[o,p] = s_w[o] s_a * S_kj[o,p] + m[o] s_a * S_j[p] + C[o,p]
    S_kj = sum k*j (integer), S_j = sum j over the taps (integer),
    C[o,p] = s_w[o] beta * sum_valid k + m[o] beta * n_valid + bias[o]

``C`` does not depend on the input (only on the border, through the valid-tap mask), so it is
computed once per input size and cached. Only ``S_kj`` is a real GEMM; three ways compute it:

* ``binary``: weight and activation codes are both 0/1 -> the bit-packed
  ``gdnsq_kernels.binary_conv2d`` / ``binary_linear`` (AND/XNOR popcount with the same
  corrections, done inside the op).
* ``bitplane``: ``k = sum_p 2**p k_p`` and ``j = sum_q 2**q j_q`` with 0/1 planes, so
  ``S_kj = sum_{p,q} 2**(p+q) popcount(k_p & j_q)``: ``b_w * b_a`` packed ``and_gemm`` calls on
  weight planes packed once.
* ``int``: a float matmul/conv of the integer-valued codes, exact by construction
  (:mod:`gdnsq.deploy.integer_sums`): float32 only when the worst case ``taps * k_max * j_max``
  is below 2**24 and the call runs on a backend that sums directly at full float32 precision
  (never Winograd/FFT, TF32 or bf16), float64 otherwise. A layer whose worst case reaches 2**53
  does not offer the path.

``float`` (never chosen automatically) dequantizes the codes (``beta + s_a*j``, ``m + s_w*k``)
and runs the same float32 conv/linear as the fake-quant layer, so it reproduces the fake-quant
model bit for bit on the same device; use it when predictions must equal the fake-quant
model's exactly (the integer paths are the exact value of the quantized layer, which differs
from the fake-quant layer's float32 accumulation by ~1e-7 relative; rarely, that moves a
downstream activation across a rounding boundary).

``dequant`` is used when the layer has no activation quantizer (A32): the weight is rebuilt
once from its codes and the layer runs as a float layer.

Storage: the weight codes are kept bit-packed at the layer's weight bit-width (``bits`` planes
of ``ceil(n/8)`` bytes, LSB first), which is what ``save`` writes; every runtime form (float
codes, packed planes) is derived and cached, never saved.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .integer_sums import FP32_EXACT_BELOW, FP64_EXACT_BELOW, conv2d_sums, conv_output_size, linear_sums, sum_bound
from ._header import check_layer_config

PATHS = ("binary", "bitplane", "int", "float", "dequant")


# --------------------------------------------------------------------------------------------
# storage packing (b bits per code, plane-major)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (any shape, values < 2**bits) at ``bits`` bits each.

    Returns uint8 of shape ``(bits, ceil(n/8))``: row ``p`` holds bit ``p`` of every code,
    element ``i`` in bit ``i % 8`` of byte ``i // 8``. ``n = codes.numel()``.
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}")
    n = flat.numel()
    nbytes = (n + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.int64)
    padded[:n] = flat
    weights = (2 ** torch.arange(8, dtype=torch.int64)).view(1, 8)
    planes = []
    for p in range(bits):
        plane = ((padded >> p) & 1).view(nbytes, 8)
        planes.append((plane * weights).sum(1).to(torch.uint8))
    return torch.stack(planes) if planes else torch.zeros(0, nbytes, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes of ``shape`` from ``(bits, nbytes)`` uint8."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[0] != bits or packed.shape[1] != (n + 7) // 8:
        raise ValueError(
            f"packed must be uint8 of shape ({bits}, {(n + 7) // 8}) for shape {tuple(shape)}, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    out = torch.zeros(n, dtype=torch.int32, device=packed.device)
    for p in range(bits):
        bitsp = ((packed[p].to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]
        out += bitsp << p
    return out.view(*shape)


def _bits_for(max_code: int) -> int:
    """Bits needed to hold codes 0..max_code (at least 1)."""
    return max(1, int(max_code).bit_length())


# --------------------------------------------------------------------------------------------
# activation codes


def activation_codes(x: torch.Tensor, log2_step, log2_range, offset) -> torch.Tensor:
    """int32 codes ``j`` of ``x`` under the activation quantizer (same math as training).

    Delegates to ``gdnsq_kernels.quantize.reference.activation_codes`` so that the deployed codes are
    the ones the fake-quant model rounds to, bit for bit.
    """
    from gdnsq_kernels.quantize.reference import activation_codes as ref_codes

    return ref_codes(x, log2_step, log2_range, offset)


def _time_call(fn: Callable[[], torch.Tensor], device: torch.device, reps: int = 3) -> float:
    """Fastest of ``reps`` calls after one warm-up call, in seconds (the minimum is the least
    disturbed by other work on the machine)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


# --------------------------------------------------------------------------------------------
# shared base


class DropsDerivedOnLoad(nn.Module):
    """A module that caches tensors derived from its parameters and buffers: the cache is
    dropped when a state dict is loaded (new codes) and on ``.to()``/``.cuda()`` (moved
    buffers), and rebuilt lazily. Subclasses say what to drop in ``_drop_derived``."""

    def _drop_derived(self) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_derived()
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._drop_derived()
        return super()._apply(fn, *args, **kwargs)


class _DeployedBase(DropsDerivedOnLoad):
    """State and epilogue shared by :class:`DeployedConv2d` and :class:`DeployedLinear`.

    Persistent buffers (what ``save`` writes):
        weight_packed   uint8 (b_w, ceil(numel/8)): weight codes, :func:`pack_codes` layout
        weight_step     float32 (C_out,): s_w, the dequantized weight is ``min + step * k``
        weight_min      float32 (C_out,): per-channel zero point m
        bias            float32 (C_out,), only when the float layer had one
        act_log2_step, act_log2_range, act_offset: float32 0-d, the activation quantizer's
                        alpha, gamma, beta (absent for A32 layers)
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        wshape = tuple(config["weight_shape"])
        out_ch = wshape[0]
        bw = int(config["weight_bits"])
        n = math.prod(wshape)
        self.register_buffer("weight_packed", torch.zeros(bw, (n + 7) // 8, dtype=torch.uint8))
        self.register_buffer("weight_step", torch.ones(out_ch))
        self.register_buffer("weight_min", torch.zeros(out_ch))
        if config.get("bias"):
            self.register_buffer("bias", torch.zeros(out_ch))
        else:
            self.bias = None
        if config.get("act_bits") is not None:
            self.register_buffer("act_log2_step", torch.zeros(()))
            self.register_buffer("act_log2_range", torch.zeros(()))
            self.register_buffer("act_offset", torch.zeros(()))
        self._cache: dict = {}

    # -- configuration ------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.config["path"]

    def set_path(self, path: str) -> None:
        """Switch the GEMM path (one of :data:`PATHS` allowed for this layer)."""
        if path not in self.allowed_paths():
            raise ValueError(f"path must be one of {self.allowed_paths()} for this layer, got {path!r}")
        self.config["path"] = path
        self._cache.clear()

    def allowed_paths(self) -> tuple:
        """Paths that compute this layer exactly."""
        bw, ba = self.config["weight_bits"], self.config.get("act_bits")
        if ba is None:
            return ("dequant",)
        paths = []
        if bw == 1 and ba == 1 and self._binary_ok():
            paths.append("binary")
        if bw <= 4 and ba <= 4 and self.config.get("groups", 1) == 1:
            paths.append("bitplane")
        if self._sum_bound() < FP64_EXACT_BELOW:
            paths.append("int")
        paths.append("float")
        return tuple(paths)

    def candidate_paths(self) -> tuple:
        """Paths the measurement chooses among: W1A1 layers always run on the binary ops."""
        allowed = self.allowed_paths()
        if "binary" in allowed:
            return ("binary",)
        return tuple(p for p in allowed if p in ("bitplane", "int")) or allowed

    def _binary_ok(self) -> bool:
        return True

    def _drop_derived(self) -> None:
        self._cache = {}

    # -- derived tensors ----------------------------------------------------------------------
    def _int_codes(self, device) -> torch.Tensor:
        """The weight codes on ``device`` for :func:`conv2d_sums` / :func:`linear_sums`, made once
        and cached: float32 when every sum fits float32 (those switch to float64 for a call that
        needs it), else float64."""
        dtype = torch.float32 if self._fp32_fits() else torch.float64
        key = ("k_float", dtype, device)
        if key not in self._cache:
            self._cache[key] = self.weight_codes().to(device, dtype)
        return self._cache[key]

    def weight_codes(self) -> torch.Tensor:
        """int32 weight codes of the original weight shape."""
        if "k" not in self._cache:
            self._cache["k"] = unpack_codes(
                self.weight_packed, self.config["weight_bits"], self.config["weight_shape"]
            )
        return self._cache["k"]

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``min + step * k``: exactly the fake-quant weight."""
        if "w_hat" not in self._cache:
            k = self.weight_codes().float()
            view = (-1,) + (1,) * (k.dim() - 1)
            self._cache["w_hat"] = k * self.weight_step.view(view) + self.weight_min.view(view)
        return self._cache["w_hat"]

    def _dequant_act(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 ``beta + s_a*j``: the fake-quant layer's quantized input, bit for bit."""
        s_a = torch.exp2(self.act_log2_step.float())
        return self.act_offset.float() + s_a * codes.float()

    def _sum_bound(self) -> int:
        """Largest integer sum of one output (``sum k*j``; ``sum j`` and ``sum k`` are smaller)."""
        taps = math.prod(self.config["weight_shape"][1:])
        return sum_bound(taps, self.config["weight_bits"], self.config["act_bits"])

    def _fp32_fits(self) -> bool:
        """Whether every integer sum of this layer is below 2**24 (exact in float32)."""
        return self._sum_bound() < FP32_EXACT_BELOW

    def codes_of(self, x: torch.Tensor) -> torch.Tensor:
        """int32 activation codes of the layer input ``x`` (the reference implementation)."""
        return activation_codes(x, self.act_log2_step, self.act_log2_range, self.act_offset)

    def float_codes(self, x: torch.Tensor) -> torch.Tensor:
        """float32 codes ``round((clamp(x, lo, hi) - lo) / s)`` of a float32 ``x``.

        The same float32 operations, in the same order, as
        ``gdnsq_kernels.quantize.reference.activation_codes`` (so the same integers; tested), kept in
        float32 because every GEMM path consumes them as floats or bits.
        """
        key = ("act", x.device)
        if key not in self._cache:
            s = torch.exp2(self.act_log2_step.float().reshape(()))
            q = torch.exp2(self.act_log2_range.float().reshape(()))
            lo = self.act_offset.float().reshape(())
            self._cache[key] = (s.to(x.device), lo.to(x.device), (lo + q - s).to(x.device))
        s, lo, hi = self._cache[key]
        return torch.round((torch.clamp(x, lo, hi) - lo) / s)

    def _epilogue(self, s_kj: torch.Tensor, s_j: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """``s_w s_a S_kj + m s_a S_j + C`` with channels on dim 1, rounded once to float32.

        The terms are evaluated in float64 (the integer sums are exact there), so the result is
        the correctly rounded value of the quantized layer: the only float error left between
        this and the fake-quant layer is the fake-quant layer's own float32 accumulation.
        """
        # the fake-quant layer computes s_a = 2**alpha in float32; use that exact value
        s_a = torch.exp2(self.act_log2_step.float()).double()
        shape = (1, -1) + (1,) * (s_kj.dim() - 2)
        a = (self.weight_step.double() * s_a).view(shape)
        b = (self.weight_min.double() * s_a).view(shape)
        return (a * s_kj.double() + b * s_j.double() + const).float()

    def extra_repr(self) -> str:
        c = self.config
        return f"W{c['weight_bits']}A{c.get('act_bits') or 32}, path={c['path']}, weight_shape={tuple(c['weight_shape'])}"

    # -- measurement --------------------------------------------------------------------------
    def choose_path(self, example: torch.Tensor, reps: int = 3) -> dict:
        """Time every allowed path on ``example`` (a real input of this layer), keep the fastest.

        Returns ``{path: seconds}``; ``config["path"]`` is set to the winner and
        ``config["timings_ms"]`` records the measurement.
        """
        paths = self.candidate_paths()
        timings = {}
        with torch.no_grad():
            for p in paths:
                self.set_path(p)
                timings[p] = _time_call(lambda: self(example), example.device, reps)
        best = min(timings, key=timings.get)
        self.set_path(best)
        self.config["timings_ms"] = {p: round(t * 1e3, 4) for p, t in timings.items()}
        return timings


# --------------------------------------------------------------------------------------------
# convolution


class DeployedConv2d(_DeployedBase):
    """Frozen quantized ``Conv2d``: integer weight codes + per-channel affine, integer GEMM.

    Input ``x`` (N, C_in, H, W) float32 (the un-quantized activation, as the fake-quant layer
    receives it); output (N, C_out, H_out, W_out) float32. ``config`` keys: ``weight_shape``
    (C_out, C_in/groups, kh, kw), ``stride``, ``padding``, ``dilation``, ``groups`` (tuples /
    int as in ``nn.Conv2d``; string padding is not supported), ``bias`` (bool),
    ``weight_bits``, ``act_bits`` (None for A32), ``path``.
    """

    kind = "conv2d"

    def _binary_ok(self) -> bool:
        return self.config.get("groups", 1) == 1

    def _geom(self):
        c = self.config
        return tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"]), int(c.get("groups", 1))

    def _const(self, x: torch.Tensor) -> torch.Tensor:
        """C[o,p] for this input size (cached per size/device)."""
        key = ("const", x.shape[-2], x.shape[-1], x.device)
        if key not in self._cache:
            stride, padding, dilation, groups = self._geom()
            cin = self.config["weight_shape"][1] * groups
            mask = torch.ones(1, cin, x.shape[-2], x.shape[-1], dtype=torch.float64, device=x.device)
            k = self.weight_codes().to(x.device, torch.float64)
            # float64 sums (fp32_exact=False): cached, so their speed does not matter
            sum_k = conv2d_sums(mask, k, stride, padding, dilation, groups, False)  # (1,O,Ho,Wo)
            n_valid = conv2d_sums(mask, torch.ones_like(k), stride, padding, dilation, groups, False)
            beta = self.act_offset.double()
            const = (self.weight_step.double().view(1, -1, 1, 1) * beta) * sum_k + (
                self.weight_min.double().view(1, -1, 1, 1) * beta
            ) * n_valid
            if self.bias is not None:
                const = const + self.bias.double().view(1, -1, 1, 1)
            self._cache[key] = const  # float64: added in the float64 epilogue
        return self._cache[key]

    def _sum_j(self, j: torch.Tensor) -> torch.Tensor:
        """S_j[n,o,p]: sum of activation codes over the taps of each output (per group)."""
        stride, padding, dilation, groups = self._geom()
        out_ch, _, kh, kw = self.config["weight_shape"]
        n, c, h, w = j.shape
        js = j.view(n, groups, c // groups, h, w).sum(2)
        if tuple(dilation) == (1, 1) and padding[0] <= kh // 2 and padding[1] <= kw // 2:
            # window sums with zero padding: avg_pool with divisor 1 (much faster than a
            # one-channel conv on CPU; exact, the values are small integers)
            s = F.avg_pool2d(js, (kh, kw), stride, padding, count_include_pad=True, divisor_override=1)
        else:
            ones = torch.ones(groups, 1, kh, kw, dtype=j.dtype, device=j.device)
            s = conv2d_sums(js, ones, stride, padding, dilation, groups, self._fp32_fits())
        return s.repeat_interleave(out_ch // groups, dim=1) if groups > 1 else s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
        stride, padding, dilation, groups = self._geom()
        path = self.config["path"]
        if path == "dequant":
            w = self.dequantized_weight().to(x.device)
            return F.conv2d(x.float(), w, self.bias, stride, padding, dilation, groups)
        codes = self.float_codes(x.float())
        if path == "binary":
            return self._binary(codes)
        if path == "float":
            return F.conv2d(self._dequant_act(codes), self.dequantized_weight().to(x.device), self.bias,
                            stride, padding, dilation, groups)
        j = codes if self._fp32_fits() else codes.double()
        if path == "int":
            s_kj = conv2d_sums(codes, self._int_codes(x.device), stride, padding, dilation, groups,
                               self._fp32_fits())
        elif path == "bitplane":
            s_kj = self._bitplane(codes, x.shape)
        else:
            raise ValueError(f"unknown path {path!r}")
        return self._epilogue(s_kj, self._sum_j(j), self._const(x))

    def _bitplane(self, codes: torch.Tensor, xshape) -> torch.Tensor:
        from gdnsq_kernels import and_gemm, pack_bits

        stride, padding, dilation, _ = self._geom()
        out_ch, cin, kh, kw = self.config["weight_shape"]
        bw, ba = self.config["weight_bits"], self.config["act_bits"]
        n, _, h, w = xshape
        taps = cin * kh * kw
        key = ("wplanes", codes.device)
        if key not in self._cache:
            k = self.weight_codes().to(codes.device).reshape(out_ch, taps)
            self._cache[key] = [pack_bits(((k >> p) & 1).to(torch.uint8), dim=-1, check=False)
                                for p in range(bw)]
        wplanes = self._cache[key]
        # im2col of the codes (zero codes at the padding: they add nothing to S_kj).
        cols = F.unfold(codes, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        L = cols.shape[-1]
        cols = cols.transpose(1, 2).reshape(n * L, taps).to(torch.int32)
        acc = torch.zeros(n * L, out_ch, dtype=torch.int64, device=codes.device)
        for q in range(ba):
            aq = pack_bits(((cols >> q) & 1).to(torch.uint8), dim=-1, check=False)
            for p in range(bw):
                acc += and_gemm(aq, wplanes[p], taps).to(torch.int64) << (p + q)
        ho, wo = conv_output_size((h, w), (kh, kw), stride, padding, dilation)
        return acc.view(n, ho, wo, out_ch).permute(0, 3, 1, 2).double()  # int64 sums: exact

    def _binary(self, codes: torch.Tensor) -> torch.Tensor:
        from gdnsq_kernels.binary import binary_conv2d, pack_conv_weight

        stride, padding, dilation, _ = self._geom()
        key = ("packed_binary", codes.device)
        if key not in self._cache:  # pack the 0/1 weight once per device
            self._cache[key] = pack_conv_weight(self.weight_codes().to(codes.device, torch.uint8),
                                                self.weight_step, self.weight_min, check=False)
        s_a = torch.exp2(self.act_log2_step.float())
        return binary_conv2d(codes.to(torch.uint8), s_a, self.act_offset, self._cache[key],
                             bias=self.bias, stride=stride, padding=padding, dilation=dilation, check=False)


# --------------------------------------------------------------------------------------------
# linear


class DeployedLinear(_DeployedBase):
    """Frozen quantized ``Linear``. Input (N, in) or (*, in) float32; output (*, out) float32.

    ``config``: ``weight_shape`` (out, in), ``bias``, ``weight_bits``, ``act_bits``, ``path``.
    """

    kind = "linear"

    def _const(self, device) -> torch.Tensor:
        key = ("const", device)
        if key not in self._cache:
            k = self.weight_codes().to(device, torch.float64)
            beta = self.act_offset.double()
            n = k.shape[1]
            const = self.weight_step.double() * beta * k.sum(1) + self.weight_min.double() * beta * n
            if self.bias is not None:
                const = const + self.bias.double()
            self._cache[key] = const.view(1, -1)  # float64, as the epilogue
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_f, in_f = self.config["weight_shape"][0], self.config["weight_shape"][1]
        if x.dim() < 1 or x.shape[-1] != in_f:
            raise ValueError(f"x must have last dim {in_f}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_f).float()
        path = self.config["path"]
        if path == "dequant":
            return F.linear(x2, self.dequantized_weight().to(x.device), self.bias).view(*lead, out_f)
        codes = self.float_codes(x2)
        if path == "binary":
            from gdnsq_kernels.binary import binary_linear, pack_linear_weight

            key = ("packed_binary", codes.device)
            if key not in self._cache:
                self._cache[key] = pack_linear_weight(self.weight_codes().to(codes.device, torch.uint8),
                                                      self.weight_step, self.weight_min, check=False)
            out = binary_linear(codes.to(torch.uint8), torch.exp2(self.act_log2_step.float()),
                                self.act_offset, self._cache[key], bias=self.bias, check=False)
            return out.view(*lead, out_f)
        if path == "float":
            return F.linear(self._dequant_act(codes), self.dequantized_weight().to(x.device),
                            self.bias).view(*lead, out_f)
        j = codes if self._fp32_fits() else codes.double()
        if path == "int":
            s_kj = linear_sums(codes, self._int_codes(x.device), self._fp32_fits())
        elif path == "bitplane":
            from gdnsq_kernels import and_gemm, pack_bits

            bw, ba = self.config["weight_bits"], self.config["act_bits"]
            key = ("wplanes", x.device)
            if key not in self._cache:
                k = self.weight_codes().to(x.device)
                self._cache[key] = [pack_bits(((k >> p) & 1).to(torch.uint8), dim=-1, check=False)
                                    for p in range(bw)]
            acc = torch.zeros(x2.shape[0], self.config["weight_shape"][0], dtype=torch.int64, device=x.device)
            for q in range(ba):
                aq = pack_bits(((codes.to(torch.int32) >> q) & 1).to(torch.uint8), dim=-1, check=False)
                for p in range(bw):
                    acc += and_gemm(aq, self._cache[key][p], in_f).to(torch.int64) << (p + q)
            s_kj = acc.double()  # int64 sums: exact
        else:
            raise ValueError(f"unknown path {path!r}")
        s_j = j.sum(1, keepdim=True)
        return self._epilogue(s_kj, s_j, self._const(x.device)).view(*lead, out_f)


def build_layer(config: dict, field: str = "config") -> _DeployedBase:
    """Empty deployed layer from its ``config`` (as stored in an artifact's metadata).

    The config is checked first (types, ranges, a path the layer runs exactly), so no buffer is
    sized from a bad value; a ``ValueError`` names the bad entry as ``{field}.<key>``.
    """
    check_layer_config(config, field)
    layer = (DeployedConv2d if config["kind"] == "conv2d" else DeployedLinear)(config)
    if config["path"] not in layer.allowed_paths():
        raise ValueError(f"header field {field}.path: {config['path']!r} is not a path this layer runs "
                         f"exactly; one of {layer.allowed_paths()}")
    return layer
