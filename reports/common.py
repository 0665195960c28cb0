"""What every report module shares, public so sections stop borrowing each other's privates: value
formatting and escaping, the ok-rows filters, cell labels, the Pareto front, the table type, and one
look per backend (colour) and per cell (colour + symbol) so a cell is the same point in every
figure of a report."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd
from plotly.colors import qualitative

# Colour-blind-friendly first (Okabe-Ito, without its yellow and orange: the reference is a gold star),
# then more when a run has many backends. Symbols tell a backend's variants apart without relying on
# colour or hovering.
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#000000")
MORE = ("#8C564B", "#9467BD", "#7F7F7F", "#BCBD22", "#17BECF", "#1F77B4", "#2CA02C", "#E377C2")  # D3's, distinct from the above
PALETTE: tuple[str, ...] = OKABE_ITO + MORE + tuple(qualitative.Dark24)
SYMBOLS: tuple[str, ...] = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "pentagon",
                            "hexagon", "cross", "star-triangle-up", "hourglass", "bowtie", "circle-open",
                            "square-open", "diamond-open")
REFERENCE_MARKER = {"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}}
SPAN_FOR_LOG_AXIS = 2.5  # positive values spanning more than this factor get a log axis (ppl 26..71: 2.7x)


@dataclass
class Table:
    """Headers plus rows of (text, sort key); the sort key is '' for text so the page's JS sorts
    numbers numerically and everything else alphabetically."""

    headers: list[str]
    rows: list[list[tuple[str, str]]]
    caption: str = ""


# -- values -------------------------------------------------------------------------------------
def missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def fmt(v: Any, digits: int = 4) -> str:
    if missing(v):
        return ""
    if isinstance(v, (int, float)):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_unc(value: Any, unc: Any) -> str:
    """'12.35 ± 0.05', or just the value when no uncertainty was recorded."""
    if missing(value):
        return ""
    return f"{fmt(value)} ± {fmt(unc, 2)}" if not missing(unc) else fmt(value)


def esc(s: Any) -> str:
    """Escape text that goes into a plotly figure: plotly.js renders names and hover text as
    pseudo-HTML, so record text must not be able to inject tags there either."""
    return html.escape("" if missing(s) else str(s))


def int_or_none(v: Any) -> int | None:
    return None if missing(v) else int(v)


def sort_key(v: Any) -> str:
    """A numeric cell's sort key for the page's table sorter ('' for none)."""
    return "" if missing(v) else repr(float(v))


# -- rows ---------------------------------------------------------------------------------------
def ok_rows(df: pd.DataFrame, measurement: str | None = None) -> pd.DataFrame:
    """Every ok record with a value (of one measurement when given); slices (metric@pos, ...) kept."""
    sel = (df["status"] == "ok") & df["value"].notna()
    if measurement is not None:
        sel &= df["measurement"] == measurement
    return df[sel]


def ok_metric(df: pd.DataFrame, measurement: str | None, metric: str) -> pd.DataFrame:
    """The ok rows of one metric with a value, one per cell (the last record of a cell wins)."""
    rows = ok_rows(df, measurement)
    return rows[rows["metric"] == metric].drop_duplicates(subset="cell_id", keep="last")


def cell_label(row: Any) -> str:
    return f"{row['backend']}:{row['variant']}"


# -- geometry -----------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by x. x (size) is always minimised (negate a
    higher-is-better x before calling); y (quality) is minimised when lower_is_better. A point is
    dominated when another is at least as good on both axes and strictly better on one, so exact
    duplicates both stay on the front."""
    sign = 1.0 if lower_is_better else -1.0
    pts = [(float(x), sign * float(y)) for x, y in points]
    front = []
    for i, (xi, yi) in enumerate(pts):
        if any((xj <= xi and yj <= yi) and (xj < xi or yj < yi) for j, (xj, yj) in enumerate(pts) if j != i):
            continue
        front.append(i)
    return sorted(front, key=lambda i: (pts[i][0], pts[i][1]))


def axis_type(values: Sequence[Any]) -> str:
    """'log' when the positive values span more than SPAN_FOR_LOG_AXIS (one int3 point at ppl 71
    must not flatten every 4-bit point between 26 and 38: 2.7x), else 'linear'. Any value <= 0 keeps the
    axis linear: a log axis would drop it."""
    vals = [float(v) for v in values if not missing(v)]
    if len(vals) < 2 or min(vals) <= 0:
        return "linear"
    return "log" if max(vals) / min(vals) > SPAN_FOR_LOG_AXIS else "linear"


def axis_layout(values: Sequence[Any], title: str) -> dict:
    """A plotly axis dict: linear, or log with ticks written out in full (plotly's own log ticks
    label 20 and 30 as "2" and "3" beside "10", which reads as nonsense in a bits axis)."""
    kind = axis_type(values)
    out: dict[str, Any] = {"title": {"text": title + (" (log scale)" if kind == "log" else "")}, "type": kind}
    if kind == "log":
        vals = [float(v) for v in values if not missing(v)]
        out["tickvals"] = log_ticks(min(vals), max(vals))
        out["ticktext"] = [fmt(v, 3) for v in out["tickvals"]]
    return out


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-3-5 style tick values spanning [lo, hi] (at most ~10)."""
    for mantissas in ((1, 1.5, 2, 3, 4, 5, 6, 8), (1, 2, 3, 5), (1, 2, 5), (1,)):
        ticks = [m * 10.0**k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas]
        ticks = [t for t in ticks if lo / 1.15 <= t <= hi * 1.15]
        if len(ticks) <= 10:
            return ticks
    return ticks


# -- looks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellLook:
    color: str
    symbol: str
    label: str  # "backend:variant", the legend text


def cell_looks(df: pd.DataFrame) -> dict[str, CellLook]:
    """cell_id -> its colour (by backend) and symbol (by variant within the backend), computed from
    the whole run so every figure of the report draws a cell the same way, whatever subset it shows.
    Backends and variants are taken in sorted order, so the same run always gets the same looks."""
    if df.empty:
        return {}
    cells = df[["cell_id", "backend", "variant"]].drop_duplicates(subset="cell_id")
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(sorted(cells["backend"].astype(str).unique()))}
    looks = {}
    for backend, g in cells.groupby(cells["backend"].astype(str), sort=True):
        for i, row in enumerate(g.sort_values("variant", key=lambda s: s.astype(str)).itertuples()):
            looks[row.cell_id] = CellLook(colors[backend], SYMBOLS[i % len(SYMBOLS)], f"{backend}:{row.variant}")
    return looks
