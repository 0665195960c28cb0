"""Lazy registries: names map to "package.module:Object" strings, imported only when chosen, so a
missing or broken optional backend cannot break `import harness` or the CLI."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from harness.errors import HarnessError, unknown

T = TypeVar("T")


def import_object(path: str):
    """Import "package.module:Object"; a failure becomes a one-line HarnessError."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise HarnessError(f"'{path}' is not an import path of the form 'package.module:Object'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        raise HarnessError(f"cannot import '{module_name}': {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise HarnessError(f"'{module_name}' has no attribute '{attr}'") from None


class Registry(Generic[T]):
    """name -> import path. `get` also accepts a raw "module:Object" path (plugins, tests)."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries = dict(entries)
        self._loaded: dict[str, T] = {}

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or ":" in name

    def register(self, name: str, path: str) -> None:
        self._entries[name] = path
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        if name in self._loaded:
            return self._loaded[name]
        if name in self._entries:
            obj = import_object(self._entries[name])
        elif ":" in name:
            obj = import_object(name)
        else:
            raise unknown(self.kind, name, self._entries)
        self._loaded[name] = obj
        return obj
