"""Suites: YAML files that say which models, backend variants and measurements to run.

Validated with pydantic. Unknown keys and bad values are errors that name the key and suggest
the right one; variant and measurement parameters are validated against the schema their adapter
or measurement declares, so a typo is caught before any model is loaded."""

from __future__ import annotations

import hashlib
import json
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import HarnessError, did_you_mean, unknown
from harness.ci.gates import GateSpec
from harness.results.records import CellIdentity


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendSpec(_Strict):
    name: str
    variants: list[dict[str, Any]] = Field(default_factory=lambda: [{}])
    timeout_s: float | None = Field(None, gt=0, description="per cell; overrides the suite's")
    gpus: int = Field(1, ge=1, description="GPUs each cell of this backend needs on one node (cuda only)")
    calibration: CalibrationSpec | None = Field(None, description="overrides the suite's calibration for this backend's cells")


class MeasurementSpec(BaseModel):
    """`name` plus the measurement's own parameters (validated against its Params schema)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CalibrationSpec(_Strict):
    corpus: str = "boolq-wiki"
    n_samples: int = Field(16, gt=0)
    seq_len: int = Field(512, gt=1)
    seed: int = 0


class Suite(_Strict):
    name: str
    description: str = ""
    models: list[str] = Field(min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = Field(1800, gt=0, description="per cell")
    hardware: str | None = Field(None, description="hardware profile the cells must run on (Ray: nodes labelled hw:<profile>)")
    reference: str | None = Field(None, description="'backend:variant-label' of the reference cell")
    backends: list[BackendSpec] = Field(min_length=1)
    measurements: list[MeasurementSpec] = Field(default_factory=list)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    gates: list[GateSpec] = Field(default_factory=list)


# -- loading ---------------------------------------------------------------------------------


def builtin_suites() -> dict[str, Path]:
    folder = resources.files("harness.suites")
    return {p.name[:-5]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the pydantic model found by walking `loc` from `model` (for suggestions)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return []
            current = field.annotation
        while typing.get_origin(current) in (list, typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0] if args else None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _loc_str(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def explain_validation(exc: ValidationError, model: type[BaseModel], where: str) -> HarnessError:
    """One line for the first problem: the key, what is wrong, and a suggestion."""
    # a misspelt key shows up as both "unknown" and "missing": the unknown one explains it
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    key = _loc_str(loc)
    if err["type"] == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))
        msg = f"{where}: unknown key '{key}'{hint}"
    elif err["type"] == "missing":
        msg = f"{where}: missing required key '{key}'"
    else:
        msg = f"{where}: bad value for '{key}': {err['msg']} (got {err.get('input')!r})"
    more = len(exc.errors()) - 1
    return HarnessError(msg + (f" (+{more} more problem{'s' * (more > 1)})" if more else ""))


def load_suite(name_or_path: str) -> Suite:
    """A suite by built-in name or YAML path."""
    builtins = builtin_suites()
    path = Path(name_or_path).expanduser()
    if name_or_path in builtins:
        path = builtins[name_or_path]
    elif not path.is_file():
        if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
            raise HarnessError(f"suite file '{name_or_path}' does not exist")
        raise unknown("suite", name_or_path, builtins)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HarnessError(f"suite '{path}': malformed YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"cannot read suite '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise HarnessError(f"suite '{path}': expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        raise explain_validation(exc, Suite, f"suite '{path.name}'") from None


# -- expansion into cells ----------------------------------------------------------------------


class CellSpec(CellIdentity):
    """Everything a worker process needs to run one cell (model x backend variant): the cell's
    identity as records carry it (harness.results.records.CellIdentity), plus how to run it."""

    measurements: list[dict[str, Any]]
    calibration: dict[str, Any] | None = None
    timeout_s: float
    gpus: int = 1  # on one node; > 1 spreads the model over them (cuda only)
    hardware: str | None = None  # the suite's pinned hardware profile, if any
    reference_cell_id: str | None = None  # the same model's reference cell (runs first), for paired metrics
    reference: dict[str, Any] | None = None  # {"backend", "variant_params"} of it, to rebuild it live


def cell_id_for(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
