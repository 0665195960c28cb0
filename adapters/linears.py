"""The one place that finds a model's quantizable linear layers and swaps them: every weight-only
backend that replaces nn.Linear modules (rtn, bnb, hqq, mixed precision) and the measurements that
put quantized layers in place one at a time (sensitivity) use it, so "which layers count" (every
nn.Linear except the output head, which the backends keep in float like llama.cpp and GPTQ do) is
decided once."""

from __future__ import annotations

from typing import Callable

import torch

KEEP_FLOAT: tuple[str, ...] = ("lm_head",)  # module names (last part) left in float


def linear_names(model: torch.nn.Module, skip: tuple[str, ...] = KEEP_FLOAT) -> list[str]:
    """Dotted names of the nn.Linear modules to quantize, in model order."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] not in skip]


def replace_module(model: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Put `new` at dotted `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def replace_linears(model: torch.nn.Module, make: Callable[[str, torch.nn.Linear], torch.nn.Module],
                    names: list[str] | None = None) -> list[str]:
    """Replace each quantizable linear (or each of `names`) by make(name, linear), one at a time so a
    float layer can be freed as soon as its replacement exists; returns the names replaced."""
    names = linear_names(model) if names is None else names
    for name in names:
        replace_module(model, name, make(name, model.get_submodule(name)))
    return names
