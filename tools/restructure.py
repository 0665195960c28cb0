"""Issue #19's package re-layout as a re-runnable script: move harness/ modules into subpackages by
concern and tests/ into folders like the code (`git mv`), then rewrite every reference to a moved
module or test file across the repository. Idempotent: a second run finds nothing to move and
nothing to rewrite, so it can be applied again on a newer main.

    python tools/restructure.py [--dry-run]

What it rewrites, in .py .yaml .yml .toml .md .sh .cfg .txt .j2 files and .ci/ (benchmarks/results/
is left alone: recorded output of past runs):
- dotted names: `from harness.store import RunDir`, `import harness.data as data`, "harness.executor:X"
  registry strings, monkeypatch targets, `python -m harness.worker`, pyproject's entry points;
- `from harness import worker, hardware` (a moved module imported from its package);
- paths: `harness/store.py` -> `harness/results/run_dir.py`, `tests/test_runner.py` -> `tests/run/test_runner.py`;
- in a test file moved by this run: `Path(__file__).parent` / `.parents[N]` one level deeper.
Splitting a module (export sinks) and breaking cycles are hand edits committed after this."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# old module -> new module (dotted, under the `harness` namespace)
MODULE_MOVES = {
    # the command line
    "harness.cli": "harness.cli.main",
    "harness.cli_app": "harness.cli.base",
    "harness.cli_ci": "harness.cli.ci_commands",
    "harness.run_view": "harness.cli.run_view",
    # planning and running a suite
    "harness.suite": "harness.run.suite",
    "harness.planner": "harness.run.planner",
    "harness.runner": "harness.run.runner",
    "harness.executor": "harness.run.executor",
    "harness.ray_executor": "harness.run.ray_executor",
    "harness.worker": "harness.run.worker",
    "harness.placement": "harness.run.gpu_placement",
    # what a run leaves behind
    "harness.store": "harness.results.run_dir",
    "harness.records": "harness.results.records",
    "harness.provenance": "harness.results.provenance",
    "harness.export_sinks": "harness.results.export",  # split into its submodules by hand afterwards
    "harness.export": "harness.results.export.benchmark_json",
    # judging runs in CI
    "harness.compare": "harness.ci.compare",
    "harness.check": "harness.ci.check",
    "harness.gates": "harness.ci.gates",
    "harness.junit": "harness.ci.junit",
    "harness.pytest_plugin": "harness.ci.pytest_plugin",
    # models, their data and their artifacts
    "harness.models": "harness.models.zoo",
    "harness.encoders": "harness.models.encoders",
    "harness.vision": "harness.models.vision",
    "harness.artifacts": "harness.models.artifacts",
    "harness.data": "harness.models.corpora",
    # bytes of stored weights
    "harness.storage": "harness.weights.footprint",
    "harness.packing": "harness.weights.packing",
    # fused kernels
    "harness.perf.triton_decode": "harness.perf.kernels.triton_decode",
    "harness.perf.lean_decode": "harness.perf.kernels.lean_decode",
}

NEW_PACKAGES = {
    "harness.cli": "The `harness` command line: main.py (run, list, report, env; the entry point), ci_commands.py\n"
                   "(compare, check, export), base.py (the typer app, consoles, one-line errors), run_view.py (progress\n"
                   "and the end-of-run table). `python -m harness.cli` runs it (__main__.py).",
    "harness.run": "Planning and running a suite: suite.py (the YAML, validated), planner.py (cells), runner.py\n"
                   "(a run from plan to report), executor.py (a process per cell, warm workers), ray_executor.py,\n"
                   "worker.py (one cell in its own process), gpu_placement.py (which GPU a cell gets).",
    "harness.results": "What a run leaves behind: run_dir.py (the run directory: run.json, records.jsonl, cells/),\n"
                       "records.py (one metric value), provenance.py (versions, git sha, hardware), export/ (other tools'\n"
                       "formats).",
    "harness.ci": "Judging runs in CI: compare.py (deltas against a base run), gates.py and check.py (pass/fail\n"
                  "rules), junit.py (JUnit XML), pytest_plugin.py (gates as pytest tests).",
    "harness.models": "Models and what they read: zoo.py (loading LLMs: built-in, tiny, local, hub), encoders.py\n"
                      "(sentence encoders), vision.py (the vision model kind), corpora.py (corpora and token windows),\n"
                      "artifacts.py (the quantized-model cache).",
    "harness.weights": "Bytes of stored weights: footprint.py (what a quantized model stores), packing.py (bit packing).",
    "harness.perf.kernels": "Fused decode kernels: lean_decode.py (the graph-decode floor reference), triton_decode.py\n"
                            "(Triton kernels for one decode step).",
}

MAIN_MODULES = {"harness.cli": "from harness.cli.main import main\n\nif __name__ == \"__main__\":\n    main()\n"}

# tests/<file> -> tests/<folder>/<file>; conftest.py, isolation.py, plugins/, data/ and the
# whole-package tests (import graph, test isolation) stay at tests/
TEST_GROUPS = {
    "adapters": ["test_adapters_reference.py", "test_backend_llamacpp.py", "test_backend_modelopt.py",
                 "test_backends_bnb_quanto_hqq.py", "test_backends_calibrated.py", "test_backends_torch.py",
                 "test_levers.py", "test_pt2e_llm.py"],
    "metrics": ["test_drift_outliers.py", "test_meaning.py", "test_metrics.py", "test_paired.py", "test_protocols.py",
                "test_protocols_reference.py", "test_scoring.py", "test_tasks.py"],
    "models": ["test_data.py", "test_embedded.py", "test_encoders.py", "test_model_cache.py", "test_vision.py"],
    "perf": ["test_lean_decode.py", "test_perf.py", "test_triton_decode.py"],
    "gpu": ["test_gpu_decode.py"],
    "reports": ["test_frontier_explorer.py", "test_report.py", "test_report_browser.py", "test_report_verdict.py"],
    "results": ["test_export_sinks.py", "test_provenance_sha.py"],
    "run": ["test_loud_failures.py", "test_ray_executor.py", "test_runner.py", "test_suites.py"],
    "ci": ["test_compare_gate.py"],
    "cli": ["test_cli_errors.py", "test_run_view.py"],
}

TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".sh", ".cfg", ".txt", ".j2"}
SKIP_PREFIXES = ("benchmarks/results/", "tools/restructure.py")
EXTRA_FILES = (".ci/run", ".ci/freeze-constraints")


def module_path(dotted: str, package: bool = False) -> Path:
    parts = dotted.split(".")[1:]
    return Path("harness", *parts, "__init__.py") if package else Path("harness", *parts[:-1], parts[-1] + ".py")


def new_file(new: str) -> Path:
    """Where a moved module's file goes: a package's __init__.py when other moves land inside it."""
    inside = any(other.startswith(new + ".") for other in MODULE_MOVES.values())
    return module_path(new, package=inside)


def git(*args: str, dry: bool = False) -> None:
    print("git " + " ".join(args))
    if not dry:
        subprocess.run(["git", *args], cwd=ROOT, check=True)


# -- moves -------------------------------------------------------------------------------------------------

def move_files(dry: bool) -> set[Path]:
    moved_tests: set[Path] = set()
    for old, new in MODULE_MOVES.items():
        src, dst = ROOT / module_path(old), ROOT / new_file(new)
        if src.is_file() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)), dry=dry)
    for pkg, doc in NEW_PACKAGES.items():
        init = ROOT / module_path(pkg, package=True)
        if not init.exists() and not dry:
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(f'"""{doc}"""\n')
            git("add", str(init.relative_to(ROOT)))
        if pkg in MAIN_MODULES and not (main := init.parent / "__main__.py").exists() and not dry:
            main.write_text(MAIN_MODULES[pkg])
            git("add", str(main.relative_to(ROOT)))
    for folder, files in TEST_GROUPS.items():
        for name in files:
            src, dst = ROOT / "tests" / name, ROOT / "tests" / folder / name
            if src.is_file() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                git("mv", str(src.relative_to(ROOT)), str(dst.relative_to(ROOT)), dry=dry)
                moved_tests.add(dst)
    return moved_tests


# -- rewrites ----------------------------------------------------------------------------------------------

def _children(new: str) -> set[str]:
    """Names directly under `new` once moved, for modules that become a package of the same name
    (harness.models -> harness.models.zoo): `harness.models.zoo` must not be rewritten again."""
    return {m[len(new) + 1:].split(".")[0] for m in (*MODULE_MOVES.values(), *NEW_PACKAGES) if m.startswith(new + ".")}


OLD_TAILS = sorted((old.split(".", 1)[1] for old in MODULE_MOVES), key=len, reverse=True)
DOTTED = re.compile(r"(?<![\w.])harness\.(" + "|".join(re.escape(t) for t in OLD_TAILS) + r")(?![\w])")
PATHS = re.compile(r"(?<![\w.-])harness/(" + "|".join(re.escape(t.replace(".", "/")) for t in OLD_TAILS) + r")\.py\b")
FROM_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from (?P<pkg>harness(?:\.[a-z_]+)*) import (?P<names>[^()\n#]+?)(?P<comment>[ \t]*#.*)?$",
                         re.M)
ALL_TESTS = {name: folder for folder, files in TEST_GROUPS.items() for name in files}
TEST_PATHS = re.compile(r"(?<![\w.-])tests/(" + "|".join(re.escape(n[:-3]) for n in ALL_TESTS) + r")\.py\b")


def _already_moved() -> set[str]:
    """Modules whose name is now their new package's (harness.models -> harness.models.zoo) and that
    are already moved: a bare `harness.models` then names the package and is left alone."""
    return {old for old, new in MODULE_MOVES.items()
            if new.startswith(old + ".") and not (ROOT / module_path(old)).exists() and (ROOT / new_file(new)).exists()}


SAME_NAME_DONE: set[str] = set()


def _dotted(m: re.Match) -> str:
    tail = m.group(1)
    old = "harness." + tail
    new = MODULE_MOVES[old]
    rest = m.string[m.end():]
    if new.startswith(old + "."):  # the old module's name is now its package's
        if old in SAME_NAME_DONE:
            return m.group(0)
        nxt = re.match(r"(?:\.| import )(\w+)", rest)  # harness.models.zoo, from harness.models import zoo
        if nxt and nxt.group(1) in _children(old):
            return m.group(0)
        before = m.string[max(0, m.start() - 8):m.start()]
        if MAIN_MODULES.get(old) and re.search(r"-m[\"']?,? [\"']?$", before):
            return m.group(0)  # `python -m harness.cli` runs the package's __main__.py
    return new


def _path(m: re.Match) -> str:
    return new_file(MODULE_MOVES["harness." + m.group(1).replace("/", ".")]).as_posix()


def _from_import(m: re.Match) -> str:
    pkg, indent, comment = m.group("pkg"), m.group("indent"), m.group("comment") or ""
    kept, lines = [], []
    for item in (s.strip() for s in m.group("names").split(",")):
        name, _, alias = (p.strip() for p in item.partition(" as "))
        new = MODULE_MOVES.get(f"{pkg}.{name}")
        if not new:
            kept.append(item)
            continue
        newpkg, _, newname = new.rpartition(".")
        local = alias or name
        lines.append(f"from {newpkg} import {newname}" + (f" as {local}" if local != newname else ""))
    if not lines:
        return m.group(0)
    if kept:
        lines.insert(0, f"from {pkg} import {', '.join(kept)}")
    return "\n".join(indent + line + (comment if i == 0 else "") for i, line in enumerate(lines))


def deeper(text: str) -> str:
    """A test file moved one folder down: its paths relative to its own location go one level up."""
    text = re.sub(r"(Path\(__file__\)(?:\.resolve\(\))?)\.parents\[(\d)\]", lambda m: f"{m.group(1)}.parents[{int(m.group(2)) + 1}]",
                  text)
    return re.sub(r"(Path\(__file__\)(?:\.resolve\(\))?)\.parent\b(?!s)", r"\1.parents[1]", text)


def rewrite(text: str) -> str:
    text = FROM_IMPORT.sub(_from_import, text)
    text = DOTTED.sub(_dotted, text)
    text = PATHS.sub(_path, text)
    return TEST_PATHS.sub(lambda m: f"tests/{ALL_TESTS[m.group(1) + '.py']}/{m.group(1)}.py", text)


def ensure_packages(text: str) -> str:
    """pyproject.toml: every package of the harness namespace in [tool.setuptools] packages."""
    m = re.search(r"(\npackages = \[\n)(.*?)(\n\])", text, re.S)
    if not m:
        return text
    listed = re.findall(r'"([^"]+)"', m.group(2))
    packages = [*NEW_PACKAGES, *(new for new in MODULE_MOVES.values() if new_file(new).name == "__init__.py")]
    missing = [p for p in sorted(packages) if p not in listed]
    if not missing:
        return text
    body = m.group(2) + "".join(f'\n    "{p}",' for p in missing)  # sorted: a package before its subpackages
    return text[:m.start(2)] + body + text[m.end(2):]


def text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    out = []
    for rel in listed:
        path = ROOT / rel
        if rel.startswith(SKIP_PREFIXES) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or rel in EXTRA_FILES:
            out.append(path)
    return out


def rewrite_files(moved_tests: set[Path], dry: bool) -> list[Path]:
    changed = []
    for path in text_files():
        text = path.read_text(encoding="utf-8")
        new = rewrite(text)
        if path in moved_tests:
            new = deeper(new)
        if path.name == "pyproject.toml" and path.parent == ROOT:
            new = ensure_packages(new)
        if new != text:
            changed.append(path)
            if not dry:
                path.write_text(new, encoding="utf-8")
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the moves and the files that would change")
    args = ap.parse_args(argv)
    SAME_NAME_DONE.update(_already_moved())  # before this run's moves
    moved = move_files(args.dry_run)
    for path in rewrite_files(moved, args.dry_run):
        print("rewrote " + path.relative_to(ROOT).as_posix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
