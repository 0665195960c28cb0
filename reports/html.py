"""One self-contained HTML report per run: the quality-compression frontier, a sortable cell table
and the failures, rendered from records.jsonl + run.json only.

Everything is derived from records (never from live objects), so a report can be rebuilt for any
run directory, including one that was killed or where every cell failed. The page works offline:
plotly.js is embedded once, inline, and nothing refers to an outside URL."""

from __future__ import annotations


import html
import json
import math
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from jinja2 import Environment
from markupsafe import Markup

from harness.metrics.meaning import spec_for
from harness.records import measurement_instance, record_corpus
from harness.reports.sections import build_sections
from harness.store import RunDir, load_records

TEMPLATE = "report.html.j2"
BITS = "bits_per_weight"  # metric name, unit "bits"
BYTES = "weight_bytes"  # metric name, unit "bytes"
QUANTIZE_SECONDS = ("quantize", "seconds")
CELL_SECONDS = ("cell", "duration_s")  # wall time of the whole cell, recorded by the driver
CELL_STATUS = ("cell", "status")
MB = 1e6  # weight sizes are shown in MB = 10^6 bytes


@dataclass(frozen=True)
class QualitySpec:
    """A quality metric the frontier is drawn for; direction decides what 'better' means."""

    measurement: str
    metric: str
    title: str
    lower_is_better: bool
    n_unit: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.measurement, self.metric)


def quality_spec(measurement: str, metric: str, direction=None, kind=None) -> QualitySpec | None:
    """A frontier y axis when the metric's declaration makes it a headline quality metric
    (harness.metrics.meaning); everything else is a plain column."""
    spec = spec_for(measurement, metric, direction, kind)
    if spec is None or spec.kind != "quality" or not spec.headline or spec.direction == 0:
        return None
    return QualitySpec(measurement, metric, spec.headline, spec.direction < 0, spec.samples)


@dataclass(frozen=True)
class XAxis:
    metric: str
    title: str  # used in figure titles: "... vs <title>"
    axis_label: str  # axis title, with unit
    scale: float  # divide the recorded value by this


X_AXES = (
    XAxis(BITS, "bits per weight", "bits per weight (bits)", 1.0),
    XAxis(BYTES, "weight size", "weight size (MB = 10^6 bytes)", MB),
)


# -- small helpers ------------------------------------------------------------------------------
def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _fmt(v: Any, digits: int = 4) -> str:
    if _missing(v):
        return ""
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def _fmt_unc(value: Any, unc: Any) -> str:
    """'12.35 ± 0.05', or just the value when no uncertainty was recorded."""
    if _missing(value):
        return ""
    return f"{_fmt(value)} ± {_fmt(unc, 2)}" if not _missing(unc) else _fmt(value)


def _esc(s: Any) -> str:
    """Escape text that goes into a plotly figure: plotly.js renders names and hover text as
    pseudo-HTML, so record text must not be able to inject tags there either."""
    return html.escape("" if _missing(s) else str(s))


def _int(v: Any) -> int | None:
    return None if _missing(v) else int(v)


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by x. x (size) is always minimised; y (quality)
    is minimised when lower_is_better. A point is dominated when another point is at least as good
    on both axes and strictly better on one, so exact duplicates both stay on the front."""
    sign = 1.0 if lower_is_better else -1.0
    pts = [(float(x), sign * float(y)) for x, y in points]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if any(
            (xj <= xi and yj <= yi) and (xj < xi or yj < yi)
            for j, (xj, yj) in enumerate(pts)
            if j != i
        ):
            continue
        front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], pts[i][1]))


def cell_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: identity, status (failed or skipped if any of its records says so) and the
    first error or skip reason."""
    cols = ["cell_id", "model", "backend", "variant", "is_reference", "status", "error"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for cell_id, g in df.groupby("cell_id", sort=False):
        first = g.iloc[0]
        failed = g[g["status"].isin(["failed", "skipped"])]
        errors = [e for e in failed["error"] if not _missing(e)]
        status = "failed" if (g["status"] == "failed").any() else ("skipped" if len(failed) else "ok")
        rows.append(
            {
                "cell_id": cell_id,
                "model": first["model"],
                "backend": first["backend"],
                "variant": first["variant"],
                "is_reference": bool(g["is_reference"].any()),
                "status": status,
                "error": errors[0] if errors else ("" if not len(failed) else "(no reason recorded)"),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def _ok_metric(df: pd.DataFrame, measurement: str | None, metric: str) -> pd.DataFrame:
    """The ok rows of one metric with a value, last record per cell winning."""
    sel = (df["status"] == "ok") & (df["metric"] == metric) & df["value"].notna()
    if measurement is not None:
        sel &= df["measurement"] == measurement
    return df[sel].drop_duplicates(subset="cell_id", keep="last")


def _quality_specs(df: pd.DataFrame) -> list[QualitySpec]:
    ok = df[(df["status"] == "ok") & df["value"].notna()]
    cols = [c for c in ("measurement", "metric", "direction", "kind") if c in ok.columns]
    keys = ok[cols].drop_duplicates(subset=["measurement", "metric"]).itertuples(index=False)
    specs = [quality_spec(*k) for k in keys]
    return sorted((s for s in specs if s is not None), key=lambda s: s.key)


def _protocol_text(rows: pd.DataFrame, spec: QualitySpec) -> str:
    """'gptq protocol, 4096 tokens, boolq-wiki': what the y values were measured under."""
    parts = []
    protocols = sorted({str(p) for p in rows["protocol"] if not _missing(p)})
    if protocols:
        parts.append(" / ".join(protocols) + " protocol")
    ns = sorted({int(n) for n in rows["n"] if not _missing(n)})
    if len(ns) == 1:
        parts.append(f"{ns[0]} {spec.n_unit}")
    elif ns:
        parts.append(f"{ns[0]}–{ns[-1]} {spec.n_unit}")
    data = {record_corpus(p) for p in rows["params"]} - {""}
    if data:
        parts.append(" / ".join(sorted(data)))
    return f" ({', '.join(parts)})" if parts else ""


# -- figures ----------------------------------------------------------------------------------
def frontier_figure(df: pd.DataFrame, spec: QualitySpec, x_axis: XAxis, model: str, show_model: bool = False) -> go.Figure | None:
    """Quality vs size for one model: one trace per backend with error bars, the reference as a
    star and a dashed line, the Pareto front as a step line. None when nothing can be plotted."""
    mdf = df[df["model"] == model]
    q = _ok_metric(mdf, spec.measurement, spec.metric)
    x = _ok_metric(mdf, None, x_axis.metric)[["cell_id", "value"]].rename(columns={"value": "x"})
    cells = cell_summary(mdf)
    ok_cells = set(cells.loc[cells["status"] == "ok", "cell_id"])
    pts = q.merge(x, on="cell_id")
    pts = pts[pts["cell_id"].isin(ok_cells)].reset_index(drop=True)
    if pts.empty:
        return None
    pts["x"] = pts["x"] / x_axis.scale
    unc_kind = next((str(k) for k in pts["uncertainty_kind"] if not _missing(k)), "stderr")

    def custom(rows: pd.DataFrame) -> list[list[str]]:
        return [
            [
                _esc(r.variant),
                _esc(r.backend),
                _fmt_unc(r.value, r.uncertainty) + ("" if _missing(r.uncertainty) else f" ({unc_kind})"),
                _fmt(_int(r.n)) or "n/a",
                _esc(r.protocol) or "n/a",
            ]
            for r in rows.itertuples()
        ]

    hover = (
        "<b>%{customdata[0]}</b> (%{customdata[1]})<br>"
        + f"{_esc(spec.metric)}: %{{customdata[2]}}<br>n: %{{customdata[3]}}<br>"
        + "protocol: %{customdata[4]}<br>"
        + f"{_esc(x_axis.title)}: %{{x:.4g}}<extra></extra>"
    )
    fig = go.Figure()
    # Pareto front first, so the markers are drawn on top of it.
    front = pareto_front(list(zip(pts["x"], pts["value"])), spec.lower_is_better)
    if front:
        fp = pts.iloc[front]
        fig.add_trace(
            go.Scatter(
                x=fp["x"], y=fp["value"], mode="lines", line={"shape": "hv", "color": "rgba(80,80,80,0.6)", "width": 2},
                name="Pareto front", hoverinfo="skip",
            )
        )
    normal = pts[~pts["is_reference"].astype(bool)]
    for backend, g in normal.groupby("backend", sort=True):
        fig.add_trace(
            go.Scatter(
                x=g["x"], y=g["value"], mode="markers", name=_esc(backend), marker={"size": 10},
                error_y={"type": "data", "array": [None if _missing(u) else float(u) for u in g["uncertainty"]], "visible": True},
                customdata=custom(g), hovertemplate=hover,
            )
        )
    ref = pts[pts["is_reference"].astype(bool)]
    if not ref.empty:
        fig.add_trace(
            go.Scatter(
                x=ref["x"], y=ref["value"], mode="markers",
                name="reference (" + ", ".join(_esc(v) for v in ref["variant"]) + ")",
                marker={"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}},
                error_y={"type": "data", "array": [None if _missing(u) else float(u) for u in ref["uncertainty"]], "visible": True},
                customdata=custom(ref), hovertemplate=hover,
            )
        )
        fig.add_hline(y=float(ref["value"].iloc[0]), line_dash="dash", line_color="gray",
                      annotation_text="reference", annotation_position="top left")
    prefix = f"{_esc(model)}: " if show_model else ""
    fig.update_layout(
        title=f"{prefix}{spec.title}{_esc(_protocol_text(pts, spec))} vs {x_axis.title}",
        xaxis_title=x_axis.axis_label,
        yaxis_title=f"{spec.title} ({_esc(spec.metric)}, {'lower' if spec.lower_is_better else 'higher'} is better)",
        template="plotly_white", legend_title_text="backend", margin={"t": 60},
    )
    return fig


def frontier_figures(df: pd.DataFrame) -> list[go.Figure]:
    """Every (model, quality metric, measurement instance, x axis) frontier that has data: one
    figure per model keeps each model's scale readable; one per instance keeps a suite that
    measures perplexity on two corpora (or under two protocols) from mixing them in one plot."""
    if df.empty:
        return []
    models = sorted(df["model"].dropna().unique())
    instance = pd.Series([measurement_instance(pr, pa) for pr, pa in zip(df["protocol"], df["params"])], index=df.index)
    figs = []
    for spec in _quality_specs(df):
        of_spec = df["metric"] == spec.metric
        if spec.measurement is not None:
            of_spec &= df["measurement"] == spec.measurement
        keys = sorted(instance[of_spec & (df["status"] == "ok") & df["value"].notna()].unique())
        for key in keys if len(keys) > 1 else [None]:
            sub = df if key is None else df[~of_spec | (instance == key)]
            for model in models:
                for x_axis in X_AXES:
                    fig = frontier_figure(sub, spec, x_axis, model, show_model=len(models) > 1)
                    if fig is not None:
                        figs.append(fig)
    return figs


# -- table ------------------------------------------------------------------------------------
@dataclass
class Table:
    """Headers plus rows of (text, sort key); the sort key is '' for text so the page's JS sorts
    numbers numerically and everything else alphabetically."""

    headers: list[str]
    rows: list[list[tuple[str, str]]]


def _num(v: Any) -> str:
    return "" if _missing(v) else repr(float(v))


def _detail_metric(measurement: str, metric: str, direction=None, kind=None) -> bool:
    """Distribution details (percentiles) and restatements (nll, ln ratio) stay in the records:
    one column each would bury the table (their declarations say which, harness.metrics.meaning)."""
    # "<metric>@<slice>" (per position bucket, per layer, ...): drawn by their own report sections
    spec = spec_for(measurement, metric, direction, kind)
    return "@" in metric or bool(spec and (spec.detail or spec.restates))


def cell_kernel(cell_record: Any) -> str:
    """What ran the cell's model, from its provenance (e.g. 'llama.cpp (cpu), plain buffers': the
    choice a native backend made on this CPU, adapters/llamacpp_cpu.py)."""
    prov = {} if cell_record is None else cell_record.get("provenance")
    info = prov.get("backend_info") if isinstance(prov, dict) else None
    return str(info.get("kernel") or "") if isinstance(info, dict) else ""


def cell_table(df: pd.DataFrame) -> Table:
    """One row per cell: identity, size, quality (with ratio to the model's reference), times,
    status, then every other ok metric as its own generic column."""
    cells = cell_summary(df)
    specs = _quality_specs(df)
    ok = df[(df["status"] == "ok") & df["value"].notna()] if not df.empty else df
    known = {s.key for s in specs} | {QUANTIZE_SECONDS, CELL_SECONDS, CELL_STATUS}
    cols = ["measurement", "metric", "unit"] + [c for c in ("direction", "kind") if c in ok.columns]
    distinct = ok[cols].drop_duplicates(subset=["measurement", "metric", "unit"]).itertuples(index=False)
    generic = sorted(
        {
            (m, k, u)
            for m, k, u, *stamp in distinct
            if (m, k) not in known and k not in (BITS, BYTES) and not _detail_metric(m, k, *stamp)
        }
    )

    def lookup(measurement: str | None, metric: str, unit: str | None = None) -> dict[str, Any]:
        rows = _ok_metric(df, measurement, metric) if not df.empty else df
        if unit is not None:
            rows = rows[rows["unit"] == unit]
        return {r["cell_id"]: r for _, r in rows.iterrows()}

    bits, wbytes = lookup(None, BITS), lookup(None, BYTES)
    quality = [lookup(*s.key) for s in specs]
    quant_s, cell_s = lookup(*QUANTIZE_SECONDS), lookup(*CELL_SECONDS)
    gen = [lookup(m, k, u) for m, k, u in generic]
    refs: dict[str, str] = {}
    for _, c in cells[(cells["is_reference"]) & (cells["status"] == "ok")].iterrows():
        refs.setdefault(c["model"], c["cell_id"])

    headers = ["model", "backend", "variant", "bits/weight", "weight MB"]
    for s in specs:
        headers += [f"{s.measurement}/{s.metric} ± unc (n)", f"{s.metric} ÷ reference {s.metric} (plain ratio)"]
    headers += ["quantize time (s)", "cell duration (s)", "status", "kernel"]
    headers += [f"{m}/{k} ({u})" if u else f"{m}/{k}" for m, k, u in generic]

    def val(d: dict[str, Any], cid: str, scale: float = 1.0) -> tuple[str, str]:
        r = d.get(cid)
        return ("", "") if r is None else (_fmt(r["value"] / scale), _num(r["value"] / scale))

    cells = cells.assign(_bits=[bits[c]["value"] if c in bits else -1.0 for c in cells["cell_id"]])
    cells = cells.sort_values(["model", "is_reference", "_bits"], ascending=[True, False, False], kind="stable")
    rows = []
    for _, c in cells.iterrows():
        cid = c["cell_id"]
        row = [(str(c["model"]), ""), (str(c["backend"]), ""),
               (str(c["variant"]) + (" (reference)" if c["is_reference"] else ""), ""),
               val(bits, cid), val(wbytes, cid, MB)]
        for s, d in zip(specs, quality):
            r = d.get(cid)
            if r is None:
                row += [("", ""), ("", "")]
                continue
            n = _int(r["n"])
            row.append((_fmt_unc(r["value"], r["uncertainty"]) + (f" (n={n})" if n is not None else ""), _num(r["value"])))
            ref = d.get(refs.get(c["model"], ""))
            if ref is not None and ref["value"]:
                ratio = r["value"] / ref["value"]
                row.append((f"{ratio:.4f}", _num(ratio)))
            else:
                row.append(("", ""))
        row += [val(quant_s, cid), val(cell_s, cid), (str(c["status"]), ""), (cell_kernel(cell_s.get(cid)), "")]
        for d in gen:
            r = d.get(cid)
            row.append(("", "") if r is None else (_fmt_unc(r["value"], r["uncertainty"]), _num(r["value"])))
        rows.append(row)
    return Table(headers, rows)


# -- page -------------------------------------------------------------------------------------
def _figure_html(fig: go.Figure, i: int) -> Markup:
    """A figure's div + newPlot call; plotly.js itself is embedded once by the page."""
    return Markup(
        fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{i}", default_height="480px",
                    config={"displaylogo": False, "responsive": True})
    )


def _provenance_items(prov: Any) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Scalar provenance as (key, text) pairs, package versions split off as their own table."""
    if not isinstance(prov, dict):
        return [], {}
    items, versions = [], {}
    for k in sorted(prov):
        v = prov[k]
        if k == "versions" and isinstance(v, dict):
            versions = {str(p): str(ver) for p, ver in sorted(v.items())}
        elif isinstance(v, (dict, list)):
            items.append((str(k), json.dumps(v, sort_keys=True, default=str)))
        else:
            items.append((str(k), "" if v is None else str(v)))
    return items, versions


def write_report(run_dir: str | Path) -> Path:
    """Render <run_dir>/report.html from run.json + records.jsonl and return its path. Renders for
    any content (no records, only failures); only a missing or corrupt run directory raises."""
    rd = RunDir(run_dir)
    info = rd.run_info()
    df = load_records(rd.path)
    suite = info.get("suite") if isinstance(info.get("suite"), dict) else {"name": str(info.get("suite", ""))}
    models = info.get("models") if isinstance(info.get("models"), dict) else {}
    notes = [(str(m), str(d["note"])) for m, d in sorted(models.items()) if isinstance(d, dict) and d.get("note")]
    prov_items, versions = _provenance_items(info.get("provenance"))

    cells = cell_summary(df)
    n_ok = int((cells["status"] == "ok").sum())
    failed = cells[cells["status"] == "failed"]
    skipped = cells[cells["status"] == "skipped"]
    figs = frontier_figures(df) if n_ok else []
    table = cell_table(df) if len(cells) else Table([], [])
    sections = build_sections(df, info) if n_ok else []
    n_figs = len(figs)
    rendered_sections = []
    for sec in sections:
        rendered_sections.append((sec, [_figure_html(f, n_figs + i) for i, f in enumerate(sec.figures)]))
        n_figs += len(sec.figures)

    template = (files("harness.reports") / "templates" / TEMPLATE).read_text(encoding="utf-8")
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string(template).render(
        suite_name=str(suite.get("name", "")),
        suite_json=json.dumps(suite, indent=2, sort_keys=True, default=str),
        run_id=str(info.get("run_id", "")),
        started_at=str(info.get("started_at") or ""),
        finished_at=str(info.get("finished_at") or ""),
        notes=notes,
        provenance=prov_items,
        versions=versions,
        n_cells=len(cells),
        n_ok=n_ok,
        n_failed=len(failed),
        n_skipped=len(skipped),
        plotly_js=Markup(plotly.offline.get_plotlyjs()) if n_figs else None,
        sections=rendered_sections,
        figures=[_figure_html(f, i) for i, f in enumerate(figs)],
        table=table,
        failed=[(str(r.model), str(r.backend), str(r.variant), str(r.error)) for r in failed.itertuples()],
        skipped=[(str(r.model), str(r.backend), str(r.variant), str(r.error)) for r in skipped.itertuples()],
    )
    out = rd.report_path
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
