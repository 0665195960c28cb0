"""Planning and running a suite: suite.py (the YAML, validated), planner.py (cells), runner.py
(a run from plan to report), executor.py (a process per cell, warm workers), ray_executor.py,
worker.py (one cell in its own process), gpu_placement.py (which GPU a cell gets)."""
