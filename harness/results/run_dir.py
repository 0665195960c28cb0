"""The run directory: run.json (suite + provenance), records.jsonl (one record per line, appended
a whole cell at a time), cells/<cell_id>/ (logs and per-token artifacts), report.html.

The driver process is the only writer. A cell's records go out in one O_APPEND write followed by
fsync, so a run killed at any moment loses at most the cell in flight; a torn last line (killed
mid-write) is dropped on load, anything else malformed is reported as corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness.errors import HarnessError
from harness.results.records import RECORD_COLUMNS, Record

RUN_JSON = "run.json"
RECORDS = "records.jsonl"
REPORT = "report.html"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- layout ---------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    def cell_dir(self, cell_id: str) -> Path:
        d = self.path / "cells" / cell_id
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- creation -------------------------------------------------------------------------
    def create(self, run_info: dict[str, Any]) -> None:
        """Make the directory (checking it is writable) and write run.json atomically."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise HarnessError(f"output directory '{self.path}' is not writable: {exc.strerror or exc}") from None
        self.write_run_info(run_info)

    def write_run_info(self, run_info: dict[str, Any]) -> None:
        tmp = self.run_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(run_info, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.run_json)

    # -- reading --------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_json.exists()

    def run_info(self) -> dict[str, Any]:
        if not self.run_json.exists():
            raise HarnessError(f"'{self.path}' is not a run directory (no {RUN_JSON})")
        try:
            info = json.loads(self.run_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"corrupt run directory '{self.path}': {RUN_JSON} is not valid JSON ({exc})") from None
        if not isinstance(info, dict) or "run_id" not in info:
            raise HarnessError(f"corrupt run directory '{self.path}': {RUN_JSON} has no run_id")
        return info

    def records(self) -> list[Record]:
        if not self.records_path.exists():
            return []
        raw = self.records_path.read_bytes()
        lines = raw.split(b"\n")
        torn_tail = not raw.endswith(b"\n") and bool(lines[-1])
        out: list[Record] = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                out.append(Record.model_validate_json(line))
            except ValidationError as exc:
                if torn_tail and i == len(lines):
                    break  # killed mid-write: the cell in flight is simply not finished
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or "line"
                raise HarnessError(
                    f"corrupt run directory '{self.path}': {RECORDS} line {i} is not a valid record ({where}: {first['msg']})"
                ) from None
        return out

    def current_records(self) -> list[Record]:
        """What the run says now: for each cell of the current plan (run.json 'cells'), the records
        of its latest attempt. Earlier attempts (a failed cell that was resumed) and cells that a
        changed suite no longer has stay in records.jsonl, but not in tables, reports or gates."""
        planned = {c["cell_id"] for c in self.run_info().get("cells", [])}
        records = [r for r in self.records() if not planned or r.cell_id in planned]
        latest: dict[str, int] = {}
        for r in records:
            latest[r.cell_id] = max(latest.get(r.cell_id, 0), r.attempt)
        return [r for r in records if r.attempt == latest[r.cell_id]]

    # -- writing --------------------------------------------------------------------------
    def append(self, records: list[Record]) -> None:
        """Append all records of one cell in a single write, then fsync."""
        if not records:
            return
        self._heal_torn_tail()
        payload = "".join(r.model_dump_json() + "\n" for r in records).encode()
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _heal_torn_tail(self) -> None:
        """Cut a torn last line left by a killed writer, so new lines start clean."""
        p = self.records_path
        if not p.exists() or p.stat().st_size == 0:
            return
        with open(p, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = p.read_bytes()
            f.truncate(data.rfind(b"\n") + 1)


def load_records(run_dir: str | Path, all_attempts: bool = False):
    """A run's records as a pandas DataFrame (one row per metric value): by default the current
    ones (see RunDir.current_records); all_attempts=True gives every line of records.jsonl."""
    import pandas as pd

    rd = RunDir(run_dir)
    rows = [r.model_dump() for r in (rd.records() if all_attempts else rd.current_records())]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)
