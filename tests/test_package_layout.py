"""The package's imports flow one way: no import cycle between its modules, counting imports inside function
bodies (they hide a cycle from Python at import time, not from a reader), and no import from a lower layer into
a higher one. Imports under `if TYPE_CHECKING:` are left out: they never run."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qat_tasks"

# What each part of the package may import besides itself: data flows from core up to the pipeline.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "synthetic": {"core", "data"},
    "promotion": {"core", "data"},
    "encoders": {"core", "data", "promotion"},
    "llm": {"core", "data", "promotion"},
    "serving": {"core", "data", "promotion", "encoders"},
    "monitoring": {"core", "data", "encoders"},
    "reporting": {"core", "data", "promotion", "encoders", "llm"},
    "pipeline": {"core", "data", "promotion", "encoders", "llm", "serving", "monitoring", "reporting"},
    "cli": {"core", "data", "synthetic", "promotion", "encoders", "llm", "serving", "monitoring", "reporting",
            "pipeline"},
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module under `root` (a package folder)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body (module level and inside functions)."""
    mods = modules(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the module; `from mod import name` the module holding the name
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                while target and target not in mods:  # `import a.b.c` -> the deepest module that exists
                    target = target.rpartition(".")[0]
                if target and target != name and target != root.name:
                    graph[name].add(target)
        graph.setdefault(name, set())
    return dict(graph)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def part_of(module: str) -> str:
    """The layer a module belongs to: its subpackage, or `pipeline` / `cli` for the top-level modules."""
    return module.split(".")[1] if module.count(".") else module


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        if src.count(".") == 0:  # the package itself
            continue
        for dst in sorted(targets):
            a, b = part_of(src), part_of(dst)
            if a != b and b not in ALLOWED.get(a, set()):
                out.append(f"{src} imports {dst} ({a} may import only {sorted(ALLOWED.get(a, set())) or 'nothing'})")
    return out


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted({part_of(m) for m in modules(PACKAGE) if m.count(".")} - set(ALLOWED))
    assert unknown == [], f"subpackages without a place in the layering: {unknown} (add them to ALLOWED)"


def test_no_import_cycle_counting_imports_inside_functions():
    found = cycles(import_graph(PACKAGE))
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_flow_from_lower_layers_to_higher_ones():
    assert layer_violations(import_graph(PACKAGE)) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves: a planted function-level cycle and a core module importing the pipeline."""
    pkg = tmp_path / "qat_tasks"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from qat_tasks.core import b\n")
    (pkg / "core" / "b.py").write_text("from qat_tasks.core.a import f\n")
    (pkg / "core" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from qat_tasks import pipeline\n")
    (pkg / "core" / "d.py").write_text("def g():\n    import qat_tasks.pipeline\n")
    (pkg / "pipeline.py").write_text("")
    graph = import_graph(pkg)
    assert cycles(graph) == [["qat_tasks.core.a", "qat_tasks.core.b"]]
    assert graph["qat_tasks.core.c"] == set()  # TYPE_CHECKING imports never run
    assert layer_violations(graph) == [
        "qat_tasks.core.d imports qat_tasks.pipeline (core may import only nothing)"]
