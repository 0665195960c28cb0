"""What a run leaves behind: run_dir.py (the run directory: run.json, records.jsonl, cells/),
records.py (one metric value), provenance.py (versions, git sha, hardware), export/ (other tools'
formats)."""
