"""The import rules of docs/DESIGN.md ("Layers and import rules"), checked with ``ast`` over the
source files of ``gdnsq`` and ``gdnsq_kernels`` (nothing is imported or run).

* no module of ``gdnsq_kernels`` imports ``gdnsq``; only ``gdnsq_kernels`` imports ``triton``;
* the two op families (``gdnsq_kernels.quantize``, ``gdnsq_kernels.binary``) do not import each
  other, and the shared kernel helpers import neither;
* the method layer (the modules at the top of ``gdnsq``, and ``gdnsq.data`` / ``gdnsq.models``)
  imports none of ``gdnsq.train``, ``gdnsq.deploy``, ``gdnsq.cli``; ``gdnsq.train`` and
  ``gdnsq.deploy`` do not import ``gdnsq.cli`` (nor each other); nothing outside the CLI imports it;
* only ``gdnsq.integrations`` imports ``transformers`` / ``lightning`` / ``accelerate``, and
  nothing else imports ``gdnsq.integrations``; it imports only the method layer;
* the module-level imports form no cycle;
* the removed compatibility paths (gdnsq.trainer, ...) stay removed, and nothing imports them.
* ``gdnsq_kernels.binary``'s ``__init__`` only re-exports its modules (one per op);
* every ``torch.library`` registration (``custom_op``, ``register_fake``, ``register_autograd``,
  ``triton_op``, ``Library``) sits in ``gdnsq_kernels``: ``gdnsq`` only calls the ops.

Every import counts for the layer rules, also one inside a function (a lazy import is still a
dependency); the cycle check uses the imports that run when a module is imported (module level,
class bodies, ``if``/``try`` blocks; not function bodies, not ``if TYPE_CHECKING:``).
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gdnsq", "gdnsq_kernels")

# Old module paths that only re-exported their new homes; removed at 0.x (docs/DESIGN.md).
REMOVED_MODULES = ("gdnsq.trainer", "gdnsq.presets", "gdnsq.distributed", "gdnsq_kernels.reference",
                   "gdnsq_kernels.binary_ops")
# Shared by both op families; they must not depend on either family.
KERNEL_HELPERS = ("gdnsq_kernels.backend", "gdnsq_kernels._launch", "gdnsq_kernels._build")


# ---------------------------------------------------------------------------------------- graph


def package_sources(root: pathlib.Path = REPO) -> Dict[str, Tuple[str, bool]]:
    """{module name: (source text, is a package __init__)} of every .py file of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path.read_text(encoding="utf-8"), is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, module_level: bool) -> Iterator[ast.stmt]:
    """Import statements of ``tree``; with ``module_level`` only those that run at import time."""
    for child in ast.iter_child_nodes(tree):  # in source order
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif module_level and isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(stmt, module_level)
        else:
            yield from _import_nodes(child, module_level)


def resolve_imports(module: str, is_pkg: bool, source: str, known: Set[str],
                    module_level: bool) -> List[Tuple[str, int]]:
    """(imported module, line) pairs of ``module``.

    ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b`` when that is a module of ``known``,
    else ``a`` (a name defined in ``a``). Relative imports are resolved against ``module``'s
    package (``from . import x`` in ``p/__init__.py`` or in ``p/m.py`` is ``p.x``). A name outside
    ``known`` is kept as written (``triton.language``), for the rules on third-party imports.
    """
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in _import_nodes(ast.parse(source), module_level):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
            continue
        if node.level:
            base_parts = package.split(".")
            if node.level > 1:
                base_parts = base_parts[:-(node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            found.append((candidate if candidate in known else base, node.lineno))
    return found


def import_graph(sources: Dict[str, Tuple[str, bool]], module_level: bool) -> Dict[str, List[Tuple[str, int]]]:
    known = set(sources)
    return {m: resolve_imports(m, is_pkg, src, known, module_level) for m, (src, is_pkg) in sources.items()}


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of the directed graph ``edges`` as [a, b, ..., a], or None when it is acyclic."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


# torch.library calls that define an op or one of its implementations.
OP_REGISTRATIONS = {"custom_op", "triton_op", "register_fake", "register_autograd", "register_kernel",
                    "Library", "impl", "define"}


def op_registration_lines(source: str) -> List[int]:
    """Lines of ``source`` that call ``torch.library.<registration>`` or ``<op>.register_*``
    (as a call or a decorator), by name, so that an alias of ``torch.library`` is found too."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name not in OP_REGISTRATIONS:
            continue
        if name in ("impl", "define") and not ast.unparse(func).startswith(("torch.library.", "library.")):
            continue  # common names (``config.define``): only torch.library's count
        lines.append(node.lineno)
    return sorted(lines)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def forbidden_prefixes(module: str) -> Tuple[str, ...]:
    """What ``module`` may not import (docs/DESIGN.md, "Layers and import rules")."""
    if _under(module, "gdnsq_kernels"):
        rules = ("gdnsq",)
        if _under(module, "gdnsq_kernels.quantize"):
            rules += ("gdnsq_kernels.binary",)
        elif _under(module, "gdnsq_kernels.binary"):
            rules += ("gdnsq_kernels.quantize",)
        elif module in KERNEL_HELPERS:
            rules += ("gdnsq_kernels.quantize", "gdnsq_kernels.binary", "gdnsq_kernels.cpu_deploy")
        return rules
    rules = ("triton",)
    if not _under(module, "gdnsq.integrations"):
        # The frameworks are optional extras: only their integration modules import them, and
        # nothing imports those (``import gdnsq`` works without transformers / lightning).
        rules += ("gdnsq.integrations", "transformers", "lightning", "accelerate")
    if module == "gdnsq" or _under(module, "gdnsq.cli"):
        return rules  # the facade names the layers above; the CLI uses all
    if _under(module, "gdnsq.train"):
        return rules + ("gdnsq.cli", "gdnsq.deploy")
    if _under(module, "gdnsq.deploy"):
        return rules + ("gdnsq.cli", "gdnsq.train")
    return rules + ("gdnsq.cli", "gdnsq.train", "gdnsq.deploy")  # the method layer and data/models


def layer_violations(graph: Dict[str, List[Tuple[str, int]]]) -> List[str]:
    bad = []
    for module, imports in sorted(graph.items()):
        for target, line in imports:
            for prefix in forbidden_prefixes(module):
                if _under(target, prefix):
                    bad.append(f"{module} (line {line}) imports {target}")
    return bad


def internal_edges(graph: Dict[str, List[Tuple[str, int]]]) -> Dict[str, Set[str]]:
    return {m: {t for t, _ in imports if t in graph and t != m} for m, imports in graph.items()}


# ---------------------------------------------------------------------------------------- rules


@pytest.fixture(scope="module")
def sources():
    return package_sources()


def test_the_packages_are_found(sources):
    assert {"gdnsq", "gdnsq.cli", "gdnsq.train.trainer", "gdnsq_kernels.quantize._ops",
            "gdnsq_kernels.quantize.fused_layers", "gdnsq_kernels.binary.triton_xnor"} <= set(sources)


def test_ops_are_registered_only_in_gdnsq_kernels(sources):
    registering = {m for m, (src, _) in sources.items() if op_registration_lines(src)}
    assert sorted(m for m in registering if not _under(m, "gdnsq_kernels")) == []
    assert "gdnsq_kernels.quantize.fused_layers" in registering  # gdnsq::qconv2d / qlinear


def test_layer_rules(sources):
    assert layer_violations(import_graph(sources, module_level=False)) == []


def test_only_gdnsq_kernels_imports_triton(sources):
    graph = import_graph(sources, module_level=False)
    users = {m for m, imports in graph.items() if any(_under(t, "triton") for t, _ in imports)}
    assert users and all(_under(m, "gdnsq_kernels") for m in users), sorted(users)


def test_no_import_cycles(sources):
    edges = internal_edges(import_graph(sources, module_level=True))
    assert sum(len(v) for v in edges.values()) > 50  # the graph was really built
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_binary_init_only_reexports_its_modules(sources):
    """The binary family's logic lives one op per module; its ``__init__`` names the public API."""
    source, is_pkg = sources["gdnsq_kernels.binary"]
    public = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            public = ast.literal_eval(node.value)
            continue
        assert isinstance(node, ast.ImportFrom), f"gdnsq_kernels.binary: line {node.lineno} is not an import"
        if node.module == "__future__":
            continue
        resolved = resolve_imports("gdnsq_kernels.binary", is_pkg, ast.unparse(node), set(sources), module_level=True)
        assert all(_under(t, "gdnsq_kernels.binary") and t != "gdnsq_kernels.binary" and t in sources
                   for t, _ in resolved), f"gdnsq_kernels.binary: line {node.lineno} imports {resolved}"
    assert sorted(public) == sorted(["pack_bits", "unpack_bits", "xnor_gemm", "and_gemm", "PackedBinaryWeight",
                                     "pack_linear_weight", "pack_conv_weight", "binary_linear", "binary_conv2d"])


def test_removed_compatibility_modules_stay_gone(sources):
    assert not set(REMOVED_MODULES) & set(sources)
    # Nothing in the packages, the tests or the benchmarks imports an old path.
    known = set(sources) | set(REMOVED_MODULES)
    users = []
    for folder in ("gdnsq", "gdnsq_kernels", "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            module = ".".join(parts[:-1] if is_pkg else parts)
            for target, line in resolve_imports(module, is_pkg, path.read_text(encoding="utf-8"), known,
                                                module_level=False):
                if target in REMOVED_MODULES:
                    users.append(f"{path.relative_to(REPO)} (line {line}) imports {target}")
    assert users == []


# ----------------------------------------------------------------------- the checks can fail


def test_find_cycle_on_synthetic_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_relative_imports_resolve_to_submodules():
    known = {"p", "p.x", "p.sub", "p.sub.m", "p.sub.n"}
    # `from . import x` in a package __init__ is the submodule p.x
    assert resolve_imports("p", True, "from . import x\n", known, True) == [("p.x", 1)]
    # in a plain module it is a sibling; a name that is not a module points at its package
    src = "from . import n, helper\nfrom .. import x\nfrom ..x import f\nimport os.path\n"
    assert resolve_imports("p.sub.m", False, src, known, True) == [
        ("p.sub.n", 1), ("p.sub", 1), ("p.x", 2), ("p.x", 3), ("os.path", 4)]
    # function bodies are lazy: left out of the cycle graph, kept for the layer rules
    lazy = "def f():\n    from . import n\n"
    assert resolve_imports("p.sub.m", False, lazy, known, True) == []
    assert resolve_imports("p.sub.m", False, lazy, known, False) == [("p.sub.n", 2)]


def test_a_cycle_through_relative_imports_is_found():
    sources = {"p": ("from . import a\n", True), "p.a": ("from .b import f\n", False),
               "p.b": ("from . import a\n", False)}
    assert find_cycle(internal_edges(import_graph(sources, module_level=True))) == ["p.a", "p.b", "p.a"]


def test_op_registrations_are_found():
    source = ("import torch\nfrom torch import library as L\n"
              "@torch.library.custom_op('gdnsq::f', mutates_args=())\ndef f(x: torch.Tensor) -> torch.Tensor: ...\n"
              "f.register_autograd(None)\nlib = L.Library('gdnsq', 'FRAGMENT')\nconfig.define('not an op')\n")
    assert op_registration_lines(source) == [3, 5, 6]
    assert op_registration_lines("torch.library.define('gdnsq::g', '(Tensor x) -> Tensor')\n") == [1]


def test_layer_violations_are_reported():
    sources = {"gdnsq_kernels.quantize.x": ("import gdnsq.layers\nfrom ..binary import y\n", False),
               "gdnsq.losses": ("from .train import trainer\nimport triton\n", False),
               "gdnsq.train.trainer": ("from ..cli import main\n", False),
               "gdnsq.cli": ("from ..train import trainer\n", True)}
    assert layer_violations(import_graph(sources, module_level=False)) == [
        "gdnsq.losses (line 1) imports gdnsq.train.trainer",
        "gdnsq.losses (line 2) imports triton",
        "gdnsq.train.trainer (line 1) imports gdnsq.cli",
        "gdnsq_kernels.quantize.x (line 1) imports gdnsq.layers",
        "gdnsq_kernels.quantize.x (line 2) imports gdnsq_kernels.binary",
    ]
