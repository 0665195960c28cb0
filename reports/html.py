"""One self-contained HTML report per run: the quality-compression frontier, a sortable cell table
and the failures, rendered from records.jsonl + run.json only.

Everything is derived from records (never from live objects), so a report can be rebuilt for any
run directory, including one that was killed or where every cell failed. The page works offline:
plotly.js is embedded once, inline, and nothing refers to an outside URL."""

from __future__ import annotations


import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.offline
from jinja2 import Environment
from markupsafe import Markup

from harness.metrics.meaning import spec_for
from harness.results.records import measurement_instance, record_corpus
from harness.reports.common import (PALETTE, REFERENCE_MARKER, CellLook, Table, axis_layout, cell_looks, esc, fmt, fmt_unc, int_or_none,
                                     missing, ok_metric, pareto_front, sort_key)
from harness.reports.sections import LEAD_SECTIONS, build_sections
from harness.reports.static_figures import write_static
from harness.results.run_dir import RunDir, load_records

TEMPLATE = "report.html.j2"
TEMPLATE_NAME = "plotly_white"
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
    lower_is_better: bool = True  # sizes shrink; speeds grow


# Speed axes are drawn when a cell measured them (llm-perf, or a suite with `speed`): the
# quality-vs-speed frontier answers "per second" as the size axes answer "per byte".
X_AXES = (
    XAxis(BITS, "bits per weight", "bits per weight (bits)", 1.0),
    XAxis(BYTES, "weight size", "weight size (MB = 10^6 bytes)", MB),
    XAxis("decode_tokens_s", "decode speed", "decode speed (tokens/s, higher is better)", 1.0, lower_is_better=False),
    XAxis("prefill_tokens_s", "prefill speed", "prefill speed (tokens/s, higher is better)", 1.0, lower_is_better=False),
)


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
        errors = [e for e in failed["error"] if not missing(e)]
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


def _quality_specs(df: pd.DataFrame) -> list[QualitySpec]:
    ok = df[(df["status"] == "ok") & df["value"].notna()]
    cols = [c for c in ("measurement", "metric", "direction", "kind") if c in ok.columns]
    keys = ok[cols].drop_duplicates(subset=["measurement", "metric"]).itertuples(index=False)
    specs = [quality_spec(*k) for k in keys]
    return sorted((s for s in specs if s is not None), key=lambda s: s.key)


def _protocol_text(rows: pd.DataFrame, spec: QualitySpec) -> str:
    """'gptq protocol, 4096 tokens, boolq-wiki': what the y values were measured under."""
    parts = []
    protocols = sorted({str(p) for p in rows["protocol"] if not missing(p)})
    if protocols:
        parts.append(" / ".join(protocols) + " protocol")
    ns = sorted({int(n) for n in rows["n"] if not missing(n)})
    if len(ns) == 1:
        parts.append(f"{ns[0]} {spec.n_unit}")
    elif ns:
        parts.append(f"{ns[0]}–{ns[-1]} {spec.n_unit}")
    data = {record_corpus(p) for p in rows["params"]} - {""}
    if data:
        parts.append(" / ".join(sorted(data)))
    return f" ({', '.join(parts)})" if parts else ""


# -- figures ----------------------------------------------------------------------------------
def frontier_figure(df: pd.DataFrame, spec: QualitySpec, x_axis: XAxis, model: str, show_model: bool = False,
                    looks: dict[str, CellLook] | None = None) -> go.Figure | None:
    """Quality vs size (or speed) for one model: one labelled point per cell (colour by backend,
    symbol by variant, the same in every figure of the report), error bars, the reference as a gold
    star and a dashed line, the Pareto front as a step line; log axes where values span more than
    2.5x. None when nothing can be plotted."""
    mdf = df[df["model"] == model]
    looks = cell_looks(df) if looks is None else looks
    q = ok_metric(mdf, spec.measurement, spec.metric)
    x = ok_metric(mdf, None, x_axis.metric)[["cell_id", "value"]].rename(columns={"value": "x"})
    cells = cell_summary(mdf)
    ok_cells = set(cells.loc[cells["status"] == "ok", "cell_id"])
    pts = q.merge(x, on="cell_id")
    pts = pts[pts["cell_id"].isin(ok_cells)].reset_index(drop=True)
    if pts.empty:
        return None
    pts["x"] = pts["x"] / x_axis.scale
    unc_kind = next((str(k) for k in pts["uncertainty_kind"] if not missing(k)), "stderr")

    def custom(r) -> list[str]:
        return [esc(r.variant), esc(r.backend),
                fmt_unc(r.value, r.uncertainty) + ("" if missing(r.uncertainty) else f" ({unc_kind})"),
                fmt(int_or_none(r.n)) or "n/a", esc(r.protocol) or "n/a"]

    hover = (
        "<b>%{customdata[0]}</b> (%{customdata[1]})<br>"
        + f"{esc(spec.metric)}: %{{customdata[2]}}<br>n: %{{customdata[3]}}<br>"
        + "protocol: %{customdata[4]}<br>"
        + f"{esc(x_axis.title)}: %{{x:.4g}}<extra></extra>"
    )
    fig = go.Figure()
    # Pareto front first, so the markers are drawn on top of it.
    sign = 1.0 if x_axis.lower_is_better else -1.0
    front = pareto_front([(sign * xv, yv) for xv, yv in zip(pts["x"], pts["value"])], spec.lower_is_better)
    if front:
        fp = pts.iloc[front].sort_values("x")
        fig.add_trace(go.Scatter(
            x=fp["x"], y=fp["value"], mode="lines", name="Pareto front", hoverinfo="skip",
            line={"shape": "hv" if x_axis.lower_is_better else "vh", "color": "rgba(80,80,80,0.6)", "width": 2}))
    order = pts.assign(_ref=pts["is_reference"].astype(bool)).sort_values(["_ref", "backend", "variant"], kind="stable")
    for r in order.itertuples():
        look = looks.get(r.cell_id)
        is_ref = bool(r.is_reference)
        marker = dict(REFERENCE_MARKER) if is_ref else {"size": 11, "color": look.color if look else None,
                                                         "symbol": look.symbol if look else "circle",
                                                         "line": {"color": "white", "width": 0.5}}
        fig.add_trace(go.Scatter(
            x=[r.x], y=[r.value], mode="markers+text", text=[esc(r.variant)], textposition="top center",
            textfont={"size": 10}, name=("reference: " if is_ref else "") + esc(f"{r.backend}:{r.variant}"),
            legendgroup="reference" if is_ref else esc(r.backend), marker=marker,
            error_y={"type": "data", "array": [None if missing(r.uncertainty) else float(r.uncertainty)], "visible": True,
                     "color": "#555" if is_ref else (look.color if look else None), "thickness": 1},
            customdata=[custom(r)], hovertemplate=hover,
        ))
    ref = pts[pts["is_reference"].astype(bool)]
    if not ref.empty:
        # no annotation text: on a log axis plotly places annotations in log10 units (a label at 1e22)
        fig.add_hline(y=float(ref["value"].iloc[0]), line_dash="dash", line_color="gray")
    prefix = f"{esc(model)}: " if show_model else ""
    fig.update_layout(
        title=f"{prefix}{spec.title}{esc(_protocol_text(pts, spec))} vs {x_axis.title}",
        xaxis=axis_layout(pts["x"], x_axis.axis_label),
        yaxis=axis_layout(pts["value"], f"{spec.title} ({esc(spec.metric)}, "
                                        f"{'lower' if spec.lower_is_better else 'higher'} is better)"),
        template=TEMPLATE_NAME, legend_title_text="cell (backend:variant)", margin={"t": 60},
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
    looks = cell_looks(df)
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
                    fig = frontier_figure(sub, spec, x_axis, model, show_model=len(models) > 1, looks=looks)
                    if fig is not None:
                        figs.append(fig)
    return figs


# -- table ------------------------------------------------------------------------------------
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
        rows = ok_metric(df, measurement, metric) if not df.empty else df
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
        return ("", "") if r is None else (fmt(r["value"] / scale), sort_key(r["value"] / scale))

    cells = cells.assign(_bits=[bits[c]["value"] if c in bits else -1.0 for c in cells["cell_id"]])
    cells = cells.sort_values(["model", "is_reference", "_bits"], ascending=[True, False, False], kind="stable")
    rows = []
    for _, c in cells.iterrows():
        cid = c["cell_id"]
        row = [(str(c["model"]), ""), (str(c["backend"]), ""),
               (str(c["variant"]) + (" (reference)" if c["is_reference"] else ""), ""),
               val(bits, cid), val(wbytes, cid, MB)]
        for d in quality:
            r = d.get(cid)
            if r is None:
                row += [("", ""), ("", "")]
                continue
            n = int_or_none(r["n"])
            row.append((fmt_unc(r["value"], r["uncertainty"]) + (f" (n={n})" if n is not None else ""), sort_key(r["value"])))
            ref = d.get(refs.get(c["model"], ""))
            if ref is not None and ref["value"]:
                ratio = r["value"] / ref["value"]
                row.append((f"{ratio:.4f}", sort_key(ratio)))
            else:
                row.append(("", ""))
        row += [val(quant_s, cid), val(cell_s, cid), (str(c["status"]), ""), (cell_kernel(cell_s.get(cid)), "")]
        for d in gen:
            r = d.get(cid)
            row.append(("", "") if r is None else (fmt_unc(r["value"], r["uncertainty"]), sort_key(r["value"])))
        rows.append(row)
    return Table(headers, rows)


# -- page -------------------------------------------------------------------------------------
# plotly_white's look in a few hundred bytes: a named plotly.py template is copied in full (~7 KB)
# into every figure's JSON; the page carries plotly.js once and each figure only its data.
SLIM_TEMPLATE = go.layout.Template(layout={
    "paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"}, "hovermode": "closest",
    "xaxis": {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "zerolinecolor": "#EBF0F8", "automargin": True},
    "yaxis": {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "zerolinecolor": "#EBF0F8", "automargin": True},
    "colorway": list(PALETTE),
})


def _figure_html(fig: go.Figure, i: int) -> Markup:
    """A figure's div + newPlot call; plotly.js itself is embedded once by the page."""
    fig.update_layout(template=SLIM_TEMPLATE)
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


def write_report(run_dir: str | Path, static: tuple[str, ...] = ()) -> Path:
    """Render <run_dir>/report.html from run.json + records.jsonl and return its path. Renders for
    any content (no records, only failures); only a missing or corrupt run directory raises.
    `static` ('svg', 'png', 'pdf') also writes every figure to <run_dir>/figures/ (reports.static_figures)."""
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
    lead = build_sections(df, info, LEAD_SECTIONS) if n_ok else []
    n_figs = len(figs)
    rendered_sections = []
    for sec in sections:
        rendered_sections.append((sec, [_figure_html(f, n_figs + i) for i, f in enumerate(sec.figures)]))
        n_figs += len(sec.figures)

    all_figs = figs + [f for sec, _ in rendered_sections for f in sec.figures]
    static_note = write_static(all_figs, rd.path, static).note if static else (
        f"Static SVG/PNG copies of the figures: harness report {rd.path.name} --static svg" if all_figs else "")
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
        lead=lead,
        static_note=static_note,
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
