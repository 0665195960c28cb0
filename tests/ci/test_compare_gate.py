"""harness compare / check / export-benchmark and the pytest plugin, on synthetic run directories
(seconds) plus one pair of real tiny:llama runs (a worse variant swapped in must fail the gate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli.main import app
from harness.ci.compare import compare_runs, markdown, resolve_base
from harness.errors import HarnessError
from harness.ci.gates import GateSpec, evaluate
from harness.results.records import Record
from harness.results.run_dir import RunDir

runner = CliRunner()
XSD = Path(__file__).parents[1] / "data" / "junit.xsd"
MODEL = "tiny"
CORPUS, SEQ = "boolq-wiki", 64


def _ident(cell: str, backend: str, variant: str, ref: bool = False, run_id: str = "r") -> dict:
    return dict(cell_id=cell, suite="s", model=MODEL, backend=backend, variant=variant, device="cpu",
                hardware_profile="generic-x86-cpu", is_reference=ref, run_id=run_id)


def make_run(path: Path, nll: dict[str, np.ndarray], tok_s: dict[str, tuple[float, float, list]] | None = None,
             gates: list[dict] | None = None, sha: str = "abc", finished: str = "2026-01-01T00:00:00",
             tokens_sha1: str = "t1", failed: tuple[str, ...] = ()) -> RunDir:
    """A run dir with a reference cell 'ref' and others: ppl + paired ppl_ratio from the given
    per-token NLLs (saved as artifacts like the perplexity measurement does), optional decode tok/s."""
    rd = RunDir(path)
    rd.create({"run_id": path.name, "suite": {"name": "s", "gates": gates or []}, "hardware_profile": "generic-x86-cpu",
               "provenance": {"git_sha": sha, "python": "3.11", "platform": "Linux-6", "cpu": "test cpu", "hostname": "h"},
               "started_at": finished, "finished_at": finished})
    for cell, values in nll.items():
        ident = _ident(cell, "fp" if cell == "ref" else "rtn", "fp32" if cell == "ref" else cell, cell == "ref", path.name)
        d = rd.cell_dir(cell)
        np.save(d / f"nll-{CORPUS}-{SEQ}.npy", values)
        (d / f"nll-{CORPUS}-{SEQ}.json").write_text(json.dumps({"tokens_sha1": tokens_sha1, "n": values.size}))
        params = {"corpus": CORPUS, "seq_len": SEQ, "tokens_sha1": tokens_sha1}
        se = values.std(ddof=1) / np.sqrt(values.size)
        recs = [Record(**ident, measurement="perplexity", metric="ppl", value=float(np.exp(values.mean())), unit="ppl",
                       n=values.size, uncertainty=float(np.exp(values.mean()) * se), protocol="gptq", params=params),
                Record(**ident, measurement="footprint", metric="bits_per_weight", value=32.0 if cell == "ref" else 4.25, unit="bits")]
        if cell != "ref":
            diff = values - nll["ref"]
            ratio = float(np.exp(diff.mean()))
            recs.append(Record(**ident, measurement="perplexity", metric="ppl_ratio", value=ratio, unit="x", n=diff.size,
                               uncertainty=ratio * float(diff.std(ddof=1) / np.sqrt(diff.size)), protocol="gptq",
                               params={**params, "reference_cell": "ref"}))
        if tok_s and cell in tok_s:
            v, unc, samples = tok_s[cell]
            recs.append(Record(**ident, measurement="decode", metric="tokens_per_s", value=v, unit="tok/s", n=len(samples),
                               uncertainty=unc, protocol="decode", params={"samples_s": samples, "new_tokens": 32},
                               direction=1, kind="speed"))  # a plugin's measurement: its records carry their meaning
        status = "failed" if cell in failed else "ok"
        recs.append(Record(**ident, measurement="cell", metric="status", status=status,
                           error="worker died: signal SIGSEGV" if status == "failed" else None))
        rd.append(recs)
    return rd


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    ref = rng.gamma(2.0, 1.5, size=4000)  # per-token NLLs: hard and easy tokens, like text
    return ref, ref + rng.normal(0.02, 0.05, size=ref.size)


def test_same_run_twice_is_quiet(tmp_path, tokens):
    ref, q = tokens
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q})
    b = make_run(tmp_path / "b", {"ref": ref, "int4": q})
    cmp = compare_runs(a, b)
    assert not cmp.regressions and not cmp.improvements
    assert {d.verdict for d in cmp.deltas} == {"same"}
    assert "0 regression(s), 0 improvement(s)" in markdown(cmp)


def test_paired_ppl_change_is_flagged_where_unpaired_errors_would_hide_it(tmp_path, tokens):
    ref, q = tokens
    worse = q + 0.01  # +1% perplexity: far inside each run's own error bar, clear on the same tokens
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q})
    b = make_run(tmp_path / "b", {"ref": ref, "int4": worse})
    cmp = compare_runs(a, b)
    ppl = next(d for d in cmp.deltas if d.cell == "rtn:int4" and d.metric == "ppl")
    assert ppl.paired and ppl.verdict == "regression" and ppl.z > 10
    assert abs(ppl.delta) < ppl.base_sigma  # unpaired, this would be noise
    ratio = next(d for d in cmp.deltas if d.cell == "rtn:int4" and d.metric == "ppl_ratio")
    assert ratio.paired and ratio.verdict == "regression"
    assert next(d for d in cmp.deltas if d.cell == "fp:fp32" and d.metric == "ppl").verdict == "same"
    md = markdown(cmp)
    assert "| regression | tiny | `rtn:int4` | perplexity/ppl |" in md and "paired" in md

    other_tokens = make_run(tmp_path / "c", {"ref": ref, "int4": worse}, tokens_sha1="t2")
    unpaired = next(d for d in compare_runs(a, other_tokens).deltas if d.cell == "rtn:int4" and d.metric == "ppl")
    assert not unpaired.paired and unpaired.verdict == "noise"


def test_noise_is_not_a_regression_but_a_slowdown_is(tmp_path, tokens):
    ref, q = tokens
    base = {"int4": (100.0, 1.0, [0.01] * 5)}
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q}, base)
    noisy = make_run(tmp_path / "b", {"ref": ref, "int4": q}, {"int4": (98.5, 1.0, [0.0102] * 5)})
    slow = make_run(tmp_path / "c", {"ref": ref, "int4": q}, {"int4": (80.0, 1.0, [0.0125] * 5)})
    pick = lambda cmp: next(d for d in cmp.deltas if d.metric == "tokens_per_s")  # noqa: E731
    assert pick(compare_runs(a, noisy)).verdict == "noise"
    assert pick(compare_runs(a, slow)).verdict == "regression"

    gate = [GateSpec(metric="tokens_per_s", min_baseline_ratio=0.99)]
    within = evaluate(gate, noisy.current_records(), a.current_records(), z=2.0)
    assert [g.passed for g in within] == [True] and "within noise" in within[0].detail
    assert [g.passed for g in evaluate(gate, noisy.current_records(), a.current_records(), z=0.0)] == [False]
    beyond = evaluate(gate, slow.current_records(), a.current_records(), z=2.0)
    assert not beyond[0].passed and "baseline ratio 0.8 < 0.99 (by -0.19)" in beyond[0].detail
    no_base = evaluate(gate, slow.current_records(), None)
    assert no_base[0].passed and no_base[0].skipped


def test_check_cli_exit_codes_messages_and_junit(tmp_path, tokens):
    xmlschema = pytest.importorskip("xmlschema")
    ref, q = tokens
    gates = [{"metric": "ppl_ratio", "max": 1.05}, {"metric": "tokens_per_s", "min_baseline_ratio": 0.95}]
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q}, {"int4": (100.0, 1.0, [0.01] * 5)}, gates=gates)
    b = make_run(tmp_path / "b", {"ref": ref, "int4": q}, {"int4": (100.0, 1.0, [0.01] * 5)}, gates=gates)
    bad = make_run(tmp_path / "bad", {"ref": ref, "int4": q + 0.2, "int2": q + 1.0},
                   {"int4": (70.0, 1.0, [0.014] * 5)}, gates=gates, failed=("int2",))
    ok = runner.invoke(app, ["check", str(b.path), "--baseline", str(a.path), "--junit", str(tmp_path / "ok.xml")])
    assert ok.exit_code == 0, ok.output
    assert "all 2 gate check(s) passed" in ok.output
    res = runner.invoke(app, ["check", str(bad.path), "--baseline", str(a.path), "--junit", str(tmp_path / "bad.xml")])
    assert res.exit_code == 1, res.output
    assert "FAIL ppl_ratio <= 1.05 on * [tiny rtn:int4]" in res.output and "(by +0.1" in res.output
    assert "baseline ratio 0.7 < 0.95 (by -0.25)" in res.output
    assert "cell failed: worker died: signal SIGSEGV" in res.output
    schema = xmlschema.XMLSchema(XSD)
    for name in ("ok.xml", "bad.xml"):
        schema.validate(tmp_path / name)
    xml = (tmp_path / "bad.xml").read_text()
    assert 'failures="3"' in xml and "GateViolation" in xml
    nogates = make_run(tmp_path / "n", {"ref": ref, "int4": q})
    res = runner.invoke(app, ["check", str(nogates.path)])
    assert res.exit_code == 2 and "declares no `gates:`" in res.output


def test_compare_cli_html_markdown_and_base_by_git_ref(tmp_path, tokens):
    ref, q = tokens
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()  # noqa: E731
    git("init", "-q", "-b", "main")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    sha = git("rev-parse", "HEAD")
    runs = tmp_path / "runs"
    make_run(runs / "old", {"ref": ref, "int4": q + 0.5}, sha=sha, finished="2026-01-01T00:00:00")
    make_run(runs / "new", {"ref": ref, "int4": q}, sha=sha, finished="2026-01-02T00:00:00")
    make_run(runs / "dirty", {"ref": ref, "int4": q}, sha=sha + "-dirty", finished="2026-01-03T00:00:00")
    cand = make_run(tmp_path / "cand", {"ref": ref, "int4": q + 0.01}, sha="feature")
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert resolve_base(runs, "main", cand.path).path.name == "new"
        res = runner.invoke(app, ["compare", str(cand.path), "--runs-root", str(runs), "--base-ref", "main",
                                  "--html", str(tmp_path / "c.html"), "--markdown", str(tmp_path / "c.md"),
                                  "--fail-on-regression"])
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "y")
        with pytest.raises(HarnessError, match="no finished run of suite 's' on hardware profile 'generic-x86-cpu' at HEAD"):
            resolve_base(runs, "HEAD", cand.path)
        with pytest.raises(HarnessError, match="git cannot resolve 'no-such-ref'"):
            resolve_base(runs, "no-such-ref", cand.path)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 1, res.output
    md = (tmp_path / "c.md").read_text()
    assert md.startswith("### ❌ qharness compare: 2 regression(s)") and "| regression | tiny | `rtn:int4` | perplexity/ppl |" in md
    page = (tmp_path / "c.html").read_text()
    import plotly.offline

    assert "compare-figure" in page and page.count(plotly.offline.get_plotlyjs()) == 1  # offline: bundle inlined once
    assert "://" not in page.replace(plotly.offline.get_plotlyjs(), "")
    assert runner.invoke(app, ["compare", str(cand.path)]).exit_code == 2


def test_export_is_read_by_pytest_benchmark_compare(tmp_path, tokens):
    pytest.importorskip("pytest_benchmark")
    ref, q = tokens
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q}, {"int4": (100.0, 1.0, [0.010, 0.011, 0.0105, 0.0102, 0.0108])})
    b = make_run(tmp_path / "b", {"ref": ref, "int4": q}, {"int4": (90.0, 1.0, [0.011, 0.012, 0.0115, 0.0112, 0.0118])})
    for rd in (a, b):
        res = runner.invoke(app, ["export-benchmark", str(rd.path), str(tmp_path / f"{rd.path.name}.json")])
        assert res.exit_code == 0 and "1 benchmark(s)" in res.output, res.output
    doc = json.loads((tmp_path / "a.json").read_text())
    stats = doc["benchmarks"][0]["stats"]
    assert stats["rounds"] == 5 and stats["min"] == 0.010 and stats["median"] == 0.0105
    assert doc["commit_info"]["id"] == "abc" and doc["machine_info"]["hardware_profile"] == "generic-x86-cpu"
    cli = Path(sys.executable).with_name("pytest-benchmark")
    out = subprocess.run([str(cli), "compare", "a.json", "b.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "decode/tokens_per_s[rtn:int4] (a)" in out.stdout and "decode/tokens_per_s[rtn:int4] (b)" in out.stdout
    plain = make_run(tmp_path / "p", {"ref": ref})
    res = runner.invoke(app, ["export-benchmark", str(plain.path), str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "no timed records" in res.output


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "harness.ci.pytest_plugin", "-p", "no:cacheprovider",
                           "--rootdir", str(cwd), "-q", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_pytest_plugin_turns_gates_into_items(tmp_path, tokens):
    ref, q = tokens
    gates = [{"metric": "ppl_ratio", "max": 1.05}, {"metric": "bits_per_weight", "max": 4}]
    run = make_run(tmp_path / "run", {"ref": ref, "int4": q}, gates=gates)
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    out = _pytest("--qharness-run", str(run.path), "-rA", cwd=tmp_path)
    assert out.returncode == 1, out.stdout
    assert "1 failed, 2 passed" in out.stdout  # test_other + ppl_ratio gate pass; bits gate fails
    assert "bits_per_weight <= 4 on * [tiny rtn:int4]: 4.25 > 4 (by +0.25)" in out.stdout
    only = _pytest("--qharness-run", str(run.path), "--qharness-only", cwd=tmp_path)
    assert "1 failed, 1 passed, 1 deselected" in only.stdout, only.stdout
    plain = _pytest(cwd=tmp_path)  # not asked for: the plugin adds nothing
    assert plain.returncode == 0 and "1 passed" in plain.stdout and "qharness" not in plain.stdout


TINY_GATED = """
name: tiny-gated
models: [tiny:llama]
device: cpu
timeout_s: 120
reference: fp:fp32
backends:
  - name: fp
    variants: [{{dtype: float32}}]
  - name: rtn
    variants: [{variant}]
measurements:
  - name: perplexity
    corpus: boolq-wiki
    seq_len: 64
    max_windows: 4
gates:
  - {{metric: ppl_ratio, max: 1.002}}
  - {{metric: ppl, max_baseline_ratio: 1.01}}
"""


def test_real_runs_gate_passes_twice_and_fails_on_a_worse_variant(tmp_path, harness_env):
    """tiny:llama (random weights: the ppl values mean nothing, only that int2 is worse than int8).
    The suite runs through the pytest plugin (--qharness-suite); the 'worse variant swapped in'
    run must fail `harness check`, the same run judged against its twin must pass."""
    xmlschema = pytest.importorskip("xmlschema")
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(TINY_GATED.format(variant="{bits: 8, sym: true}")))
    worse = tmp_path / "worse.yaml"
    worse.write_text(textwrap.dedent(TINY_GATED.format(variant="{bits: 2, group_size: 32}")))
    out = _pytest("--qharness-suite", str(good), "--qharness-out", str(tmp_path / "a"), "--qharness-only", cwd=tmp_path)
    assert out.returncode == 0 and "1 passed, 1 skipped" in out.stdout, out.stdout + out.stderr
    res = runner.invoke(app, ["run", "--suite", str(worse), "--out", str(tmp_path / "w")])
    assert res.exit_code == 1  # the plain gate of `harness run` already fails it

    same = runner.invoke(app, ["check", str(tmp_path / "a"), "--baseline", str(tmp_path / "a"), "--junit", str(tmp_path / "a.xml")])
    assert same.exit_code == 0, same.output
    assert "baseline ratio 1.0000" in (tmp_path / "a.xml").read_text()  # the same tokens, the same numbers
    bad = runner.invoke(app, ["check", str(tmp_path / "w"), "--baseline", str(tmp_path / "a"), "--junit", str(tmp_path / "w.xml")])
    assert bad.exit_code == 1, bad.output
    assert "FAIL ppl_ratio <= 1.002 on * [tiny:llama rtn:int2-g32-asym]" in bad.output
    schema = xmlschema.XMLSchema(XSD)
    schema.validate(tmp_path / "a.xml")
    schema.validate(tmp_path / "w.xml")
    cmp = compare_runs(tmp_path / "a", tmp_path / "w")
    perplexity = [d for d in cmp.deltas if d.cell == "fp:fp32" and d.measurement == "perplexity"]
    assert {d.verdict for d in perplexity if d.metric not in ("wall_s", "tokens_per_s")} == {"same"}
    assert {d.verdict for d in perplexity if d.metric in ("wall_s", "tokens_per_s")} == {"unjudged"}  # one timing each: no noise estimate
    assert {d.verdict for d in cmp.deltas if d.measurement == "cell" and d.metric == "status"} == {"new", "gone"}


def test_ci_job_yaml_uses_real_commands():
    """docs/ci-github-actions.yml parses, and every `harness <cmd>` / option it uses exists."""
    import re

    import yaml

    doc = yaml.safe_load((Path(__file__).parents[2] / "docs" / "ci-github-actions.yml").read_text())
    steps = doc["jobs"]["quality-gate"]["steps"]
    script = "\n".join(s.get("run", "") for s in steps)
    calls = re.findall(r"harness ([a-z-]+)((?: [^\n;|]*)?)", script)
    assert {c for c, _ in calls} >= {"run", "compare", "check", "export-benchmark"}
    for cmd, args in calls:
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        for opt in re.findall(r"(--[a-z-]+)", args):
            assert opt in res.output, (cmd, opt)


def test_perf_uncertainty_from_raw_samples_when_none_is_recorded():
    from harness.ci.compare import record_sigma

    ident = _ident("c", "rtn", "int4")
    spread = Record(**ident, measurement="decode", metric="decode_tokens_s", value=100.0, unit="tok/s",
                    params={"samples_s": [0.009, 0.011, 0.010, 0.012, 0.008]})
    tight = spread.model_copy(update={"params": {"samples_s": [0.010] * 5}})
    assert record_sigma(spread) == pytest.approx(100.0 * np.std([0.009, 0.011, 0.010, 0.012, 0.008], ddof=1) / np.sqrt(5) / 0.010)
    assert record_sigma(tight) == 0.0
    base = [spread.model_copy(update={"value": 104.0}), Record(**ident, measurement="cell", metric="status")]
    gate = [GateSpec(metric="decode_tokens_s", min_baseline_ratio=0.99)]
    judged = evaluate(gate, [spread, base[1]], base, z=2.0)
    assert judged[0].passed and "within noise" in judged[0].detail  # 0.96x, but the repeats spread ~7%
    assert not evaluate(gate, [tight, base[1]], [tight.model_copy(update={"value": 104.0}), base[1]], z=2.0)[0].passed


def test_values_without_uncertainty_are_judged_only_when_exact(tmp_path, tokens):
    ref, q = tokens
    a = make_run(tmp_path / "a", {"ref": ref, "int4": q})
    b = make_run(tmp_path / "b", {"ref": ref, "int4": q})
    for rd, util, bpw in ((a, 0.50, 4.25), (b, 0.40, 4.5)):
        ident = _ident("int4", "rtn", "int4", run_id=rd.path.name)
        rd.append([Record(**ident, measurement="speed", metric="bandwidth_utilisation", value=util, unit="fraction"),
                   Record(**ident, measurement="footprint", metric="bits_per_weight", value=bpw, unit="bits", attempt=1)])
    cmp = compare_runs(a, b, min_change=0.0)
    verdict = {(d.measurement, d.metric): d.verdict for d in cmp.deltas if d.cell == "rtn:int4"}
    assert verdict[("speed", "bandwidth_utilisation")] == "unjudged"  # derived from timings, no error bar: not judged
    assert verdict[("footprint", "bits_per_weight")] == "regression"  # counted from storage: any change is real


def test_ratio_gates_compare_each_corpus_with_its_own_reference():
    """A suite measuring perplexity on two corpora: a cell's ratio is against the reference on the
    same corpus (lambada's reference must not divide boolq-wiki's value), and `corpus` selects one."""
    from harness.results.records import Record

    def rec(variant, ref, corpus, value):
        return Record(cell_id=variant, suite="s", model="m", backend="rtn", variant=variant, device="cpu",
                      is_reference=ref, run_id="r", measurement="perplexity", metric="ppl", value=value, unit="",
                      protocol="gptq", params={"corpus": corpus})

    cells = [Record(cell_id=c, suite="s", model="m", backend="rtn", variant=c, device="cpu", run_id="r",
                    measurement="cell", metric="duration_s", value=1.0, unit="s") for c in ("fp", "q")]
    records = cells + [rec("fp", True, "boolq-wiki", 20.0), rec("fp", True, "lambada", 40.0),
                       rec("q", False, "boolq-wiki", 22.0), rec("q", False, "lambada", 42.0)]
    results = evaluate([GateSpec(metric="ppl", max_ratio=1.08)], records)
    assert {r.cell: r.passed for r in results} == {"m rtn:q [gptq, boolq-wiki]": False, "m rtn:q [gptq, lambada]": True}
    assert "ratio 1.1 > 1.08" in results[0].detail and "ratio 1.0500" in results[1].detail
    (only,) = evaluate([GateSpec(metric="ppl", corpus="lambada", max_ratio=1.08)], records)
    assert only.passed and only.cell == "m rtn:q"
