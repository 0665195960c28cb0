"""The CLI's end-of-run summary table: its metric columns follow what the run measured."""

from __future__ import annotations

from rich.console import Console

from harness.results.records import Record
from harness.cli.run_view import summary_table
from harness.results.run_dir import RunDir


def _cell(cell_id: str, metrics: dict[str, tuple[float, float | None]], status: str = "ok") -> list[Record]:
    ident = dict(cell_id=cell_id, suite="s", model="m", backend="b", variant=cell_id, device="cpu",
                 is_reference=False, run_id="r1")
    recs = [Record(**ident, measurement="x", metric=k, value=v, uncertainty=u) for k, (v, u) in metrics.items()]
    return recs + [Record(**ident, measurement="cell", metric="status", status=status)]


def _render(tmp_path, *cells) -> str:
    rd = RunDir(tmp_path / "run")
    rd.create({"run_id": "r1", "suite": {"name": "s"}, "started_at": "2026-12-02T00:00:00+00:00", "models": {}})
    for cell in cells:
        rd.append(cell)
    console = Console(width=200, record=True)
    console.print(summary_table(rd, terminal=False))
    return console.export_text()


def test_a_language_model_run_shows_perplexity_and_no_accuracy(tmp_path):
    text = _render(tmp_path, _cell("int4", {"bits_per_weight": (4.3, None), "weight_bytes": (1e8, None), "ppl": (22.5, 0.8)}))
    assert "ppl" in text and "22.5±0.8" in text and "100.0" in text
    assert "acc %" not in text


def test_a_vision_run_shows_accuracy_and_no_perplexity(tmp_path):
    text = _render(tmp_path, _cell("int8", {"bits_per_weight": (8.2, None), "accuracy": (0.98531, 0.0063)}),
                   _cell("qat", {"accuracy": (0.98164, 0.007)}))
    assert "acc %" in text and "98.53±0.63" in text and "98.16±0.7" in text
    assert "ppl" not in text
