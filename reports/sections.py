"""Report sections beyond the frontier and the cell table, registered by name so each axis (tasks,
drift, outliers, roofline, ...) keeps its figures in its own module.

A section builder takes the run's records (a DataFrame, see harness.results.run_dir.load_records) and the
run's info (run.json as a dict) and returns a Section, or None when the run has nothing for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.registry import import_object

# Shown first, above the frontier figures: the answer to the question the run was made for.
LEAD_SECTIONS: dict[str, str] = {
    "verdict": "harness.reports.section_verdict:build",
}
# name -> "module:builder"; order is page order (after the frontier figures).
SECTIONS: dict[str, str] = {
    "frontier-explorer": "harness.reports.section_frontier_explorer:build",
    "power": "harness.reports.section_power:build",
    "tasks": "harness.reports.section_tasks:build",
    "drift": "harness.reports.section_drift:build",
    "outliers": "harness.reports.section_outliers:build",
    "calibration": "harness.reports.section_calibration:build",
    "calibrated": "harness.reports.section_artifacts:build",
    "levers": "harness.reports.section_levers:build",
    "roofline": "harness.reports.section_roofline:build",
    "encoders": "harness.reports.section_encoders:build",
    "vision": "harness.reports.section_vision:build",
}


@dataclass
class Section:
    title: str
    intro: str = ""  # one or two sentences: what is shown, with protocol and units
    figures: list[Any] = field(default_factory=list)  # plotly figures
    tables: list[Any] = field(default_factory=list)  # harness.reports.html.Table
    notes: list[str] = field(default_factory=list)


def build_sections(df: pd.DataFrame, info: dict, registry: dict[str, str] | None = None) -> list[Section]:
    """Every registered section that has something to show; a builder that breaks becomes a note
    on the page, never a missing report."""
    out = []
    for name, path in (SECTIONS if registry is None else registry).items():
        try:
            section = import_object(path)(df, info)
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the report
            section = Section(title=name, notes=[f"section failed to render: {type(exc).__name__}: {exc}"])
        if section is not None:
            out.append(section)
    return out
