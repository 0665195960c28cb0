"""The HTML report: self-contained, offline, escaped, and it renders for any run content."""

from __future__ import annotations

import re

import plotly.offline
import pytest

from harness.results.records import Record
from harness.reports.html import cell_summary, cell_table, pareto_front, write_report
from harness.results.run_dir import RunDir, load_records

EVIL = "<script>alert(1)</script>"
MODEL = "tiny-llama"
NOTE = "the only weights are a Q4_1 GGUF dequantized to float"


def _run_info(run_id: str = "r1") -> dict:
    return {
        "run_id": run_id,
        "suite": {"name": "smoke & <quick>"},
        "started_at": "2025-01-01T00:00:00+00:00",
        "provenance": {
            "harness_version": "0.1.0",
            "git_sha": "abc123",
            "python": "3.11",
            "platform": "linux",
            "device": "cpu",
            "cpu": "test cpu",
            "gpu": None,
            "versions": {"torch": "2.4.0", "plotly": "7"},
        },
        "models": {MODEL: {"note": NOTE}},
    }


def _cell(variant: str, backend: str, bits: float, ppl: float, quant_s: float | None = None, ref: bool = False) -> list[Record]:
    ident = dict(
        cell_id=f"{backend}-{variant}", suite="smoke", model=MODEL, backend=backend, variant=variant,
        device="cpu", is_reference=ref, run_id="r1",
    )
    recs = [
        Record(**ident, measurement="perplexity", metric="ppl", value=ppl, unit="", n=4096, uncertainty=0.05,
               uncertainty_kind="stderr", protocol="gptq", params={"dataset": "boolq-wiki"}),
        Record(**ident, measurement="footprint", metric="bits_per_weight", value=bits, unit="bits"),
        Record(**ident, measurement="footprint", metric="weight_bytes", value=bits / 8 * 1e8, unit="bytes"),
        Record(**ident, measurement="cell", metric="duration_s", value=12.5, unit="s"),
        Record(**ident, measurement="latency", metric="tokens_per_s", value=100.0 / bits, unit="tok/s"),
    ]
    if quant_s is not None:
        recs.append(Record(**ident, measurement="quantize", metric="seconds", value=quant_s, unit="s"))
    return recs


def _failed(variant: str = "int2", error: str = "worker died: signal SIGSEGV") -> list[Record]:
    return [
        Record(cell_id=f"rtn-{variant}", suite="smoke", model=MODEL, backend="rtn", variant=variant, device="cpu",
               run_id="r1", measurement="cell", metric="status", status="failed", error=error)
    ]


@pytest.fixture
def run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create(_run_info())
    rd.append(_cell("fp32", "torch", 32.0, 10.00, ref=True))
    rd.append(_cell("bf16", "torch", 16.0, 10.01))
    rd.append(_cell("int8", "rtn", 8.25, 10.05, quant_s=1.5))
    rd.append(_cell("int4", "rtn", 4.25, 11.20, quant_s=1.2))
    rd.append(_cell(EVIL, "rtn", 5.0, 12.0, quant_s=1.0))  # dominated by int4 and escaped everywhere
    rd.append(_failed())
    rd.append([Record(cell_id="ao-int4wo", suite="smoke", model=MODEL, backend="torchao", variant="int4wo-g64",
                      device="cpu", run_id="r1", measurement="cell", metric="duration_s", status="skipped",
                      error="unavailable: torchao int4_weight_only needs CUDA")])
    return rd


def _strip_bundle(page: str) -> str:
    return page.replace(plotly.offline.get_plotlyjs(), "")


def test_report_is_self_contained(run_dir):
    out = write_report(run_dir.path)
    assert out == run_dir.path / "report.html" and out.exists()
    page = out.read_text(encoding="utf-8")
    assert page.count(plotly.offline.get_plotlyjs()) == 1
    ours = _strip_bundle(page)  # the bundle itself mentions map-tile URLs it never fetches here
    assert not re.search(r"<script[^>]*\bsrc\s*=", ours, re.I)
    assert "cdn" not in ours.lower()
    assert "http://" not in ours and "https://" not in ours
    assert ours.count("Plotly.newPlot(") == 3  # ppl vs bits and vs MB; one model; + the frontier explorer (tok/s recorded)


def test_report_content(run_dir):
    page = _strip_bundle(write_report(run_dir.path).read_text(encoding="utf-8"))
    assert "qharness report — smoke &amp; &lt;quick&gt;" in page
    assert "r1" in page and "2025-01-01T00:00:00+00:00" in page and "abc123" in page
    assert NOTE in page
    for variant in ("fp32", "bf16", "int8", "int4"):
        assert variant in page
    assert "worker died: signal SIGSEGV" in page
    assert "Skipped cells" in page and "torchao int4_weight_only needs CUDA" in page and "1 skipped" in page
    assert "Perplexity (gptq protocol, 4096 tokens, boolq-wiki) vs bits per weight" in page
    assert "vs weight size" in page
    assert "latency/tokens_per_s (tok/s)" in page  # unknown metrics become generic columns
    assert "No successful cells" not in page


def test_report_escapes_record_text(run_dir):
    page = _strip_bundle(write_report(run_dir.path).read_text(encoding="utf-8"))
    assert EVIL not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text, in the table


def test_table_rows_and_ratio(run_dir):
    table = cell_table(load_records(run_dir.path))
    assert len(table.rows) == 7
    h = table.headers
    by_variant = {row[h.index("variant")][0]: row for row in table.rows}
    ratio_col = h.index("ppl ÷ reference ppl (plain ratio)")
    assert by_variant["int4"][ratio_col][0] == "1.1200"
    assert by_variant["fp32 (reference)"][ratio_col][0] == "1.0000"
    assert by_variant["int8"][h.index("quantize time (s)")][1] == "1.5"
    assert by_variant["int8"][h.index("cell duration (s)")][0] == "12.5"
    assert by_variant["int4"][h.index("weight MB")][0] == "53.12"
    assert by_variant["int2"][h.index("status")][0] == "failed"
    assert by_variant["int4wo-g64"][h.index("status")][0] == "skipped"
    assert by_variant["int4"][h.index("perplexity/ppl ± unc (n)")][0] == "11.2 ± 0.05 (n=4096)"


def test_pareto_front_excludes_dominated():
    pts = [(32, 10.0), (16, 10.01), (8, 10.05), (4, 11.2), (5, 12.0), (16, 10.5), (8, 10.05)]
    # (5, 12.0) is worse and bigger than (4, 11.2); (16, 10.5) loses to (16, 10.01); duplicates stay.
    assert pareto_front(pts) == [3, 2, 6, 1, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1, 1)]) == [0]
    # higher-is-better quality (accuracy): (2, 0.5) is beaten by (1, 0.6)
    assert pareto_front([(1, 0.6), (2, 0.5), (3, 0.9)], lower_is_better=False) == [0, 2]


def test_only_failed_cells(tmp_path):
    rd = RunDir(tmp_path / "failed")
    rd.create(_run_info())
    rd.append(_failed("int4", "CUDA error: <out of memory>"))
    rd.append(_failed("int8"))
    page = write_report(rd.path).read_text(encoding="utf-8")
    assert "No successful cells" in page
    assert "CUDA error: &lt;out of memory&gt;" in page
    assert "Plotly.newPlot" not in page
    assert cell_summary(load_records(rd.path))["status"].tolist() == ["failed", "failed"]


def test_empty_run(tmp_path):
    rd = RunDir(tmp_path / "empty")
    rd.create({"run_id": "r0", "suite": {"name": "empty"}, "started_at": "2025-01-01T00:00:00+00:00"})
    page = write_report(rd.path).read_text(encoding="utf-8")
    assert "No successful cells" in page and "no records at all" in page
    assert "qharness report — empty" in page
    assert "not finished" in page


def test_several_models_one_figure_each(tmp_path):
    rd = RunDir(tmp_path / "two")
    rd.create(_run_info())
    rd.append(_cell("fp32", "torch", 32.0, 10.0, ref=True))
    other = [r.model_copy(update={"model": "other-model", "cell_id": "o-" + r.cell_id}) for r in _cell("int4", "rtn", 4.25, 9.0)]
    rd.append(other)
    page = _strip_bundle(write_report(rd.path).read_text(encoding="utf-8"))
    assert page.count("Plotly.newPlot(") == 4
    assert "other-model: Perplexity" in page


def test_one_frontier_per_corpus_when_a_suite_measures_perplexity_twice(tmp_path):
    rd = RunDir(tmp_path / "two-corpora")
    rd.create(_run_info())
    for variant, backend, bits, ppl, ref in [("fp32", "torch", 32.0, 10.0, True), ("int4", "rtn", 4.25, 11.0, False)]:
        cell = _cell(variant, backend, bits, ppl, ref=ref)
        lambada = cell[0].model_copy(update={"value": ppl * 3, "params": {"dataset": "lambada"}})
        rd.append(cell + [lambada])
    page = _strip_bundle(write_report(rd.path).read_text(encoding="utf-8"))
    assert page.count("Plotly.newPlot(") == 5  # (boolq-wiki, lambada) x (bits, bytes) + the explorer
    assert page.count("gptq protocol, 4096 tokens, boolq-wiki)") == 2
    assert page.count("gptq protocol, 4096 tokens, lambada)") == 2
    assert "boolq-wiki / lambada" not in page  # never one plot of both
    assert "ppl [gptq, lambada] vs" in page and "ppl [gptq, boolq-wiki] vs" in page  # the explorer's choices
