"""The package's shape, read from source with ast (nothing is imported to check it): the module-level
import graph has no cycles, no module imports another module's private names, no function outside
the fused kernels is over 80 lines.

The module-level import graph has no cycles: a cycle held together only by import order
breaks the first time someone reorders imports or imports a module on its own. Imports inside
functions (optional heavy libraries, lazy registries) are not edges: they run after every module
has loaded. Read from source with ast, so nothing is imported to check it."""

from __future__ import annotations

import ast
import importlib.util
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


def private_imports(path: Path, name: str) -> list[str]:
    """`from harness.x import _private` in module `name`, x another module (anywhere in the file,
    functions included): a helper shared across modules is public, or it is not shared."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        if not base.startswith("harness") or base == name:
            continue
        found += [f"{name}:{node.lineno} imports {a.name} from {base}" for a in node.names
                  if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_walker_sees_a_private_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from harness.adapters.llamacpp import _x, public\n")
    assert private_imports(path, "harness.adapters.other") == ["harness.adapters.other:2 imports _x from harness.adapters.llamacpp"]
    assert private_imports(path, "harness.adapters.llamacpp") == []


def test_no_private_names_imported_across_modules():
    known = modules()
    found = [line for name, path in known.items() for line in private_imports(path, name)]
    assert not found, "private names imported from another module (make them public):\n" + "\n".join(found)


def test_no_function_over_80_lines():
    """Outside the fused kernels (harness/perf/kernels/), a function longer than 80 lines is split
    into named helpers (tools/long_functions.py lists them)."""
    spec = importlib.util.spec_from_file_location("long_functions", ROOT / "tools" / "long_functions.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.MAX_LINES == 80 and tool.EXEMPT == ("harness/perf/kernels/",)
    found = tool.long_functions(("harness", "adapters", "reports"), 80, ROOT)
    assert not found, "functions over 80 lines:\n" + "\n".join(f"{p}:{line} {n} ({k} lines)" for p, n, line, k in found)
