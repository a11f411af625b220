"""The package's layout, read from the source by AST: no import cycle, no private name used across modules,
modules small enough to read, the trainer's main a short sequence of named steps.

Imports are taken wherever they stand (a function-level import is an edge too: it is how the old data <->
prepare cycle hid). ``from uamt_fast.x import y`` is an edge to ``uamt_fast.x.y`` when that is a module, else
to ``uamt_fast.x``; the implicit import of a parent package is not an edge (every module would then depend
on ``uamt_fast/__init__``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600
MAX_MAIN_LINES = 60


def package_modules() -> dict[str, Path]:
    """Module name -> file, for uamt_fast/ and kernels/ (installed as uamt_fast.kernels)."""
    modules = {}
    for base, prefix in ((ROOT / "uamt_fast", "uamt_fast"), (ROOT / "kernels", "uamt_fast.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


MODULES = package_modules()
CHECKED = {**MODULES, **{f"benchmarks.{p.stem}": p for p in sorted((ROOT / "benchmarks").glob("*.py"))},
           **{f"tests.{p.relative_to(ROOT / 'tests').with_suffix('').as_posix().replace('/', '.')}": p
              for p in sorted((ROOT / "tests").rglob("*.py"))}, "train": ROOT / "train.py"}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def edges(path: Path) -> set[str]:
    out = set()
    for module, names in imports(path):
        if not module.startswith("uamt_fast"):
            continue
        subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        out.update(subs)
        if len(subs) < len(names) or not names:
            out.add(module)
    return out


def test_no_import_cycle():
    graph = {name: edges(path) & MODULES.keys() for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def private_uses(path: Path) -> list[str]:
    """``from uamt_fast.x import _y`` and ``x._y`` where ``x`` names a uamt_fast module imported here."""
    tree = ast.parse(path.read_text(), str(path))
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uamt_fast"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                if f"{node.module}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("uamt_fast"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "uamt_fast"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_no_private_name_of_another_module(name):
    assert private_uses(CHECKED[name]) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_short_enough_to_read(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines (at most {MAX_LINES})"


def test_the_trainers_main_is_a_short_sequence_of_named_steps():
    tree = ast.parse((ROOT / "uamt_fast" / "train.py").read_text())
    (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert main.end_lineno - main.lineno + 1 <= MAX_MAIN_LINES
    assert not any(isinstance(n, ast.Nonlocal) for n in ast.walk(tree)), "state in closures: use the typed Run"
