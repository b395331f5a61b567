"""Where the quantizers go: the candidate layers of a model and the rules that keep some FP.

Candidates (in ``named_modules()`` order):

* every ``nn.Conv2d`` (grouped and depthwise included) and ``nn.Linear``;
* the four projections of every ``nn.MultiheadAttention`` at ``<mha>``, named as in the
  converted model: ``<mha>.q_proj``, ``<mha>.k_proj``, ``<mha>.v_proj`` (split from the packed
  ``in_proj_weight``, or its separate ``q/k/v_proj_weight``) and ``<mha>.out_proj``.

Default FP rules, read from the model's structure (a ``torch.fx`` trace of ``forward``, with
the layers, ``nn.MultiheadAttention`` and ``nn.Embedding`` as opaque nodes):

* :data:`RULE_INPUT`: the layers that see the model's input, i.e. the first Conv2d / Linear
  on a path from an input that passes through no other layer (an ``nn.Embedding`` on the path
  is the input layer itself, and it is not a candidate: a token model keeps no projection FP);
* :data:`RULE_CLASSIFIER`: the ``nn.Linear`` layers whose output reaches the model output
  through no other layer (the classifier; both heads of a two-head model);
* :data:`RULE_PROJECTION`: 1x1 convs that are residual projections: the conv (and whatever
  follows it, e.g. its BatchNorm) feeds an addition whose other operand is computed from the
  conv's own input through at least one other layer, as a ResNet ``downsample`` /
  ``shortcut``. The 1x1 convs *inside* a branch (MobileNet / EfficientNet pointwise expand and
  project convs, ResNet bottleneck 1x1s) are quantized.

When the whole model cannot be traced (data-dependent Python control flow in ``forward``),
the residual rule is found block by block (each child module traced on its own, down to the
ones that trace), and a 1x1 conv that no successful trace reaches is a projection when a part of
its name contains ``downsample`` or ``shortcut``; the input and classifier rules fall back to
registration order: the first candidate (with its sibling q/k/v projections when it is one;
none when an ``nn.Embedding`` is registered before it) and the last ``nn.Linear``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

RULE_INPUT = "input layer"
RULE_CLASSIFIER = "classifier"
RULE_PROJECTION = "residual projection"
RULE_EXCLUDED = "excluded"

#: the projections of an attention module, in the order they are listed
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_INPUT_PROJECTIONS = ATTENTION_PROJECTIONS[:3]
_SHORTCUT_WORDS = ("downsample", "shortcut")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# tensor metadata: a node that reads only these carries no data from its source tensor
_METADATA_ATTRS = ("shape", "dtype", "device", "ndim", "is_cuda")
_METADATA_METHODS = ("size", "dim", "ndimension", "numel")


@dataclass(frozen=True)
class Candidate:
    """A layer that can be quantized.

    ``name``: its name in the converted model; ``owner``: the module of the FP model that holds
    its weight (the layer itself, or its ``nn.MultiheadAttention``); ``kind``: ``"conv2d"``,
    ``"linear"`` or ``"attention"`` (a projection of an attention module).
    """

    name: str
    owner: str
    kind: str

    @property
    def projection(self) -> str | None:
        """``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` for an attention projection."""
        return self.name.rpartition(".")[2] if self.kind == "attention" else None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def find_candidates(model: nn.Module) -> list[Candidate]:
    """Every quantizable layer of ``model`` (see the module docstring), in module order."""
    out: list[Candidate] = []
    attention: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(a + ".") for a in attention):
            continue  # the out_proj Linear of an attention module: listed with the module
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
            out.extend(Candidate(_join(name, p), name, "attention") for p in ATTENTION_PROJECTIONS)
        elif isinstance(module, nn.Conv2d):
            out.append(Candidate(name, name, "conv2d"))
        elif isinstance(module, nn.Linear):
            out.append(Candidate(name, name, "linear"))
    return out


# ------------------------------------------------------------------------------------ tracing


class _LayerTracer(fx.Tracer):
    """Symbolic tracer that keeps layers opaque: only the wiring between them is traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention, nn.Embedding,
                              nn.EmbeddingBag)) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module) -> fx.Graph | None:
    """The fx graph of ``module.forward``, or None when it cannot be traced symbolically."""
    try:
        return _LayerTracer().trace(module)
    except Exception:  # noqa: BLE001 - tracing user code fails with any exception type
        return None


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS))


def _is_metadata(node: fx.Node) -> bool:
    """True for ``x.shape`` / ``x.size()`` / ``len(x)``...: values that depend on a tensor's
    shape, not on its data (a layer fed ``x.size(0)`` does not see ``x``)."""
    if node.op == "call_function":
        return node.target is len or (node.target is getattr and len(node.args) > 1
                                      and node.args[1] in _METADATA_ATTRS)
    return node.op == "call_method" and node.target in _METADATA_METHODS


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if not _is_metadata(n)]


def _data_users(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.users if not _is_metadata(n)]


def _reachable(start: fx.Node, forward: bool, avoid: fx.Node | None = None) -> set[fx.Node]:
    """Nodes reachable from ``start`` through data edges, forward (users) or backward (inputs),
    never passing through ``avoid``; ``start`` itself excluded."""
    seen: set[fx.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        for nxt in (_data_users(node) if forward else _data_inputs(node)):
            if nxt not in seen and nxt is not avoid:
                seen.add(nxt)
                stack.append(nxt)
    return seen


class _Graph:
    """A traced graph of the module at ``prefix`` with the model's layers marked.

    ``layers`` maps the call_module nodes of layers (candidates, attention modules, embeddings,
    and opaque torch.nn modules that hold candidates, e.g. ``nn.TransformerEncoderLayer``) to
    the module's full name in the model.
    """

    def __init__(self, graph: fx.Graph, prefix: str, model: nn.Module, candidates: list[Candidate]):
        self.graph = graph
        owners = {c.owner for c in candidates}
        self.layers: dict[fx.Node, str] = {}
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            full = _join(prefix, node.target)
            module = model.get_submodule(full)
            holds = any(c.owner.startswith(full + ".") for c in candidates)
            if full in owners or holds or isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                self.layers[node] = full

    def residual_projections(self, model: nn.Module) -> set[str]:
        """1x1 convs of this graph that are residual projections (module docstring)."""
        found = set()
        for node, name in self.layers.items():
            module = model.get_submodule(name)
            if not (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)):
                continue
            if node.args and isinstance(node.args[0], fx.Node) and self._feeds_shortcut_add(node):
                found.add(name)
        return found

    def _feeds_shortcut_add(self, conv: fx.Node) -> bool:
        """True when ``conv`` reaches an addition (through non-layer nodes) whose other operand
        is computed from the conv's input through at least one other layer."""
        from_input = _reachable(conv.args[0], forward=True, avoid=conv)
        stack, seen = [conv], {conv}
        while stack:
            node = stack.pop()
            for user in _data_users(node):
                if user in seen or user in self.layers:
                    continue
                seen.add(user)
                if not _is_add(user):
                    stack.append(user)
                    continue
                for other in _data_inputs(user):
                    if other is node:
                        continue
                    on_path = (_reachable(other, forward=False) | {other}) & from_input
                    if any(n in self.layers for n in on_path):
                        return True
        return False

    def input_nodes(self) -> list[tuple[fx.Node, list[int]]]:
        """Layer nodes reached from a placeholder through no other layer, with the positions
        (0 = query, 1 = key, 2 = value for attention) of their inputs that are so reached."""
        raw: dict[fx.Node, bool] = {}
        hits = []
        for node in self.graph.nodes:
            if node.op == "placeholder":
                raw[node] = True
                continue
            inputs_raw = [raw.get(n, False) for n in _data_inputs(node)]
            if node in self.layers:
                raw[node] = False
                if any(inputs_raw):
                    positions = [i for i, a in enumerate(self._attention_inputs(node))
                                 if isinstance(a, fx.Node) and raw.get(a, False)]
                    hits.append((node, positions))
            else:
                raw[node] = any(inputs_raw) and not _is_metadata(node)
        return hits

    @staticmethod
    def _attention_inputs(node: fx.Node) -> list:
        """query, key, value of an attention call (positional or keyword; missing ones None)."""
        args = list(node.args[:3]) + [None] * (3 - len(node.args[:3]))
        for i, key in enumerate(("query", "key", "value")):
            if key in node.kwargs:
                args[i] = node.kwargs[key]
        return args

    def output_layers(self) -> list[fx.Node]:
        """Layer nodes whose output reaches the graph's output through no other layer."""
        found, seen = [], set()
        stack = [n for n in self.graph.nodes if n.op == "output"]
        while stack:
            node = stack.pop()
            for src in _data_inputs(node):
                if src in seen:
                    continue
                seen.add(src)
                if src in self.layers:
                    found.append(src)
                else:
                    stack.append(src)
        return found


def _trace_blocks(model: nn.Module, module: nn.Module, prefix: str,
                  candidates: list[Candidate]) -> list[_Graph]:
    """Graphs of ``module`` or, where it does not trace, of its children (recursively)."""
    graph = _trace(module)
    if graph is not None:
        return [_Graph(graph, prefix, model, candidates)]
    out = []
    for name, child in module.named_children():
        full = _join(prefix, name)
        if any(c.owner.startswith(full + ".") for c in candidates):
            out.extend(_trace_blocks(model, child, full, candidates))
    return out


# -------------------------------------------------------------------------------------- rules


def _under(prefix: str, c: Candidate) -> bool:
    return prefix == "" or c.owner == prefix or c.owner.startswith(prefix + ".")


def _first_under(prefix: str, candidates: list[Candidate]) -> list[str]:
    """The first candidate under ``prefix`` (with its q/k/v siblings when it is a projection)."""
    under = [c for c in candidates if _under(prefix, c)]
    if not under:
        return []
    first = under[0]
    if first.kind == "attention":
        return [_join(first.owner, p) for p in _INPUT_PROJECTIONS]
    return [first.name]


def _embedding_first(model: nn.Module, candidates: list[Candidate]) -> bool:
    """True when an nn.Embedding is registered before the first candidate (a token model)."""
    first_owner = candidates[0].owner
    for name, module in model.named_modules():
        if name == first_owner:
            return False
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return True
    return False


def _last_linear_under(prefix: str, candidates: list[Candidate]) -> list[str]:
    """The last Linear under ``prefix`` (an attention module's out_proj counts)."""
    under = [c for c in candidates if _under(prefix, c) and c.kind != "conv2d"
             and c.projection in (None, "out_proj")]
    return [under[-1].name] if under else []


def _residual_projections(model: nn.Module, blocks: list[_Graph], candidates: list[Candidate]) -> set[str]:
    """From the traced blocks, plus the name-based fallback for the 1x1 convs no trace reached."""
    found = {name for g in blocks for name in g.residual_projections(model)}
    covered = {name for g in blocks for name in g.layers.values()}
    for c in candidates:
        if c.kind != "conv2d" or c.owner in covered:
            continue
        if tuple(model.get_submodule(c.owner).kernel_size) != (1, 1):
            continue
        if any(word in part.lower() for part in c.name.split(".") for word in _SHORTCUT_WORDS):
            found.add(c.name)
    return found


def _input_layers(model: nn.Module, graph: _Graph | None, candidates: list[Candidate]) -> list[str]:
    """Candidates that see a model input (registration-order fallback without a graph)."""
    if graph is None:
        return [] if _embedding_first(model, candidates) else _first_under("", candidates)
    owners = {c.owner for c in candidates}
    found = []
    for node, positions in graph.input_nodes():
        name = graph.layers[node]
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            found += [_join(name, _INPUT_PROJECTIONS[i]) for i in positions]
        elif name in owners:
            found.append(name)
        elif not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            found += _first_under(name, candidates)  # an opaque module that holds layers
    return found


def _classifiers(model: nn.Module, graph: _Graph | None, candidates: list[Candidate]) -> list[str]:
    """Linear candidates that produce the model output (the last nn.Linear without a graph)."""
    if graph is None:
        return _last_linear_under("", [c for c in candidates if c.kind == "linear"])
    owners = {c.owner for c in candidates}
    found = []
    for node in graph.output_layers():
        name = graph.layers[node]
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            found.append(_join(name, "out_proj"))
        elif isinstance(module, nn.Linear) and name in owners:
            found.append(name)
        elif name not in owners and not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            found += _last_linear_under(name, candidates)  # an opaque module that holds layers
    return found


def default_fp_layers(model: nn.Module, candidates: list[Candidate] | None = None, *,
                      keep_first: bool = True, keep_last: bool = True,
                      keep_projections: bool = True) -> dict[str, str]:
    """``{candidate name: rule}`` of the candidates the default rules keep FP, in candidate order
    (a layer both input layer and classifier, as in a one-layer model, is listed as classifier).

    Args:
        model: the FP model (not yet converted).
        candidates: :func:`find_candidates` of ``model`` (computed when None).
        keep_first / keep_last / keep_projections: apply :data:`RULE_INPUT` /
            :data:`RULE_CLASSIFIER` / :data:`RULE_PROJECTION`.
    """
    if candidates is None:
        candidates = find_candidates(model)
    if not candidates or not (keep_first or keep_last or keep_projections):
        return {}
    traced = _trace(model)
    graph = None if traced is None else _Graph(traced, "", model, candidates)
    rules: dict[str, str] = {}
    if keep_projections:
        blocks = [graph] if graph is not None else _trace_blocks(model, model, "", candidates)
        rules.update(dict.fromkeys(_residual_projections(model, blocks, candidates), RULE_PROJECTION))
    if keep_first:
        rules.update(dict.fromkeys(_input_layers(model, graph, candidates), RULE_INPUT))
    if keep_last:
        rules.update(dict.fromkeys(_classifiers(model, graph, candidates), RULE_CLASSIFIER))
    return {c.name: rules[c.name] for c in candidates if c.name in rules}
