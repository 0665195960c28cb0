"""The HTML report (`harness report RUN`, written after every run): html.py builds one self-contained
page (plotly; templates/), compare_html.py the page of `harness compare --html`, common.py holds
shared helpers, static_figures.py the `--static` copies.

Adding a report section: one module `section_<name>.py` here with `build(df, info) -> Section | None`
(df: the run's current records, harness.results.run_dir.load_records; info: run.json; None when
the run has nothing for it), plus one line `"<name>": "harness.reports.section_<name>:build"` in
`SECTIONS` (sections.py; dict order is page order, `LEAD_SECTIONS` go above the frontier figures).
A section that raises becomes a note on the page, never a missing report. Read what metrics mean
from their declarations (harness.metrics.meaning), not from their names."""
