"""Metrics declare what they mean where they are made (harness.metrics.meaning), and everything
that judges or draws them reads the declaration: compare, the gates, the default regression gate,
the cell table, the frontier explorer. A toy measurement (tests/plugins/toy_measurement.py, one
new file) shows up in all of them with no other file touched; an undeclared metric fails its cell."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli.main import app
from harness.metrics import MEASUREMENTS
from harness.metrics.meaning import KINDS, MEASURED_BY_EVERY_CELL, MetricSpec, lookup, spec_for
from harness.results.run_dir import RunDir, load_records

runner = CliRunner()

TOY_SUITE = """
name: toy
models: [tiny:llama]
device: cpu
timeout_s: 120
reference: fp:fp32
backends:
  - name: fp
    variants: [{{dtype: float32}}]
  - name: rtn
    variants: [{{bits: 8, sym: true}}, {{bits: 4, group_size: 32}}]
measurements:
  - name: toy_measurement:Toy
    undeclared: {undeclared}
"""


@pytest.mark.parametrize("name", MEASUREMENTS.names())
def test_every_measurement_declares_its_metrics(name):
    cls = MEASUREMENTS.get(name)
    assert cls.metrics, f"{name} declares no metrics"
    for spec in cls.metrics:
        assert isinstance(spec, MetricSpec) and spec.kind in KINDS and spec.direction in (-1, 0, 1)


def test_declarations_decide_not_names():
    assert spec_for("perplexity", "ppl").direction == -1 and spec_for("perplexity", "ppl").headline
    assert spec_for("perplexity", "nll").restates == "ppl"
    assert spec_for("divergence", "kld_p99").detail and spec_for("divergence", "kld_p99").kind == "diagnostic"
    assert spec_for("ceilings", "memory_bandwidth").direction == +1  # a name pattern once read "*memory*" as lower-is-better
    assert spec_for("tasks", "flip_rate@piqa").direction == -1
    assert spec_for("cell", "duration_s").kind == "bookkeeping"
    assert spec_for("nonexistent", "ppl") is None  # unknown: shown, never judged
    stamped = spec_for("nonexistent", "score", direction=1, kind="quality")  # a record's own stamp wins
    assert stamped.direction == 1 and stamped.kind == "quality"
    assert spec_for("perplexity", "ppl", direction=float("nan"), kind=float("nan")).direction == -1  # pandas NaN: unstamped
    assert lookup(MEASURED_BY_EVERY_CELL["footprint"], "bits_per_weight").exact


def _run(tmp_path, name: str, undeclared: bool = False, env: dict | None = None, monkeypatch=None):
    suite = tmp_path / f"{name}.yaml"
    suite.write_text(textwrap.dedent(TOY_SUITE.format(undeclared=str(undeclared).lower())))
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    res = runner.invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / name)])
    for k in env or {}:
        monkeypatch.delenv(k)
    return res


def test_a_new_measurement_appears_everywhere_from_its_declaration(tmp_path, harness_env, monkeypatch):
    # the one registry line (workers import it by the path the suite names; this process by the line)
    monkeypatch.setattr(MEASUREMENTS, "_entries", {**MEASUREMENTS._entries, "toy": "toy_measurement:Toy"})
    res = _run(tmp_path, "a")
    assert res.exit_code == 0, res.output
    records = [r for r in RunDir(tmp_path / "a").current_records() if r.measurement == "toy"]
    score = [r for r in records if r.metric == "toy_score"]
    assert len(score) == 3 and {(r.direction, r.kind) for r in score} == {(1, "quality")}  # stamped by the worker
    assert {(r.direction, r.kind) for r in records if r.metric == "wall_s"} == {(-1, "bookkeeping")}

    page = (tmp_path / "a" / "report.html").read_text()
    assert "Toy score" in page  # a frontier of its own: the declaration made it a headline
    from harness.reports.html import cell_table
    from harness.reports.section_frontier_explorer import _y_metrics

    df = load_records(tmp_path / "a")
    headers = cell_table(df).headers
    assert any("Toy score" in h or "toy_score" in h for h in headers), headers
    ok = df[(df["status"] == "ok") & df["value"].notna()]
    ok = ok.assign(instance=["|"] * len(ok))
    assert ("toy", "toy_score", None) in _y_metrics(ok)

    same = runner.invoke(app, ["check", str(tmp_path / "a"), "--baseline", str(tmp_path / "a"), "--junit", str(tmp_path / "a.xml")])
    assert same.exit_code == 0, same.output
    assert "default regression gate: toy/toy_score" in (tmp_path / "a.xml").read_text()

    worse = _run(tmp_path, "w", env={"QHARNESS_TOY_PENALTY": "0.2"}, monkeypatch=monkeypatch)
    assert worse.exit_code == 0, worse.output
    monkeypatch.setenv("COLUMNS", "300")  # the failure lines whole
    bad = runner.invoke(app, ["check", str(tmp_path / "w"), "--baseline", str(tmp_path / "a")])
    assert bad.exit_code == 1, bad.output
    assert "FAIL default regression gate: toy/toy_score" in bad.output and "worse than the baseline" in bad.output
    assert "toy_note" not in bad.output  # diagnostic: not gated


def test_an_undeclared_metric_fails_its_cell(tmp_path, harness_env, monkeypatch):
    res = _run(tmp_path, "u", undeclared=True)
    assert res.exit_code == 1
    assert "emitted metric 'mystery', which it does not declare" in res.output
    info = json.loads((tmp_path / "u" / "run.json").read_text())
    assert info["run_id"]


def test_explorer_reads_stamps_of_unknown_measurements():
    from harness.reports.section_frontier_explorer import _y_metrics

    rows = pd.DataFrame({"measurement": ["plugin"] * 2, "metric": ["score"] * 2, "cell_id": ["a", "b"],
                         "direction": [1, 1], "kind": ["quality", "quality"], "instance": ["|", "|"]})
    assert _y_metrics(rows) == [("plugin", "score", None)]
    assert _y_metrics(rows.assign(kind="speed")) == []
