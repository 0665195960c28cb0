"""The report's answer-first verdict, labelled figures with log axes and one look per cell, and the
static figure copies: on a hand-made run where the right answer is known."""

from __future__ import annotations

import pytest

from harness.results.records import Record
from harness.reports.common import axis_type, cell_looks
from harness.reports.html import X_AXES, frontier_figures, quality_spec, write_report
from harness.reports.section_verdict import Score, significantly_better, verdicts
from harness.results.run_dir import RunDir, load_records

MODEL = "tiny-llama"


def _cell(backend: str, variant: str, bits: float, kld: float, kld_se: float, ppl: float,
          decode: float | None = None, ref: bool = False) -> list[Record]:
    ident = dict(cell_id=f"{backend}-{variant}", suite="llm-int4", model=MODEL, backend=backend, variant=variant,
                 device="cpu", is_reference=ref, run_id="r1", hardware_profile="cpu-2core")
    recs = [
        Record(**ident, measurement="footprint", metric="bits_per_weight", value=bits, unit="bits", direction=-1, kind="size"),
        Record(**ident, measurement="footprint", metric="weight_bytes", value=bits / 8 * 1.35e8, unit="bytes", direction=-1, kind="size"),
        # perplexity's stderr is large against its spread: kld_mean must be chosen as the more sensitive
        Record(**ident, measurement="perplexity", metric="ppl", value=ppl, n=4096, uncertainty=2.0, protocol="gptq",
               params={"dataset": "boolq-wiki"}, direction=-1, kind="quality"),
    ]
    if not ref:
        recs.append(Record(**ident, measurement="divergence", metric="kld_mean", value=kld, n=4096, uncertainty=kld_se,
                           params={"corpus": "boolq-wiki"}, direction=-1, kind="quality"))
    if decode is not None:
        recs.append(Record(**ident, measurement="speed", metric="decode_tokens_s", value=decode, unit="tokens/s", n=5,
                           uncertainty=1.0, direction=+1, kind="speed"))
    return recs


@pytest.fixture
def run(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.create({"run_id": "r1", "suite": {"name": "llm-int4"}, "started_at": "2026-12-02T00:00:00+00:00",
               "provenance": {"git_sha": "abc"}, "models": {}})
    rd.append(_cell("torch", "bf16", 16.0, 0.0, 0.0, 26.0, decode=40.0, ref=True))
    rd.append(_cell("rtn", "int3-g128", 3.25, 0.50, 0.010, 71.0, decode=60.0))
    rd.append(_cell("bnb", "nf4", 4.13, 0.15, 0.005, 30.0, decode=20.0))
    rd.append(_cell("rtn", "int4-g128", 4.25, 0.100, 0.005, 28.0, decode=55.0))
    rd.append(_cell("gguf", "Q4_K_M", 4.5, 0.095, 0.005, 28.0, decode=80.0))  # best <= 4.5, within noise of int4
    rd.append(_cell("rtn", "int8", 8.25, 0.002, 0.0005, 26.1, decode=45.0))
    return rd


def test_verdict_picks_the_right_cells(run):
    (v,) = verdicts(load_records(run.path))
    assert (v.model, v.profile) == (MODEL, "cpu-2core")
    assert v.choice.name == "divergence/kld_mean"  # spans far more standard errors than ppl
    budgets = {b: (best.label, [t.label for t in ties], pool) for b, best, ties, pool in v.budgets}
    assert budgets == {
        3.5: ("rtn:int3-g128", [], 1),
        4.5: ("gguf:Q4_K_M", ["rtn:int4-g128"], 4),  # 0.095 vs 0.100 +- 0.005 each: z = 0.71, a tie
        8.5: ("rtn:int8", [], 5),
    }
    assert [s.label for s in v.pareto] == ["rtn:int3-g128", "bnb:nf4", "rtn:int4-g128", "gguf:Q4_K_M", "rtn:int8"]
    assert v.speed_metric == "decode_tokens_s"
    # fastest first: gguf is both fastest and better than every slower 4-bit; int3 and nf4 are dominated
    assert [s.label for s in v.speed_pareto] == ["gguf:Q4_K_M", "rtn:int8"]
    assert v.reference is None and v.reference_label == "torch:bf16"  # KLD is measured against it, not on it


def test_significance_is_two_sided_z_on_recorded_uncertainties(run):
    choice = verdicts(load_records(run.path))[0].choice
    a = Score("a", "a", 4.0, 0.100, 0.005, 100)
    assert significantly_better(a, Score("b", "b", 4.0, 0.120, 0.005, 100), choice)  # z = 2.83
    assert not significantly_better(a, Score("c", "c", 4.0, 0.110, 0.005, 100), choice)  # z = 1.41
    assert not significantly_better(Score("c", "c", 4.0, 0.120, 0.005, 100), a, choice)  # wrong direction
    assert significantly_better(Score("x", "x", 4, 1.0, None, None), Score("y", "y", 4, 2.0, None, None), choice)


def test_report_opens_with_the_answer(run):
    page = write_report(run.path).read_text(encoding="utf-8")
    answer = page.index("The answer")
    assert answer < page.index("Quality vs compression")
    assert "ranked by divergence/kld_mean" in page and "measured against the reference torch:bf16" in page
    assert "Pareto cells, bits per weight vs kld_mean: rtn:int3-g128 (3.25 bits" in page
    assert "Pareto cells, decode_tokens_s vs kld_mean: gguf:Q4_K_M (80 tokens/s" in page


def test_figures_label_every_point_with_one_look_per_cell_and_log_axes(run):
    df = load_records(run.path)
    looks = cell_looks(df)
    assert looks["rtn-int4-g128"].color == looks["rtn-int8"].color != looks["gguf-Q4_K_M"].color
    assert len({looks[c].symbol for c in ("rtn-int3-g128", "rtn-int4-g128", "rtn-int8")}) == 3
    figs = frontier_figures(df)
    titles = [f.layout.title.text for f in figs]
    assert any("vs decode speed" in t for t in titles)  # the quality-vs-speed frontier
    ppl_vs_bits = next(f for f in figs if f.layout.title.text.startswith("Perplexity") and "bits per weight" in f.layout.title.text)
    points = [t for t in ppl_vs_bits.data if t.mode == "markers+text"]
    assert sorted(t.text[0] for t in points) == sorted(["bf16", "int3-g128", "nf4", "int4-g128", "Q4_K_M", "int8"])
    by_name = {t.name: t for t in points}
    assert by_name["rtn:int4-g128"].marker.color == looks["rtn-int4-g128"].color
    assert by_name["reference: torch:bf16"].marker.symbol == "star"
    assert ppl_vs_bits.layout.yaxis.type == "log"  # 26 .. 71: 2.7x
    assert ppl_vs_bits.layout.xaxis.type == "log"  # 3.25 .. 16 bits
    # every figure draws a cell in the same colour
    for fig in figs:
        for t in fig.data:
            if t.name == "rtn:int4-g128":
                assert t.marker.color == looks["rtn-int4-g128"].color


def test_axis_type():
    assert axis_type([26, 38]) == "linear"
    assert axis_type([26, 71, 100]) == "log"
    assert axis_type([0.0, 1.0, 50.0]) == "linear"  # a zero would vanish on a log axis
    assert axis_type([5.0]) == "linear"


def test_speed_axis_prefers_higher():
    speed = next(x for x in X_AXES if x.metric == "decode_tokens_s")
    assert not speed.lower_is_better
    assert quality_spec("divergence", "kld_mean", -1, "quality").lower_is_better


def test_static_figures_or_the_reason(run):
    from harness.reports.static_figures import find_browser

    page = write_report(run.path, static=("svg",)).read_text(encoding="utf-8")
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert "static figures not written: kaleido is not installed" in page
        return
    if find_browser() is None:
        assert "needs Chrome or Chromium" in page
        return
    svgs = sorted((run.path / "figures").glob("*.svg"))
    assert svgs and "static copies of the" in page, page[page.find("static"):][:300]
    assert svgs[0].read_text(encoding="utf-8").lstrip().startswith("<svg")


def test_bad_static_format_is_one_line(run):
    from typer.testing import CliRunner

    from harness.cli.main import app

    res = CliRunner().invoke(app, ["report", str(run.path), "--static", "gif"])
    assert res.exit_code == 2 and "unknown static figure format 'gif'" in res.output
    assert "Traceback" not in res.output
