"""List functions and methods longer than a limit (default 80 lines, decorators and docstring
included: the `def` line to the last line of the body). Read with ast, nothing is imported.

    python tools/long_functions.py [--max 80] [PATH ...]     (default: harness adapters reports)

Exit status 1 when any function outside the exempt folders (harness/perf/kernels/: fused
kernels read best in one piece) is over the limit."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = ("harness", "adapters", "reports")
EXEMPT = ("harness/perf/kernels/",)
MAX_LINES = 80


def function_lengths(path: Path):
    """(qualified name, first line, number of lines) of every function and method in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def walk(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.append((prefix + child.name, first, child.end_lineno - first + 1))
                walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, prefix + child.name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def long_functions(paths=DEFAULT_PATHS, limit: int = MAX_LINES, root: Path = ROOT):
    """[(relative path, qualified name, first line, lines)] over `limit`, exempt folders left out."""
    found = []
    for base in paths:
        for path in sorted((root / base).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if any(rel.startswith(e) for e in EXEMPT):
                continue
            found += [(rel, name, line, n) for name, line, n in function_lengths(path) if n > limit]
    return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    ap.add_argument("--max", type=int, default=MAX_LINES)
    args = ap.parse_args(argv)
    found = long_functions(args.paths, args.max)
    for rel, name, line, n in sorted(found, key=lambda f: -f[3]):
        print(f"{rel}:{line}: {name} ({n} lines)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
