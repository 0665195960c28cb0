"""`--to sqlite`: llama-bench's `-o sql` shape (one table, one row per value, run-wide
build_commit, cpu_info, gpu_info columns); appendable, a run exported twice replaces its own rows."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

from harness.errors import HarnessError
from harness.results.export.common import Exported, provenance
from harness.results.records import RECORD_COLUMNS, Record
from harness.results.run_dir import RunDir

RUN_COLUMNS = ("build_commit", "cpu_info", "gpu_info", "device_name", "started_at", "finished_at", "harness_version")
SQL_COLUMNS = (*RECORD_COLUMNS, "seq", *RUN_COLUMNS)
SQL_TYPES = {"value": "REAL", "uncertainty": "REAL", "n": "INTEGER", "attempt": "INTEGER", "direction": "INTEGER",
             "is_reference": "INTEGER", "seq": "INTEGER"}
JSON_COLUMNS = ("variant_params", "params", "provenance")
CREATE_SQL = ("CREATE TABLE IF NOT EXISTS records ("
              + ", ".join(f'"{c}" {SQL_TYPES.get(c, "TEXT")}' for c in SQL_COLUMNS)
              + ", PRIMARY KEY (run_id, cell_id, attempt, seq))")


def sql_rows(info: dict, records: list[Record]) -> list[tuple]:
    """One row per record; seq = its place among its cell attempt's records (records.jsonl order)."""
    prov = provenance(info)
    run_cols = (prov.get("git_sha"), prov.get("cpu"), prov.get("gpu"), info.get("device_name"),
                info.get("started_at"), info.get("finished_at"), prov.get("harness_version"))
    seq: Counter = Counter()
    rows = []
    for r in records:
        d = r.model_dump()
        for c in JSON_COLUMNS:
            d[c] = json.dumps(d[c], sort_keys=True, default=str)
        d["is_reference"] = int(r.is_reference)
        rows.append((*(d[c] for c in RECORD_COLUMNS), seq[(r.cell_id, r.attempt)], *run_cols))
        seq[(r.cell_id, r.attempt)] += 1
    return rows


def to_sqlite(rd: RunDir, out: str | None) -> Exported:
    info, records = rd.run_info(), rd.current_records()
    db = Path(out or "qharness.sqlite")
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(db)
        try:
            with con:
                con.execute(CREATE_SQL)
                have = {row[1] for row in con.execute("PRAGMA table_info(records)")}
                if missing := [c for c in SQL_COLUMNS if c not in have]:
                    raise HarnessError(f"'{db}' has a table 'records' that is not a qharness export "
                                       f"(no column {', '.join(missing[:3])}); export to another file")
                con.execute("DELETE FROM records WHERE run_id = ?", (str(info["run_id"]),))
                marks = ", ".join("?" * len(SQL_COLUMNS))
                names = ", ".join(f'"{c}"' for c in SQL_COLUMNS)
                con.executemany(f"INSERT INTO records ({names}) VALUES ({marks})", sql_rows(info, records))
                total = con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM records").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise HarnessError(f"cannot write '{db}': {exc}") from None
    return Exported(str(db), f"{len(records)} record(s) of {info['run_id']} -> {db} (table records: {total[0]} rows, "
                             f"{total[1]} run(s))")
