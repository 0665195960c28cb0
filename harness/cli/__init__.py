"""The `harness` command line: main.py (run, list, report, env; the entry point), ci_commands.py
(compare, check, export), base.py (the typer app, consoles, one-line errors), run_view.py (progress
and the end-of-run table). `python -m harness.cli` runs it (__main__.py)."""
