"""The HTML pages in a real headless Chromium: they load without console errors, every plotly figure
renders (an <svg class="main-svg"> per figure div), and a screenshot is taken (kept where
QHARNESS_SCREENSHOT_DIR points, e.g. a CI artifact folder). Skipped, with the reason, when no
Chromium/Chrome is installed (.ci/run tries `apt-get install chromium` first)."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from harness.ci.compare import compare_runs
from harness.results.records import Record
from harness.reports.compare_html import write_compare_html
from harness.reports.html import write_report
from harness.results.run_dir import RunDir

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# Put first into a copy of the page: records console.error and uncaught errors, then writes them
# into the DOM after load (plus a beat for plotly's async work), where --dump-dom can read them.
RECORDER = """<script>(function () {
  var errs = [], orig = console.error;
  console.error = function () { errs.push(Array.prototype.map.call(arguments, String).join(" ")); orig.apply(console, arguments); };
  window.addEventListener("error", function (e) { errs.push("uncaught: " + e.message); });
  window.addEventListener("unhandledrejection", function (e) { errs.push("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () { setTimeout(function () {
    var pre = document.createElement("pre"); pre.id = "qh-console-errors"; pre.textContent = JSON.stringify(errs);
    document.body.appendChild(pre); }, 1000); });
})();</script>"""


@functools.lru_cache(maxsize=1)
def browser() -> str | None:
    """A Chromium that starts here (a snap stub or a broken install counts as none)."""
    for path in [os.environ.get("QHARNESS_CHROMIUM"), *map(shutil.which, BROWSERS)]:
        if not path:
            continue
        try:
            if subprocess.run([path, "--version"], capture_output=True, timeout=60).returncode == 0:
                return path
        except (OSError, subprocess.SubprocessError):
            continue
    return None


needs_browser = pytest.mark.skipif(browser() is None, reason="no Chromium/Chrome found (apt-get install chromium, "
                                   "or set QHARNESS_CHROMIUM); the report's browser check did not run")


def _chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def load_page(page: Path, tmp: Path) -> tuple[str, list[str]]:
    """(DOM after scripts ran, console errors) of `page` in headless Chromium."""
    html = page.read_text(encoding="utf-8")
    probe = tmp / f"probe-{page.name}"
    probe.write_text(re.sub(r"<head>", "<head>" + RECORDER, html, count=1), encoding="utf-8")
    out = _chromium("--dump-dom", probe.as_uri())
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r'<pre id="qh-console-errors">(.*?)</pre>', out.stdout, re.S)
    assert m, "the page's scripts did not run to the end (no error record in the DOM)\n" + out.stderr[-2000:]
    import html as html_mod

    errors = json.loads(html_mod.unescape(m.group(1)))
    errors += [ln for ln in out.stderr.splitlines() if "CONSOLE" in ln and "Uncaught" in ln]
    return out.stdout, errors


def assert_figures_rendered(dom: str, at_least: int) -> None:
    """Every figure div holds plotly's rendered <svg class="main-svg"> (an unrendered one is empty)."""
    chunks = re.split(r'class="plotly-graph-div', dom)[1:]
    assert len(chunks) >= at_least, f"expected >= {at_least} figures, found {len(chunks)}"
    empty = [i for i, c in enumerate(chunks) if not re.search(r'<svg[^>]*class="main-svg"', c)]
    assert not empty, f"figures {empty} of {len(chunks)} did not render"


def screenshot(page: Path, png: Path) -> Path:
    out = _chromium(f"--screenshot={png}", "--window-size=1280,2600", page.as_uri())
    assert out.returncode == 0 and png.exists(), out.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000  # not a blank page
    keep = os.environ.get("QHARNESS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    return png


def _run(path: Path, shift: float) -> RunDir:
    rd = RunDir(path)
    rd.create({"run_id": path.name, "suite": {"name": "browser <check>"}, "hardware_profile": "generic-x86-cpu",
               "started_at": "2026-01-01T00:00:00", "finished_at": "2026-01-01T00:10:00",
               "provenance": {"git_sha": "abc", "device": "cpu", "versions": {"torch": "2.13.0"}},
               "models": {"tiny": {"note": "synthetic records for the browser check"}}})
    cells = [("fp32", "fp", 32.0, 10.0, True), ("int8", "rtn", 8.25, 10.05, False), ("int4", "rtn", 4.31, 11.2 + shift, False),
             ("Q4_K_M", "llamacpp", 4.9, 10.8, False)]
    for variant, backend, bits, ppl, ref in cells:
        ident = dict(cell_id=f"{backend}-{variant}", suite="s", model="tiny", backend=backend, variant=variant, device="cpu",
                     hardware_profile="generic-x86-cpu", is_reference=ref, run_id=path.name)
        samples = list(np.linspace(0.010, 0.012, 5) * (1 + shift))
        rd.append([
            Record(**ident, measurement="perplexity", metric="ppl", value=ppl, unit="ppl", n=4096, uncertainty=0.05,
                   uncertainty_kind="stderr", protocol="gptq", params={"corpus": "boolq-wiki"}),
            Record(**ident, measurement="divergence", metric="kld_mean", value=0.0 if ref else 0.01 * (32 / bits), unit="nats",
                   n=2048, uncertainty=0.001, protocol="kld"),
            Record(**ident, measurement="footprint", metric="bits_per_weight", value=bits, unit="bits"),
            Record(**ident, measurement="footprint", metric="weight_bytes", value=bits / 8 * 1.35e8, unit="bytes"),
            Record(**ident, measurement="decode", metric="tokens_per_s", value=1 / np.mean(samples), unit="tok/s", n=5,
                   uncertainty=2.0, protocol="decode", params={"samples_s": samples}, direction=1, kind="speed"),
            Record(**ident, measurement="tasks", metric="acc@piqa", value=0.6 if ref else 0.55, unit="fraction", n=16,
                   uncertainty=0.12, protocol="loglikelihood", params={"task": "piqa", "num_fewshot": 0, "limit": 16}),
            Record(**ident, measurement="cell", metric="status"),
        ])
        if not ref:
            task = {"task": "piqa", "num_fewshot": 0, "limit": 16}
            rd.append([
                Record(**ident, measurement="tasks", metric="recovery@piqa", value=91.7, unit="%", n=16, uncertainty=9.0,
                       protocol="loglikelihood", params={**task, "mde": 62.5}),
                Record(**ident, measurement="tasks", metric="flip_rate@piqa", value=0.1875, unit="fraction", n=16,
                       uncertainty=0.1, protocol="loglikelihood",
                       params={**task, "correct_to_wrong": 2, "wrong_to_correct": 1, "mcnemar_p": 1.0}),
                Record(**ident, measurement="perplexity", metric="ppl_ratio", value=ppl / 10.0, unit="x", n=4096,
                       uncertainty=0.002, protocol="gptq", params={"corpus": "boolq-wiki", "mde": 0.0056}),
            ])
    rd.append([Record(cell_id="rtn-int2", suite="s", model="tiny", backend="rtn", variant="int2", device="cpu",
                      run_id=path.name, measurement="cell", metric="status", status="failed", error="worker died: SIGSEGV")])
    return rd


@needs_browser
def test_run_report_renders_in_chromium(tmp_path):
    rd = _run(tmp_path / "run", 0.0)
    page = write_report(rd.path)
    dom, errors = load_page(page, tmp_path)
    assert errors == [], errors
    assert_figures_rendered(dom, at_least=2)  # frontier(s) at least; sections add more
    assert "worker died: SIGSEGV" in dom  # failed cells with reasons
    assert "What this run could detect" in dom and "The sensitive measurement of this run: perplexity ratio" in dom
    assert "McNemar p" in dom and "2 / 1" in dom and "62.5 (underpowered)" in dom  # flips, and no finding from 16 items
    # the answer first, and every point labelled in the rendered SVG (readable without hovering)
    assert "The answer" in dom and dom.index("The answer") < dom.index("Quality vs compression")
    assert "ranked by perplexity/ppl_ratio" in dom and "Pareto cells, bits per weight vs ppl_ratio" in dom
    for variant in ("Q4_K_M", "int4", "int8"):
        assert re.search(r'class="textpoint".{0,600}?>' + variant + "<", dom, re.S), variant
    screenshot(page, tmp_path / "run-report.png")


@needs_browser
def test_compare_page_renders_in_chromium(tmp_path):
    a, b = _run(tmp_path / "a", 0.0), _run(tmp_path / "b", 0.3)
    page = write_compare_html(compare_runs(a, b), tmp_path / "compare.html")
    dom, errors = load_page(page, tmp_path)
    assert errors == [], errors
    assert_figures_rendered(dom, at_least=1)
    assert "regression" in dom


@needs_browser
def test_the_probe_sees_console_errors(tmp_path):
    """The check itself can fail: a page that throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><head></head><body><script>console.error('boom'); null.x;</script></body></html>")
    _, errors = load_page(bad, tmp_path)
    assert any("boom" in e for e in errors) and any("uncaught" in e for e in errors)
