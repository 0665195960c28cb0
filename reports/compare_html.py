"""One self-contained HTML page for `harness compare --html`: the two runs (git sha, hardware
profile), a figure of relative changes with their significance band, and every delta in a table.
Offline like the run report: plotly.js is inlined once and nothing refers to an outside URL."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go
import plotly.offline
from jinja2 import Environment
from markupsafe import Markup

from harness.ci.compare import QUIET, Comparison, fmt_delta, fmt_value

COLORS = {"regression": "#c62828", "failed": "#c62828", "improvement": "#2e7d32", "recovered": "#2e7d32",
          "changed": "#ef6c00", "noise": "#9e9e9e", "same": "#9e9e9e"}

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qharness compare — {{ base.run_id }} → {{ cand.run_id }}</title>
<script>window.__qharness_errors = [];
window.addEventListener("error", function (e) { window.__qharness_errors.push(String(e.message)); });</script>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
  table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0 1.5rem; }
  th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; }
  th { background: #f3f3f3; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  tr.regression td, tr.failed td { background: #fdecee; }
  tr.improvement td, tr.recovered td { background: #e8f5e9; }
  .warn { border-left: 6px solid #d98e04; background: #fff6e0; padding: 0.5rem 1rem; }
  .headline { font-size: 1.2rem; font-weight: 600; }
</style>
{% if plotly_js %}<script type="text/javascript">{{ plotly_js }}</script>{% endif %}
</head>
<body>
<h1>qharness compare</h1>
<table>
<tr><th></th><th>run</th><th>suite</th><th>harness git sha</th><th>hardware profile</th><th>device</th><th>finished</th></tr>
{% for label, r in (("base", base), ("candidate", cand)) %}
<tr><th>{{ label }}</th><td><code>{{ r.run_id }}</code></td><td>{{ r.suite }}</td><td><code>{{ r.git_sha }}</code></td>
<td>{{ r.hardware_profile }}</td><td>{{ r.device_name or "" }}</td><td>{{ r.finished_at or "not finished" }}</td></tr>
{% endfor %}
</table>
<p class="headline">{{ n_reg }} regression(s), {{ n_imp }} improvement(s), {{ n_quiet }} value(s) unchanged or within noise.</p>
<p>A change is significant beyond {{ z }} standard errors of the difference: paired (per-token differences on the very
same tokens) for perplexity where both runs saved their token NLLs, otherwise both runs' recorded uncertainties
combined. Sizes counted from storage have no uncertainty: any change is real. Cell wall time, quantization time and
any other value recorded without an uncertainty are shown, never judged ("unjudged").</p>
{% for w in warnings %}<p class="warn">{{ w }}</p>{% endfor %}
{% if figure %}
<h2>Relative change per cell (candidate vs base)</h2>
<p>Bars: (candidate − base) / |base| in percent; whiskers: ± {{ z }} standard errors of the difference. Red: worse,
green: better, grey: within noise. Only headline metrics with a known better direction are drawn (per-slice and
percentile details, and beyond {{ max_bars }} bars the least significant, are in the table only).</p>
<div class="figure">{{ figure }}</div>
{% endif %}
<h2>All deltas</h2>
<table id="deltas">
<thead><tr><th>verdict</th><th>model</th><th>cell</th><th>metric</th><th>unit</th><th>base ± σ</th><th>candidate ± σ</th><th>delta</th></tr></thead>
<tbody>
{% for d in deltas %}
<tr class="{{ d.verdict }}"><td>{{ d.verdict }}</td><td>{{ d.model }}</td><td><code>{{ d.cell }}</code></td>
<td>{{ d.measurement }}/{{ d.metric }}</td><td>{{ d.unit }}</td><td class="num">{{ fv(d.base, d.base_sigma) }}</td>
<td class="num">{{ fv(d.cand, d.cand_sigma) }}</td><td class="num">{{ fd(d) }}</td></tr>
{% endfor %}
</tbody>
</table>
</body>
</html>
"""


MAX_BARS = 60  # the page stays light: the most significant changes; the table below has every delta


def delta_figure(cmp: Comparison) -> go.Figure | None:
    rows = [d for d in cmp.deltas if d.direction and d.rel is not None and "@" not in d.metric and not d.detail]
    if not rows:
        return None
    if len(rows) > MAX_BARS:
        rows = sorted(rows, key=lambda d: -abs(d.z) if d.z is not None else 0.0)[:MAX_BARS]
    labels = [html.escape(f"{d.cell} · {d.metric}") + ("" if len({x.model for x in rows}) == 1 else html.escape(f" ({d.model})"))
              for d in rows]
    err = [100 * cmp.z * d.sigma / abs(d.base) if d.sigma is not None and d.base else 0.0 for d in rows]
    fig = go.Figure(go.Bar(
        x=[100 * d.rel for d in rows], y=labels, orientation="h",
        marker_color=[COLORS.get(d.verdict, "#9e9e9e") for d in rows],
        error_x={"type": "data", "array": err, "visible": True},
        customdata=[[html.escape(d.verdict), html.escape(fmt_delta(d))] for d in rows],
        hovertemplate="%{y}<br>%{customdata[0]}: %{customdata[1]}<extra></extra>",
    ))
    fig.add_vline(x=0, line_color="#444")
    bars = [100 * d.rel for d in rows]
    lo, hi = min(0.0, *bars), max(0.0, *bars)
    pad = max(0.5 * (hi - lo), 1.0)  # whiskers far wider than every bar run off the edge, not squash the bars
    fig.update_xaxes(range=[lo - pad, hi + pad])
    fig.update_layout(xaxis_title="relative change, candidate vs base (%)", yaxis={"autorange": "reversed"},
                      height=max(300, 28 * len(rows) + 120), margin={"l": 260, "r": 30, "t": 30, "b": 60},
                      template="plotly_white")
    return fig


def write_compare_html(cmp: Comparison, out: str | Path) -> Path:
    fig = delta_figure(cmp)
    fig_html = Markup(fig.to_html(full_html=False, include_plotlyjs=False, div_id="compare-figure",
                                  config={"displaylogo": False, "responsive": True})) if fig else None
    env = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    page = env.from_string(TEMPLATE).render(
        base=cmp.base, cand=cmp.cand, z=f"{cmp.z:g}", warnings=cmp.warnings, deltas=cmp.deltas,
        n_reg=len(cmp.regressions), n_imp=len(cmp.improvements),
        n_quiet=sum(d.verdict in QUIET for d in cmp.deltas),
        figure=fig_html, plotly_js=Markup(plotly.offline.get_plotlyjs()) if fig else None,
        fv=fmt_value, fd=fmt_delta, max_bars=MAX_BARS,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
