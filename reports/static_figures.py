"""Static copies of a report's figures (SVG/PNG under <run>/figures/) for print, slides and papers,
through plotly's own export (kaleido >= 1, which drives a local Chrome/Chromium; nothing is fetched:
plotly.js comes from the installed plotly package). Optional: when kaleido or a browser is missing
the HTML report is still written and says why the static copies are not there."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError

FORMATS = ("svg", "png", "pdf")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FIGURES_DIR = "figures"


@dataclass
class StaticResult:
    paths: list[Path] = field(default_factory=list)
    note: str = ""  # one line for the report: where the copies are, or why there are none


def check_formats(formats: tuple[str, ...]) -> tuple[str, ...]:
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise HarnessError(f"unknown static figure format '{bad[0]}' (choose from: {', '.join(FORMATS)})")
    return tuple(dict.fromkeys(formats))


def find_browser() -> str | None:
    """A Chrome/Chromium kaleido can drive: $BROWSER_PATH (kaleido's own variable) or one on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _slug(title: str, i: int) -> str:
    text = re.sub(r"<[^>]+>", "", title or "figure")
    return f"{i:02d}-" + (re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "figure")


def write_static(figures: list, run_dir: Path, formats: tuple[str, ...]) -> StaticResult:
    """Write every figure in every format; never raises (the report must not depend on it)."""
    if not formats or not figures:
        return StaticResult()
    try:
        import kaleido  # noqa: F401 - plotly's export engine
    except ImportError:
        return StaticResult(note="static figures not written: kaleido is not installed (pip install 'qharness[static]')")
    browser = find_browser()
    if browser is None:
        return StaticResult(note="static figures not written: kaleido needs Chrome or Chromium and none was found "
                                 "(install one, e.g. apt-get install chromium, or set BROWSER_PATH)")
    os.environ.setdefault("BROWSER_PATH", browser)
    import plotly.io as pio

    out = Path(run_dir) / FIGURES_DIR
    out.mkdir(parents=True, exist_ok=True)
    figs, paths = [], []
    heights = []
    for i, fig in enumerate(figures):
        title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
        # a static legend cannot scroll: make room for every entry
        entries = sum(1 for t in fig.data if t.showlegend is not False and t.visible is not False)
        for fmt in formats:
            figs.append(fig)
            paths.append(out / f"{_slug(title, i)}.{fmt}")
            heights.append(max(560, 200 + 26 * entries))
    try:
        pio.write_images(figs, paths, width=1100, height=heights)
    except Exception as exc:  # noqa: BLE001 - a browser that will not start costs the copies, not the report
        return StaticResult(note=f"static figures not written: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return StaticResult(paths, f"static copies of the {len(figures)} figures: {FIGURES_DIR}/*.{{{','.join(formats)}}}")
