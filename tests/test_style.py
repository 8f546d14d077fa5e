"""The package's public surface is typed and documented, and ruff is clean on the tree.

Public = a module-level function or class whose name has no leading underscore, and the public methods of a public
class. Each takes type hints on every parameter (``self``/``cls`` aside) and its return (``__init__`` aside), and
has a docstring. Properties and ``Protocol`` stubs count too: they are what a notebook's tab completion shows.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tellnorm"


def public_definitions(tree: ast.Module):
    """(function or class node, enclosing public class or None) for every public definition of a module."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node, None
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield node, None
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not sub.name.startswith("_") or sub.name == "__init__"):
                    yield sub, node


def problems_of(path: Path) -> list[str]:
    """What a module's public surface lacks, one line each."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    found = []
    for node, owner in public_definitions(tree):
        name = f"{owner.name}.{node.name}" if owner else node.name
        if node.name != "__init__" and ast.get_docstring(node) is None:
            found.append(f"{where}:{node.lineno} {name}: no docstring")
        if isinstance(node, ast.ClassDef):
            continue
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        if owner is not None and args and args[0].arg in ("self", "cls"):
            args = args[1:]
        untyped = [a.arg for a in args if a.annotation is None]
        untyped += [f"*{v.arg}" for v in (node.args.vararg, node.args.kwarg) if v is not None and v.annotation is None]
        if untyped:
            found.append(f"{where}:{node.lineno} {name}: no type hint for {', '.join(untyped)}")
        if node.returns is None and node.name != "__init__":
            found.append(f"{where}:{node.lineno} {name}: no return type")
    return found


def test_public_functions_and_classes_are_typed_and_documented():
    problems = [p for path in sorted(PACKAGE.rglob("*.py")) for p in problems_of(path)]
    assert problems == [], f"{len(problems)} gaps:\n" + "\n".join(problems)


def test_the_checker_finds_each_gap(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    module = tmp_path / "m.py"
    module.write_text('def f(x, y: int):\n    return x\n\n\nclass C:\n    def g(self) -> int:\n        """G."""\n'
                      '        return 1\n\n\ndef _private(x):\n    pass\n')
    assert problems_of(module) == ["m.py:1 f: no docstring", "m.py:1 f: no type hint for x", "m.py:1 f: no return type",
                                   "m.py:5 C: no docstring"]


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run([ruff, "check", "--no-cache", "tellnorm", "tests"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-4000:]
