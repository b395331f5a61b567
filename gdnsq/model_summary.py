"""``gdnsq.summary``: a per-layer table of a model's placement, bits, parameters, MACs, bytes.

(The module is ``gdnsq.model_summary`` so that ``gdnsq.summary`` stays the function.)

In the spirit of Keras' ``model.summary()`` and Larq's ``larq.models.summary``. One row per
module that holds parameters or is a conv / linear / attention layer (an
``nn.MultiheadAttention`` is one row; the projections of a ``QMultiheadAttention`` have their
own rows, and its row counts the attention itself). Quantizer modules are not rows: their
parameters are part of their layer's bytes, not of the parameter counts.

Figures (``example_input`` is run once, in eval mode, with every quantized layer in full
precision, so the call has no effect on the model's state and works before calibration):

* ``macs``: multiply-accumulates of the layer on ``example_input`` (its batch included):
  convolutions ``out.numel() * in/groups * kh * kw``, linear ``out.numel() * in``, attention
  ``2 * N * L * S * E`` for ``q k^T`` and the weighted sum (plus the projections of an
  ``nn.MultiheadAttention``); 0 for the other layers.
* bits: the targets, and the realised bits a frozen model stores, as ``gdnsq.deploy.freeze``
  computes them: weights ``log2(k_max + 1)`` of the integer codes (max over channels),
  activations ``log2(j_max + 1)`` of the grid's top code. Storage and bit-operations use the
  whole bits ``ceil(realised)``. FP layers: the bits of their weight dtype and input dtype.
* ``bytes``: quantized layers as ``freeze`` stores them (codes packed at the storage bits,
  float32 step and zero point per output channel, bias, the three activation parameters);
  other rows their parameters and floating buffers at their dtype.
* ``bops`` (bit-operations): ``macs * weight bits * input bits``; ``fp32_bops`` the same at 32 x 32.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .attention import QMultiheadAttention
from .convert import FP_RULE_ATTR
from .layers import _QuantMixin
from .quantizers import ActivationQuantizer, WeightQuantizer

# a value far above any activation: its code is the top code of the quantizer (clamp top)
_HUGE = 3.0e38
_TOL = 1e-6


@dataclass
class LayerSummary:
    """One row of :class:`ModelSummary` (bits in bits, bytes in bytes, None = not applicable)."""

    name: str
    type: str
    quantized: bool
    rule: str | None = None            # why a candidate layer is FP (placement rule), if known
    weight_target: float | None = None
    act_target: float | None = None    # None: input not quantized (A32) or an FP layer
    weight_bits: float | None = None   # realised (quantized) or dtype bits (FP weight layers)
    act_bits: float | None = None      # realised (quantized) or the input dtype bits
    params: int = 0
    macs: int = 0
    bytes: int = 0
    fp32_bytes: int = 0
    bops: int = 0


@dataclass
class ModelSummary:
    """What :func:`summary` returns: ``layers`` (rows) and the totals over them."""

    input_shapes: list
    layers: list = field(default_factory=list)

    def _total(self, column: str) -> int:
        return sum(getattr(r, column) for r in self.layers)

    params = property(lambda self: self._total("params"), doc="parameters of all rows")
    macs = property(lambda self: self._total("macs"), doc="MACs on the example input")
    bytes = property(lambda self: self._total("bytes"), doc="model size at the realised bits")
    fp32_bytes = property(lambda self: self._total("fp32_bytes"), doc="model size in float32")
    bops = property(lambda self: self._total("bops"), doc="bit-operations at the realised bits")

    @property
    def fp32_bops(self) -> int:
        """Bit-operations of the same MACs at 32 x 32 bits."""
        return self.macs * 32 * 32

    def to_dict(self) -> dict:
        """JSON-ready dict: ``layers`` (one dict per row) and ``totals``."""
        return {"input_shapes": self.input_shapes, "layers": [asdict(r) for r in self.layers],
                "totals": {"params": self.params, "macs": self.macs, "bytes": self.bytes,
                           "fp32_bytes": self.fp32_bytes, "bops": self.bops, "fp32_bops": self.fp32_bops,
                           "quantized_layers": sum(r.quantized for r in self.layers)}}

    def __str__(self) -> str:
        head = ("layer", "type", "placement", "W bits (target/real)", "A bits (target/real)",
                "params", "MACs", "bytes")
        rows = [head] + [_row_cells(r) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        numeric = {5, 6, 7}

        def line(cells):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "-" * len(line(head))
        ratio = self.fp32_bytes / self.bytes if self.bytes else math.nan
        bops_ratio = self.fp32_bops / self.bops if self.bops else math.nan
        quantized = sum(r.quantized for r in self.layers)
        weight_layers = sum(r.weight_bits is not None for r in self.layers)
        out = [line(head), rule] + [line(r) for r in rows[1:]] + [rule]
        out.append(f"quantized layers: {quantized} of {weight_layers}; input {self.input_shapes}")
        out.append(f"params: {self.params:,}   MACs: {_si(self.macs)}")
        out.append(f"size: {_bytes(self.bytes)} (FP32 {_bytes(self.fp32_bytes)}, {ratio:.1f}x smaller)")
        out.append(f"bit-operations: {_si(self.bops)} (FP32 {_si(self.fp32_bops)}, {bops_ratio:.1f}x fewer)")
        return "\n".join(out)


def _fmt_bits(v) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if float(v).is_integer() else f"{v:.2f}"


def _row_cells(r: LayerSummary) -> tuple:
    if r.quantized:
        placement = "quantized"
        wb = f"{_fmt_bits(r.weight_target)} / {_fmt_bits(r.weight_bits)}"
        ab = "FP" if r.act_target is None else f"{_fmt_bits(r.act_target)} / {_fmt_bits(r.act_bits)}"
    else:
        placement = f"FP: {r.rule}" if r.rule else ("FP" if r.weight_bits is not None else "")
        wb = "" if r.weight_bits is None else f"FP{_fmt_bits(r.weight_bits)}"
        ab = ""
    return (r.name or "(model)", r.type, placement, wb, ab, f"{r.params:,}", _si(r.macs), f"{r.bytes:,}")


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _storage_bits(realised: float) -> int:
    """Whole bits that hold ``2**realised`` levels (what freeze packs at)."""
    return max(1, math.ceil(realised - _TOL))


def _tensor_bytes(tensors) -> tuple[int, int]:
    """(bytes at their dtype, bytes at float32 for floating tensors) of ``tensors``."""
    own = fp32 = 0
    for t in tensors:
        own += t.numel() * t.element_size()
        fp32 += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return own, fp32


def _is_row(module: nn.Module) -> bool:
    if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
        return False
    return (isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention, QMultiheadAttention))
            or any(True for _ in module.parameters(recurse=False)))


def _attention_macs(module, args, kwargs) -> int:
    """MACs of ``q k^T`` and the weighted sum (and, for nn.MultiheadAttention, its projections)."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    value = args[2] if len(args) > 2 else kwargs["value"]
    seq_dim = 1 if (module.batch_first and query.dim() == 3) else 0
    batch = query.shape[1 - seq_dim] if query.dim() == 3 else 1
    tgt, src = query.shape[seq_dim], key.shape[seq_dim]
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    embed = module.embed_dim
    macs = 2 * batch * tgt * (src + extra) * embed
    if isinstance(module, nn.MultiheadAttention):  # its projections run inside its forward
        macs += batch * (tgt * embed * embed + src * (key.shape[-1] + value.shape[-1]) * embed
                         + tgt * embed * embed)
    return macs


def _layer_macs(module, args, kwargs, output) -> int:
    if isinstance(module, (nn.MultiheadAttention, QMultiheadAttention)):
        return _attention_macs(module, args, kwargs)
    if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
        return output.numel() * module.in_features
    return 0


@torch.no_grad()
def _quantized_row(row: LayerSummary, layer) -> tuple[int, int | None]:
    """Fill the bits and bytes of a QConv2d / QLinear row (as gdnsq.deploy.freeze stores the
    layer); returns the storage bits of its weight and input (None: input not quantized)."""
    from gdnsq_kernels.quantize.reference import activation_codes

    wq, aq = layer.weight_quantizer, layer.act_quantizer
    row.weight_target = float(wq.target_bits)
    k, _ = wq.codes(layer.weight.detach().float())
    row.weight_bits = math.log2(int(k.max()) + 1)
    w_store = _storage_bits(row.weight_bits)
    out_ch = layer.weight.shape[0]
    nbytes = w_store * ((layer.weight.numel() + 7) // 8) + 8 * out_ch
    if layer.bias is not None:
        nbytes += 4 * layer.bias.numel()
    a_store = None
    if aq is not None and aq.enabled:
        row.act_target = float(aq.target_bits)
        params = [p.detach().float().reshape(()).cpu() for p in aq.params()]
        j_max = int(activation_codes(torch.full((1,), _HUGE), *params).max())
        row.act_bits = math.log2(j_max + 1)
        a_store = _storage_bits(row.act_bits)
        nbytes += 12
    row.bytes = nbytes
    return w_store, a_store


def summary(model: nn.Module, example_input) -> ModelSummary:
    """Per-layer summary of ``model`` (an FP model or a ``gdnsq.quantize_model`` student).

    Args:
        model: the model; its mode, flags and state are left as they were.
        example_input: what ``model`` is called with: a tensor, a tuple/list of positional
            arguments, or a dict of keyword arguments (e.g. a Hugging Face batch). MACs and
            bit-operations are for this input, batch included: use a batch of one for
            per-example figures.

    Returns:
        A :class:`ModelSummary`: ``str()`` gives the table, ``.layers`` the rows
        (:class:`LayerSummary`), ``.params`` / ``.macs`` / ``.bytes`` / ``.fp32_bytes`` /
        ``.bops`` / ``.fp32_bops`` the totals, ``.to_dict()`` a JSON-ready form.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(example_input, torch.Tensor):
        args, kwargs = (example_input,), {}
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    elif isinstance(example_input, dict):
        args, kwargs = (), dict(example_input)
    else:
        raise TypeError(f"example_input must be a tensor, a tuple/list of arguments or a dict of "
                        f"keyword arguments, got {type(example_input).__name__}")

    inside_attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    rows = [(n, m) for n, m in model.named_modules() if _is_row(m)
            and not any(n.startswith(a + ".") for a in inside_attention)]
    macs = {n: 0 for n, _ in rows}
    input_bits: dict[str, int] = {}

    def make_hook(name):
        def hook(module, hook_args, hook_kwargs, output):
            macs[name] += _layer_macs(module, hook_args, hook_kwargs, output)
            first = hook_args[0] if hook_args else next(iter(hook_kwargs.values()), None)
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                input_bits.setdefault(name, 8 * first.element_size())
        return hook

    quant_layers = [m for m in model.modules() if isinstance(m, _QuantMixin)]
    passthrough = [m._fp_passthrough for m in quant_layers]
    was_training = model.training
    hooks = [m.register_forward_hook(make_hook(n), with_kwargs=True) for n, m in rows]
    try:
        for m in quant_layers:
            m._fp_passthrough = True  # statistics only: no quantizer runs, nothing is observed
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in zip(quant_layers, passthrough):
            m._fp_passthrough = flag
        model.train(was_training)

    shapes = [list(t.shape) for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    result = ModelSummary(input_shapes=shapes)
    for name, module in rows:
        row = LayerSummary(name=name, type=type(module).__name__, quantized=isinstance(module, _QuantMixin),
                           rule=getattr(module, FP_RULE_ATTR, None), macs=macs[name])
        recurse = isinstance(module, nn.MultiheadAttention)
        params = list(module.parameters(recurse=recurse))
        floating_buffers = [b for b in module.buffers(recurse=recurse) if b.is_floating_point()]
        row.params = sum(p.numel() for p in params)
        own, row.fp32_bytes = _tensor_bytes(params + floating_buffers)
        a_bits = input_bits.get(name, 32)
        if row.quantized:
            w_store, a_store = _quantized_row(row, module)
            row.bops = row.macs * w_store * (a_bits if a_store is None else a_store)
        else:
            row.bytes = own
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) and params:
                row.weight_bits = 8 * params[0].element_size()
            if row.macs:  # an FP weight layer, or the attention itself (activation x activation)
                w_bits = row.weight_bits if row.weight_bits is not None else a_bits
                row.bops = row.macs * int(w_bits) * a_bits
        result.layers.append(row)
    return result
