"""Model conversion: ``quantize_model`` (FP model -> GDNSQ student) and ``teacher_of``.

Default placement (METHOD Part A item 4, Part B §5; the rules are in :mod:`gdnsq.placement`):

* every ``nn.Conv2d`` (grouped and depthwise too), ``nn.Linear`` and the four projections of
  every ``nn.MultiheadAttention`` are candidates, in ``named_modules()`` order;
* the layers that see the model input, the classifier and the 1x1 convs that are residual
  projections (ResNet ``downsample``) stay FP, found from the model's traced graph;
* every other candidate becomes :class:`~gdnsq.layers.QConv2d` / :class:`~gdnsq.layers.QLinear`:
  per-channel weight quantizer plus one per-tensor activation quantizer on its input; an
  attention module with a quantized projection becomes a
  :class:`~gdnsq.attention.QMultiheadAttention`;
* BatchNorm, LayerNorm, activations, pooling, residual adds and the attention's softmax are
  untouched (FP, BN unfused, train mode).

``exclude`` / ``include`` override any rule. Each candidate kept FP carries the rule that kept
it in a ``_gdnsq_fp_rule`` attribute (``gdnsq.summary`` shows it).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from numbers import Real

from torch import nn

from . import placement
from .attention import QMultiheadAttention, disable_fused_transformer_paths
from .layers import QConv2d, QLinear
from .quantizers import ESTIMATORS, _check_bits

_TEACHER_ATTR = "_gdnsq_teacher"
#: attribute of a candidate module kept FP: the rule that kept it (a placement.RULE_* string)
FP_RULE_ATTR = "_gdnsq_fp_rule"


class _ApplyWithTeacher:
    """A student's ``_apply`` (set on the instance by :func:`quantize_model`) that also applies
    ``fn`` to the student's teacher.

    Every device or dtype move of a module (``.to()``, ``.cuda()``, ``.double()``,
    ``.to(memory_format=...)``; also of a module that holds the student) goes through
    ``_apply``, so the teacher follows the student without being one of its submodules. An
    object, not a bound method, so that copies and pickles of the student keep it.
    """

    def __init__(self, student: nn.Module):
        self.student = student

    def __call__(self, fn, recurse=True):
        student = self.student
        teacher = student.__dict__.get(_TEACHER_ATTR)
        if teacher is not None:
            teacher._apply(fn, recurse)
        return type(student)._apply(student, fn, recurse)


def _names(arg, what: str) -> list[str]:
    if arg is None:
        return []
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, Iterable):
        out = list(arg)
        if not all(isinstance(n, str) for n in out):
            raise TypeError(f"{what} must be a module name or an iterable of module names (str)")
        return out
    raise TypeError(f"{what} must be a module name or an iterable of module names, got {type(arg).__name__}")


def _expand(names: list[str], modules: dict[str, nn.Module], candidates: list[str], what: str) -> set[str]:
    """Candidate layer names selected by ``names``: a layer itself (an attention projection
    ``<mha>.q_proj`` included), or every layer under a container."""
    out: set[str] = set()
    for n in names:
        if n not in modules and n not in candidates:
            raise ValueError(f"{what}: no module named {n!r} in the model")
        hits = [c for c in candidates if c == n or (n == "" or c.startswith(n + "."))]
        if not hits:
            raise ValueError(f"{what}: module {n!r} is not (and contains no) nn.Conv2d / nn.Linear / "
                             f"nn.MultiheadAttention")
        out.update(hits)
    return out


def _per_layer(value, name: str, layers: list[str], allow_none: bool) -> dict[str, float | None]:
    """Resolve a bits argument (number, None, or dict name -> bits with optional "*" default)."""
    if isinstance(value, Mapping):
        unknown = [k for k in value if k != "*" and k not in layers]
        if unknown:
            raise ValueError(f"{name}: {unknown} are not quantized layers (quantized: {layers})")
        out = {}
        for layer in layers:
            if layer in value:
                v = value[layer]
            elif "*" in value:
                v = value["*"]
            else:
                raise ValueError(f"{name}: no entry for layer {layer!r} and no '*' default")
            out[layer] = None if (v is None and allow_none) else _check_bits(v, f"{name}[{layer!r}]")
        return out
    if value is None and allow_none:
        return {layer: None for layer in layers}
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number of bits or a dict layer name -> bits, "
                        f"got {type(value).__name__}")
    b = _check_bits(value, name)
    return {layer: b for layer in layers}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_model(model: nn.Module, weight_bits, act_bits, *, exclude=None, include=None,
                   keep_first: bool = True, keep_last: bool = True, keep_projections: bool = True,
                   signed="auto", estimator: str = "ste", per_channel: bool = True,
                   dither: bool = True, inplace: bool = False, teacher: bool = True) -> nn.Module:
    """Convert an FP model into a GDNSQ student; a frozen FP teacher is kept (see ``teacher_of``).

    Args:
        model: any ``nn.Module`` built from ``nn.Conv2d`` / ``nn.Linear`` /
            ``nn.MultiheadAttention`` (plus anything else, which is left alone).
        weight_bits: target weight bits, a number or a dict layer name -> bits (key "*" gives
            the default for layers not listed).
        act_bits: target activation bits, same forms; ``None`` (globally or per layer) leaves
            the layer's input FP (weights-only quantization, "A32").
        exclude: names of layers (or containers: every layer under them) to keep FP, on top of
            the default rules. Unknown names raise ValueError.
        include: names of layers (or containers) to quantize even where a default rule would keep
            them FP (input layer, classifier, residual projection). Unknown names raise
            ValueError. An attention projection is named ``<mha>.q_proj`` / ``k_proj`` /
            ``v_proj`` / ``out_proj``.
        keep_first: keep the layers that see the model input FP.
        keep_last: keep the classifier (the Linear layers that produce the output) FP.
        keep_projections: keep the 1x1 convs that are residual projections FP (ResNet
            ``downsample``; pointwise convs inside a block are quantized).
        signed: activation offset rule: "auto" (default; decided at calibration from the data:
            offset fixed at 0 when the calibration minimum of the input is >= 0, e.g. after a
            ReLU, learnable otherwise), True (always learnable) or False (always 0).
        estimator: weight-gradient estimator, "ste" (default) or "aewgs".
        per_channel: per-output-channel weight steps (default) or one per tensor.
        dither: use the dithered step gradient (METHOD Part A item 1).
        inplace: convert ``model`` itself instead of a deep copy.
        teacher: keep a frozen FP copy of ``model`` for distillation (:func:`teacher_of`). It
            moves with the student (``.to()``, ``.cuda()``, dtype casts) and stays out of the
            student's ``state_dict()`` and ``parameters()``. False: no copy (training against
            labels, or a teacher of one's own).

    Returns:
        The student: same module tree with the chosen layers replaced by QConv2d / QLinear
        (state_dict keys of the original layers are kept: ``<name>.weight``, ``<name>.bias``,
        plus ``<name>.weight_quantizer.*`` and ``<name>.act_quantizer.*``), and each
        ``nn.MultiheadAttention`` with a chosen projection replaced by a QMultiheadAttention
        (keys ``<mha>.q_proj.weight`` ... instead of the packed ``<mha>.in_proj_weight``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (signed is True or signed is False or (isinstance(signed, str) and signed == "auto")):
        raise ValueError(f"signed must be 'auto', True or False, got {signed!r}")
    if not isinstance(teacher, bool):
        raise TypeError(f"teacher must be True or False, got {type(teacher).__name__}")
    exclude, include = _names(exclude, "exclude"), _names(include, "include")

    fp_copy = None
    if teacher:
        fp_copy = copy.deepcopy(model)
        fp_copy.eval()
        fp_copy.requires_grad_(False)
    student = model if inplace else copy.deepcopy(model)

    modules = dict(student.named_modules())
    if any(isinstance(m, (QConv2d, QLinear, QMultiheadAttention)) for m in modules.values()):
        raise ValueError("model already contains QConv2d/QLinear layers (quantize_model applied twice?)")
    candidates = placement.find_candidates(student)
    names = [c.name for c in candidates]
    excluded = _expand(exclude, modules, names, "exclude")
    included = _expand(include, modules, names, "include")
    both = excluded & included
    if both:
        raise ValueError(f"layers both included and excluded: {sorted(both)}")

    default_fp = placement.default_fp_layers(student, candidates, keep_first=keep_first,
                                             keep_last=keep_last, keep_projections=keep_projections)
    chosen = [n for n in names if n not in excluded and (n not in default_fp or n in included)]

    w_bits = _per_layer(weight_bits, "weight_bits", chosen, allow_none=False)
    a_bits = _per_layer(act_bits, "act_bits", chosen, allow_none=True)
    layer_kwargs = {name: dict(weight_bits=w_bits[name], act_bits=a_bits[name], signed=signed,
                               estimator=estimator, per_channel=per_channel, dither=dither)
                    for name in chosen}
    attention: dict[str, dict[str, dict]] = {}  # attention module -> {projection: QLinear kwargs}
    for c in candidates:
        if c.name not in layer_kwargs:
            continue
        if c.kind == "attention":
            attention.setdefault(c.owner, {})[c.projection] = layer_kwargs[c.name]
        else:
            cls = QConv2d if c.kind == "conv2d" else QLinear
            _set_submodule(student, c.name, cls.from_float(modules[c.name], **layer_kwargs[c.name]))
    for owner, quantize in attention.items():
        _set_submodule(student, owner, QMultiheadAttention.from_float(modules[owner], quantize))
    disable_fused_transformer_paths(student)
    _record_fp_rules(student, candidates, set(chosen), excluded, default_fp)

    if fp_copy is not None:
        # Not a submodule (a container such as nn.Sequential would run it, and the teacher
        # would enter the student's state_dict and parameters): a plain attribute, moved with
        # the student by the instance's _apply.
        object.__setattr__(student, _TEACHER_ATTR, fp_copy)
        object.__setattr__(student, "_apply", _ApplyWithTeacher(student))
    return student


def _record_fp_rules(student: nn.Module, candidates, chosen: set[str], excluded: set[str],
                     default_fp: dict[str, str]) -> None:
    """Set ``FP_RULE_ATTR`` on every candidate kept FP: the rule, or "excluded" (by the user).

    A projection of an attention module that stayed ``nn.MultiheadAttention`` (none of its
    projections quantized) has no module of its own: the attention module gets its rules.
    """
    kept_whole: dict[str, list[str]] = {}
    for c in candidates:
        if c.name in chosen:
            continue
        rule = placement.RULE_EXCLUDED if c.name in excluded else default_fp[c.name]
        if c.kind == "attention" and isinstance(student.get_submodule(c.owner), nn.MultiheadAttention):
            kept_whole.setdefault(c.owner, [])
            if rule not in kept_whole[c.owner]:
                kept_whole[c.owner].append(rule)
        else:
            setattr(student.get_submodule(c.name), FP_RULE_ATTR, rule)
    for owner, rules in kept_whole.items():
        setattr(student.get_submodule(owner), FP_RULE_ATTR, ", ".join(rules))


def teacher_of(student: nn.Module) -> nn.Module:
    """The frozen FP copy taken by ``quantize_model`` (eval mode, requires_grad False).

    It moves with the student (``student.to(device)`` moves it too) and is in neither the
    student's ``state_dict()`` nor its ``parameters()``.
    """
    teacher = student.__dict__.get(_TEACHER_ATTR)
    if teacher is None:
        raise ValueError("student has no teacher: it was not made by gdnsq.quantize_model, or made with "
                         "teacher=False")
    return teacher


def copy_without_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` without its teacher (the teacher is not copied)."""
    teacher = student.__dict__.get(_TEACHER_ATTR)
    memo = {id(teacher): None} if teacher is not None else {}
    model = copy.deepcopy(student, memo)
    model.__dict__.pop(_TEACHER_ATTR, None)
    model.__dict__.pop("_apply", None)
    return model
