"""freeze: turn a GDNSQ fake-quant model into an inference model on integer codes.

``freeze(qmodel)`` copies the model, puts it in eval mode and replaces every quantized layer
(``gdnsq.layers.QConv2d`` / ``QLinear``, recognised by their ``weight_quantizer`` submodule) by a
:class:`~gdnsq.deploy.layers.DeployedConv2d` / :class:`~gdnsq.deploy.layers.DeployedLinear`.
Everything else (FP convs, BatchNorm, ReLU, pooling, unknown custom layers) is left as it is:
BatchNorm is not folded, because folding it into the float epilogue reorders float operations
and is not exact, and the bit-exact part (integer codes) is what the deployment is about.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..convert import copy_without_teacher
from .layers import PATHS, DeployedConv2d, DeployedLinear, _DeployedBase, activation_codes, pack_codes

# a value far above any activation: its code is the top code of the quantizer (clamp top)
_HUGE = 3.0e38


def top_activation_code(log2_step, log2_range, offset) -> int:
    """The highest code of an activation quantizer (that of a value above its clamp); NaN or
    infinite parameters give a meaningless (possibly negative) int."""
    return int(activation_codes(torch.full((1,), _HUGE), log2_step, log2_range, offset).max())


def is_quantized_layer(module: nn.Module) -> bool:
    """True for a GDNSQ quantized conv/linear (a Conv2d/Linear with a ``weight_quantizer``)."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(
        getattr(module, "weight_quantizer", None), nn.Module
    )


def _act_enabled(aq) -> bool:
    return aq is not None and bool(getattr(aq, "enabled", True))


def _layer_from(name: str, layer: nn.Module, strict: bool) -> _DeployedBase:
    """Deployed copy of one quantized layer (default path: binary if possible, else int)."""
    wq = layer.weight_quantizer
    with torch.no_grad():
        w = layer.weight.detach().float()
        k, zero_point = wq.codes(w)
        k = k.to(torch.int64)
        out_ch = w.shape[0]
        step = wq.step().detach().float().reshape(-1).expand(out_ch).clone()
        zero_point = zero_point.detach().float().reshape(-1).expand(out_ch).clone()
    if int(k.min()) < 0:
        raise ValueError(f"layer {name}: weight codes must be >= 0 (min-anchored), got {int(k.min())}")
    kmax_c = k.reshape(out_ch, -1).max(1).values
    kmax = int(kmax_c.max())
    bw = max(1, kmax.bit_length())
    realised_w = math.log2(kmax + 1)
    target_w = float(getattr(wq, "target_bits", float("inf")))

    aq = getattr(layer, "act_quantizer", None)
    act = None
    if _act_enabled(aq):
        params = [aq.log2_step.detach().float().reshape(()).cpu(), aq.log2_range.detach().float().reshape(()).cpu(),
                  aq.offset.detach().float().reshape(()).cpu()]
        jmax = top_activation_code(*params)
        act = dict(params=params, jmax=jmax, bits=max(1, jmax.bit_length()), realised=math.log2(jmax + 1),
                   target=float(getattr(aq, "target_bits", float("inf"))))

    over = []
    if realised_w > target_w + 1e-6:
        over.append(f"weight {realised_w:.3f} > target {target_w:g}")
    if act is not None and act["realised"] > act["target"] + 1e-6:
        over.append(f"activation {act['realised']:.3f} > target {act['target']:g}")
    if over:
        msg = f"layer {name}: realised bits exceed the targets ({'; '.join(over)})"
        if strict:
            raise ValueError(msg + "; freeze(strict=True) refuses it")
        warnings.warn(msg + f"; deploying at W{bw}A{act['bits'] if act else 32}", stacklevel=3)

    config = {
        "weight_shape": list(w.shape),
        "bias": layer.bias is not None,
        "weight_bits": bw,
        "act_bits": act["bits"] if act else None,
        "realised_bits": {"weight": realised_w, "act": act["realised"] if act else None},
        "target_bits": {"weight": target_w, "act": act["target"] if act else None},
    }
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise ValueError(f"layer {name}: only numeric zero padding is supported, got "
                             f"padding={layer.padding!r} padding_mode={layer.padding_mode!r}")
        config.update(kind="conv2d", stride=list(layer.stride), padding=list(layer.padding),
                      dilation=list(layer.dilation), groups=layer.groups)
        cls = DeployedConv2d
    else:
        config.update(kind="linear")
        cls = DeployedLinear
    config["path"] = "int" if act else "dequant"
    dep = cls(config)
    with torch.no_grad():
        dep.weight_packed.copy_(pack_codes(k, bw))
        dep.weight_step.copy_(step)
        dep.weight_min.copy_(zero_point)
        if layer.bias is not None:
            dep.bias.copy_(layer.bias.detach().float())
        if act:
            dep.act_log2_step.copy_(act["params"][0])
            dep.act_log2_range.copy_(act["params"][1])
            dep.act_offset.copy_(act["params"][2])
    dep = dep.to(layer.weight.device)
    if "binary" in dep.allowed_paths():
        dep.set_path("binary")
    return dep


def freeze(qmodel: nn.Module, strict: bool = False, example_input: torch.Tensor | None = None,
           path: str = "auto", reps: int = 2, plan: bool = True) -> nn.Module:
    """Inference copy of ``qmodel`` with every quantized layer on integer codes.

    Args:
        qmodel: a model converted by ``gdnsq.convert.quantize_model`` (trained or calibrated).
            It is not modified.
        strict: raise ``ValueError`` when a layer's realised bits (log2 of its weight / activation
            code range) exceed its target bits; otherwise ``warnings.warn`` and deploy anyway at
            the realised width.
        example_input: a typical input batch (e.g. (32, 3, 32, 32) images). With ``path="auto"``
            every layer with more than one exact path times each on its real input from this
            batch and keeps the fastest. Without it the default is used: ``binary`` for W1A1
            layers, ``int`` otherwise.
        path: ``"auto"`` or one of ``binary``/``bitplane``/``int``/``float`` to force a path
            wherever it is allowed (layers that cannot take it keep their default). ``float``
            runs the float32 conv of the dequantized codes: bit-identical to the fake-quant
            model on the same device, but no integer arithmetic.
        reps: timed calls per path in the measurement.
        plan: attach the deploy plan (:mod:`gdnsq.deploy.plan`): ``model(x)`` runs fast integer
            segments, bit-identical to the per-layer path. ``False``: the per-layer path.

    Returns:
        The frozen model (eval mode; same class, module tree and state dict keys as without the
        plan). ``layer_table(model)`` lists each deployed layer's bits, path and measurement;
        ``gdnsq.deploy.plan_report(model)`` the plan's segments once it ran.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if path != "auto" and path not in PATHS:
        raise ValueError(f"path must be 'auto' or one of {PATHS}, got {path!r}")
    # The FP teacher that quantize_model keeps is not part of the deployment: keep it out of
    # the copy instead of duplicating it.
    model = copy_without_teacher(qmodel).eval()
    targets = [(n, m) for n, m in model.named_modules() if n and is_quantized_layer(m)]
    if not targets:
        warnings.warn("freeze: the model has no quantized layer; returning an eval-mode copy", stacklevel=2)
    for name, layer in targets:
        dep = _layer_from(name, layer, strict)
        dep.config["chosen_by"] = "default"
        if path != "auto" and path in dep.allowed_paths():
            dep.set_path(path)
            dep.config["chosen_by"] = "forced"
        model.set_submodule(name, dep) if hasattr(model, "set_submodule") else _set_submodule(model, name, dep)
    if path == "auto" and example_input is not None:
        measure_paths(model, example_input, reps=reps)
    model.eval()
    if plan:
        from .plan import attach_plan

        attach_plan(model)
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def deployed_layers(model: nn.Module) -> list:
    """``[(name, layer)]`` of the deployed layers of a frozen model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _DeployedBase)]


def measure_paths(model: nn.Module, example_input: torch.Tensor, reps: int = 2) -> dict:
    """Time every allowed path of every deployed layer on its input from ``example_input``.

    Each layer keeps its fastest path; returns ``{name: {path: ms}}``.
    """
    layers = deployed_layers(model)
    from .plan import per_layer

    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: captured.__setitem__(n, inp[0].detach()))
             for n, m in layers]
    try:
        with torch.no_grad(), per_layer(model):
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    result = {}
    for name, layer in layers:
        if name not in captured or len(layer.candidate_paths()) < 2:
            continue
        layer.choose_path(captured[name], reps=reps)
        layer.config["chosen_by"] = "measured"
        result[name] = dict(layer.config["timings_ms"])
    return result


def layer_table(model: nn.Module) -> list:
    """One dict per deployed layer: name, kind, shape, bits (realised/target), path, timings."""
    rows = []
    for name, m in deployed_layers(model):
        c = m.config
        rows.append({
            "name": name, "kind": c["kind"], "weight_shape": list(c["weight_shape"]),
            "weight_bits": c["weight_bits"], "act_bits": c.get("act_bits"),
            "realised_bits": c.get("realised_bits"), "path": c["path"],
            "chosen_by": c.get("chosen_by", "default"), "timings_ms": c.get("timings_ms"),
        })
    return rows


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def size_report(model: nn.Module) -> dict:
    """Weight bytes per deployed layer and in total, FP32 vs deployed.

    Per layer: ``fp32_bytes`` = 4 bytes per weight and bias element of the float layer;
    ``deployed_bytes`` = the packed codes + per-channel step and zero point + bias + the three
    activation parameters (everything the artifact stores for the layer). Totals add every
    other parameter and buffer of the model (FP first/last layers, BatchNorm), which are
    stored as float32 in both.
    """
    rows = []
    dep_names = set()
    for name, m in deployed_layers(model):
        dep_names.add(name)
        numel = math.prod(m.config["weight_shape"])
        out_ch = m.config["weight_shape"][0]
        fp32 = 4 * (numel + (out_ch if m.bias is not None else 0))
        deployed = sum(_tensor_bytes(b) for b in m.buffers(recurse=False))
        rows.append({"name": name, "weight_bits": m.config["weight_bits"], "act_bits": m.config.get("act_bits"),
                     "params": numel, "fp32_bytes": fp32, "deployed_bytes": deployed,
                     "ratio": fp32 / deployed})
    other = 0
    for mod_name, mod in model.named_modules():
        if mod_name in dep_names or isinstance(mod, _DeployedBase):
            continue
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t.is_floating_point():
                other += t.numel() * 4
            else:
                other += _tensor_bytes(t)
    fp32_total = sum(r["fp32_bytes"] for r in rows) + other
    dep_total = sum(r["deployed_bytes"] for r in rows) + other
    return {"layers": rows, "other_fp32_bytes": other,
            "quantized_fp32_bytes": sum(r["fp32_bytes"] for r in rows),
            "quantized_deployed_bytes": sum(r["deployed_bytes"] for r in rows),
            "total_fp32_bytes": fp32_total, "total_deployed_bytes": dep_total,
            "total_ratio": fp32_total / max(dep_total, 1)}


def format_size_report(report: dict) -> str:
    """Markdown table of :func:`size_report`."""
    lines = ["| layer | W/A bits | weights | FP32 bytes | deployed bytes | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for r in report["layers"]:
        lines.append(f"| {r['name']} | W{r['weight_bits']}A{r['act_bits'] or 32} | {r['params']} | "
                     f"{r['fp32_bytes']} | {r['deployed_bytes']} | {r['ratio']:.1f}x |")
    lines.append(f"| quantized layers | | | {report['quantized_fp32_bytes']} | "
                 f"{report['quantized_deployed_bytes']} | "
                 f"{report['quantized_fp32_bytes'] / max(report['quantized_deployed_bytes'], 1):.1f}x |")
    lines.append(f"| FP layers, BatchNorm (float32 in both) | | | {report['other_fp32_bytes']} | "
                 f"{report['other_fp32_bytes']} | 1.0x |")
    lines.append(f"| **total** | | | {report['total_fp32_bytes']} | {report['total_deployed_bytes']} | "
                 f"{report['total_ratio']:.1f}x |")
    return "\n".join(lines)


def format_layer_table(model: nn.Module) -> str:
    """Markdown table of :func:`layer_table`."""
    lines = ["| layer | W/A bits | path | chosen by | timings (ms) |", "|---|---|---|---|---|"]
    for r in layer_table(model):
        t = ", ".join(f"{p} {v:.3g}" for p, v in (r["timings_ms"] or {}).items())
        lines.append(f"| {r['name']} | W{r['weight_bits']}A{r['act_bits'] or 32} | {r['path']} | "
                     f"{r['chosen_by']} | {t} |")
    return "\n".join(lines)
