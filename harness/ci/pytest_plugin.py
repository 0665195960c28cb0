"""pytest plugin: a run's gates as test items, so CI reports them like any other test.

    pytest --qharness-run runs/llm-int4-...      [--qharness-baseline RUN] [--qharness-only]
    pytest --qharness-suite llm-smoke [--qharness-out DIR]          (runs the suite first)

One item per gate x cell (pass, fail with the gate's message, skip when there is nothing to
judge) and one per failed cell, judged by harness.ci.check (noise-aware, --qharness-z). Loaded through
the `pytest11` entry point or `-p harness.ci.pytest_plugin`; without a --qharness-* option it only adds
its options: nothing is imported, nothing collected, so other test sessions do not pay for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import HarnessError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qharness", "qharness gates as test items")
    group.addoption("--qharness-run", metavar="RUN_DIR", help="judge this run's suite gates as test items")
    group.addoption("--qharness-suite", metavar="SUITE", help="run this suite (name or YAML) first, then judge it")
    group.addoption("--qharness-out", metavar="DIR", help="run directory for --qharness-suite (default: a temp dir)")
    group.addoption("--qharness-baseline", metavar="RUN_DIR", help="baseline run for *_baseline_ratio gates")
    group.addoption("--qharness-gates", metavar="FILE", help="gates YAML instead of the run's suite gates")
    group.addoption("--qharness-z", type=float, default=2.0, help="standard errors a miss must exceed (default 2)")
    group.addoption("--qharness-only", action="store_true", help="deselect every other test item")


def _wanted(config: pytest.Config) -> bool:
    return bool(config.getoption("qharness_run") or config.getoption("qharness_suite"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qharness: a qharness gate verdict (from --qharness-run / --qharness-suite)")


class GateItem(pytest.Item):
    def __init__(self, *, result, **kwargs):
        super().__init__(**kwargs)
        self.result = result
        self.add_marker("qharness")

    def runtest(self) -> None:
        r = self.result
        if not r.passed:
            raise GateViolation(f"{r.gate} [{r.cell}]: {r.detail}")
        if r.skipped:
            pytest.skip(r.detail)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GateViolation):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"qharness gate: {self.name}"


class GateViolation(Exception):
    """A gate missed its bound beyond noise."""


class RunGates(pytest.Collector):
    def __init__(self, *, run_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = run_dir

    def collect(self):
        # lazy: `import harness.ci.pytest_plugin` stays free of numpy, pydantic, yaml
        from harness.ci.check import check_run

        opt = self.config.getoption
        try:
            res = check_run(self.run_dir, opt("qharness_baseline"), z=opt("qharness_z"), gates_file=opt("qharness_gates"))
        except HarnessError as exc:
            raise pytest.UsageError(f"qharness: {exc}") from None
        seen: dict[str, int] = {}
        for r in res.results:
            name = f"{r.gate} [{r.cell}]"
            seen[name] = seen.get(name, 0) + 1
            yield GateItem.from_parent(self, name=name if seen[name] == 1 else f"{name} #{seen[name]}", result=r)


def _run_dir(config: pytest.Config) -> Path:
    run = config.getoption("qharness_run")
    if run:
        return Path(run)
    # lazy: `import harness.ci.pytest_plugin` stays free of pydantic, yaml
    from harness.run.runner import run_suite
    from harness.run.suite import load_suite

    out = config.getoption("qharness_out")
    out = Path(out) if out else Path(config._tmp_path_factory.mktemp("qharness-run")) / "run"  # noqa: SLF001
    try:
        result = run_suite(load_suite(config.getoption("qharness_suite")), out=out)
    except HarnessError as exc:
        raise pytest.UsageError(f"qharness: {exc}") from None
    return result.run_dir.path


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    if not _wanted(config):
        return
    run_dir = _run_dir_cached(config)
    collector = RunGates.from_parent(session, name=f"qharness:{run_dir}", run_dir=run_dir)
    gate_items = list(collector.collect())
    if config.getoption("qharness_only"):
        if items:
            config.hook.pytest_deselected(items=list(items))
        items[:] = gate_items
    else:
        items.extend(gate_items)


def _run_dir_cached(config: pytest.Config) -> Path:
    if not hasattr(config, "_qharness_run_dir"):
        config._qharness_run_dir = _run_dir(config)  # noqa: SLF001
    return config._qharness_run_dir  # noqa: SLF001
