"""What `harness run` prints: a live progress bar in a terminal, one line per finished cell
elsewhere (CI logs), and a final table that fits 100 columns (long reasons are cut here; the
report and records.jsonl keep them whole)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

LOG_WIDTH = 100  # columns of the final table when stdout is not a terminal
REASON_CHARS = 60  # of a failure or skip reason in the table and the failure list


def first_line(text: str | None, limit: int = REASON_CHARS) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def cell_label(cell) -> str:
    return f"{cell.backend}:{cell.variant}"


@contextmanager
def progress_events(console: Console, planning: str):
    """An `on_event(kind, data)` for harness.run.runner.run_suite that shows progress: a rich bar on a
    terminal, plain lines otherwise (a bar in a log file is noise)."""
    if console.is_terminal:
        with _bar(console, planning) as on_event:
            yield on_event
    else:
        yield _lines(console)


def _lines(console: Console) -> Callable[[str, dict], None]:
    state = {"done": 0, "total": 0}

    def on_event(kind: str, data: dict) -> None:
        if kind == "planned":
            state.update(done=data["done"], total=data["total"])
            console.print(f"run {data['run_dir']}: {data['todo']} cell(s) to run on {data['device']} "
                          f"({data['done']} already done)", highlight=False, soft_wrap=True, markup=False)
        elif kind == "cell_end":
            state["done"] += 1
            o, c = data["outcome"], data["cell"]
            why = f": {first_line(o.error, 160)}" if o.status != "ok" else ""
            reused = (o.provenance or {}).get("reused_from")
            took = f"reused from {reused['run']}" if reused else f"{o.duration_s:.1f} s"
            console.print(f"[{state['done']}/{state['total']}] {o.status} {cell_label(c)} ({took}){why}",
                          highlight=False, soft_wrap=True, markup=False)

    return on_event


@contextmanager
def _bar(console: Console, planning: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        cells_task = progress.add_task(planning, total=None)
        step_task = progress.add_task("", total=None, visible=False)

        def on_event(kind: str, data: dict) -> None:
            if kind == "planned":
                progress.update(cells_task, description=f"cells -> {data['run_dir']}", total=data["total"],
                                completed=data["done"])
            elif kind == "cell_start":
                progress.update(step_task, description=f"  {cell_label(data['cell'])}", completed=0, total=None, visible=True)
            elif kind == "progress":
                progress.update(step_task, description=f"  {data['what']}", completed=data["done"], total=data["total"])
            elif kind == "cell_end":
                o = data["outcome"]
                if o.status != "ok":
                    progress.console.print(f"[red]{o.status}[/] {cell_label(data['cell'])}: {first_line(o.error, 200)}",
                                           highlight=False, soft_wrap=True)
                progress.advance(cells_task)
                progress.update(step_task, visible=False)

        yield on_event


def _fmt(value, unc=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return f"{text}±{unc:.2g}" if unc is not None else text


# metric -> (column, formatter): short enough that a log's 100 columns keep every value whole
SUMMARY_METRICS = {
    "bits_per_weight": ("bits/w", lambda v, u: f"{v:.3g}"),
    "weight_bytes": ("MB", lambda v, u: f"{v / 1e6:,.1f}"),
    "ppl": ("ppl", _fmt),
    "accuracy": ("acc %", lambda v, u: f"{100 * v:.2f}" + (f"±{100 * u:.2g}" if u is not None else "")),  # vision
}
NARROW = {"model": 20, "cell": 24, "status": 34}  # widest a log gives these; the numbers are never cut


def summary_table(run_dir, terminal: bool) -> Table:
    """One row per cell: the cell, bits per weight, MB, perplexity or accuracy, status (reason cut).
    A metric column appears only when some cell has a value for it (a vision run has no perplexity)."""
    by_cell: dict[str, dict] = {}
    models = set()
    for r in run_dir.current_records():
        models.add(r.model)
        row = by_cell.setdefault(r.cell_id, {"model": r.model, "cell": f"{r.backend}:{r.variant}", "status": "?"})
        if r.measurement == "cell":
            row["status"] = r.status if r.status == "ok" else f"{r.status}: {first_line(r.error)}"
        elif r.metric in SUMMARY_METRICS and r.value is not None and r.measurement != "timing":
            row[r.metric] = SUMMARY_METRICS[r.metric][1](r.value, r.uncertainty)
    many = len(models) > 1
    table = Table(title=f"run {run_dir.path}" + ("" if many or not models else f" ({next(iter(models))})"))
    shown = [m for m in SUMMARY_METRICS if any(m in row for row in by_cell.values())]
    columns = (["model"] if many else []) + ["cell"] + [SUMMARY_METRICS[m][0] for m in shown] + ["status"]
    for col in columns:
        if terminal:  # a terminal may fold
            table.add_column(col, overflow="fold")
        else:  # a log keeps each row on one line
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=NARROW.get(col))
    for row in by_cell.values():
        table.add_row(*([row["model"]] if many else []), row["cell"], *(row.get(m, "-") for m in shown),
                      row["status"])
    return table


def failure_lines(run_dir) -> list[str]:
    """'backend:variant: first line of the reason' for every failed cell of the run's latest records."""
    return [f"{r.backend}:{r.variant}: {first_line(r.error, 200)}" for r in run_dir.current_records()
            if r.measurement == "cell" and r.status == "failed"]
