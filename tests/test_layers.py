"""The package's layers, checked on the source: core ← organism ← studies ← apps, no cycles, no private names shared.

Every ``import`` and ``from … import`` counts, at module level or inside a function (imports inside functions once
hid two cycles). Layers: ``tellnorm.apps.*`` (applications), ``tellnorm.studies.*`` (the paper's studies on a model),
``tellnorm.organism.*`` (the study subject tellnorm builds), everything else the core. A module may import its own
layer or a lower one; the core imports none of the others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tellnorm"
LAYERS = ("core", "organism", "studies", "apps")  # lowest first


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    second = module.split(".")[1] if module.count(".") else ""
    return second if second in ("organism", "studies", "apps") else "core"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str, known: dict) -> list[tuple[str, int, list[str]]]:
    """(imported tellnorm module, line, names taken from it) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(sub, node.lineno, []) for sub in submodules]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest or not submodules:
                found.append((target, node.lineno, rest))
    result = []
    for target, line, names in found:
        if not (target == "tellnorm" or target.startswith("tellnorm.")):
            continue
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target != name:
            result.append((target, line, names))
    return result


def import_graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    known = modules()
    graph, upward, private = {}, [], []
    for name, path in known.items():
        edges = graph.setdefault(name, set())
        for target, line, names in imported_names(path, name, known):
            # the lazy namespace: no module imports through it
            if target == "tellnorm" and set(names) - {"__version__"}:
                upward.append(f"{name}:{line} imports from the top-level namespace; import the defining module")
                continue
            if target == "tellnorm":
                continue
            edges.add(target)
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)):
                upward.append(f"{name}:{line} ({layer_of(name)}) imports {target} ({layer_of(target)})")
            private += [f"{name}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
    return graph, upward, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. every import cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_level_imports():
    graph, _, _ = import_graph()
    assert "tellnorm.backends.vllm" in graph["tellnorm.backends"]  # imported inside load_model only
    assert len(graph) > 60


def test_no_module_imports_a_higher_layer():
    _, upward, _ = import_graph()
    assert upward == []


def test_no_import_cycles():
    graph, _, _ = import_graph()
    # A package imports its submodules to re-export them; a submodule importing a sibling through the package's
    # __init__ is not a cycle of code. Only module-to-module cycles count.
    def parent_edge(a: str, b: str) -> bool:
        return b.startswith(a + ".")

    pruned = {a: {b for b in targets if not parent_edge(a, b)} for a, targets in graph.items()}
    assert cycles(pruned) == []


def test_no_private_name_is_imported_across_modules():
    _, _, private = import_graph()
    assert private == []


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    fake = tmp_path / "tellnorm"
    (fake / "apps").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "apps" / "__init__.py").write_text("")
    (fake / "norms.py").write_text("def f():\n    from tellnorm.apps.cli import main\n")
    (fake / "apps" / "cli.py").write_text("from tellnorm.norms import f\nfrom tellnorm.norms import _hidden\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph, upward, private = import_graph()
    assert upward == ["tellnorm.norms:2 (core) imports tellnorm.apps.cli (apps)"]
    assert cycles(graph) == [["tellnorm.apps.cli", "tellnorm.norms"]]
    assert private == ["tellnorm.apps.cli:2 imports tellnorm.norms._hidden"]


@pytest.mark.parametrize("layer", LAYERS[1:])
def test_each_layer_has_its_folder(layer):
    assert (PACKAGE / layer / "__init__.py").is_file()
