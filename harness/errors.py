"""User-facing errors: one clear line, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class HarnessError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else a list of the valid choices."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if choices and len(choices) <= 12:
        return f" (choose from: {', '.join(choices)})"
    return ""


def unknown(kind: str, word: str, choices: Iterable[str]) -> HarnessError:
    return HarnessError(f"unknown {kind} '{word}'{did_you_mean(word, choices)}")
