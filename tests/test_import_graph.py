"""The package's module-level import graph has no cycles: a cycle held together only by import order
breaks the first time someone reorders imports or imports a module on its own. Imports inside
functions (optional heavy libraries, lazy registries) are not edges: they run after every module
has loaded. Read from source with ast, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the `harness` namespace: top-level folders mapped into it (pyproject's package-dir)
PACKAGES = {"harness": ROOT / "harness", "harness.adapters": ROOT / "adapters", "harness.reports": ROOT / "reports",
            "harness.suites": ROOT / "suites", "harness.hardware_profiles": ROOT / "hardware_profiles"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if any(name.startswith(other + ".") and other != pkg and other.startswith(pkg) for other in PACKAGES):
                continue  # harness/ does not contain the mapped folders, but be safe
            out[name] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def module_level_imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:  # top-level statements only (an `if TYPE_CHECKING:` block is not run)
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            if t.startswith("harness") and (m := _resolve(t, known)) and m != name:
                out.add(m)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_level_import_cycles():
    known = modules()
    assert "harness.cli.main" in known and "harness.reports.html" in known
    graph = {name: module_level_imports(path, name, known) for name, path in known.items()}
    # a package's __init__ importing its own submodules is an edge like any other
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)
