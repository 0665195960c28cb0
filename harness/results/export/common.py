"""What every export sink reads: a run's records grouped by cell, a cell's status, provenance
fields, numbers MLflow and JSON accept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from harness.results.records import Record


@dataclass(frozen=True)
class Exported:
    where: str  # the file, folder or tracking URI written
    summary: str  # one line for the CLI


def provenance(info: dict) -> dict:
    p = info.get("provenance")
    return p if isinstance(p, dict) else {}


def suite_name(info: dict) -> str:
    s = info.get("suite")
    return str(s.get("name") if isinstance(s, dict) else s or "qharness")


def by_cell(records: list[Record]) -> dict[str, list[Record]]:
    """Records grouped by cell, in the order the run wrote them."""
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.cell_id, []).append(r)
    return out


def cell_status(recs: list[Record]) -> tuple[str, str | None]:
    """(status, error) of a cell: its `cell` record's (ok when it has none)."""
    cell = [r for r in recs if r.measurement == "cell"]
    return (cell[-1].status, cell[-1].error) if cell else ("ok", None)


def numeric(r: Record) -> bool:
    return r.status == "ok" and r.value is not None and math.isfinite(r.value)


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def epoch_ms(iso: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(iso)).timestamp() * 1000)
    except ValueError:
        return None
