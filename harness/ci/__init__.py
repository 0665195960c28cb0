"""Judging runs in CI: compare.py (deltas against a base run), gates.py and check.py (pass/fail
rules), junit.py (JUnit XML), pytest_plugin.py (gates as pytest tests)."""
