"""Count the bytes that weights really occupy in memory.

Libraries' own footprint helpers are not trusted (on a GPU run, torchao int8 and quanto int4
models both reported their fp16 size). We walk every parameter and buffer, open tensor
subclasses through `__tensor_flatten__` down to the plain tensors that hold data, and count each
underlying storage once (tied weights share one)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch


def _leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner)
        return
    yield t


def tensor_bytes(tensors: Iterable[torch.Tensor], seen: set | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (meta tensors count as their size)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        for leaf in _leaf_tensors(t):
            if leaf.device.type == "meta":
                total += leaf.numel() * leaf.element_size()
                continue
            key = (leaf.device.type, leaf.untyped_storage().data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += leaf.untyped_storage().nbytes()
    return total


ExtraTensors = Callable[[torch.nn.Module], list[torch.Tensor]]


def _no_extra(module: torch.nn.Module) -> list[torch.Tensor]:
    return []


def _own(mod: torch.nn.Module, skip_bias: bool) -> list[torch.Tensor]:
    named = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
    return [t for n, t in named if not (skip_bias and n == "bias")]


def module_bytes(module: torch.nn.Module, extra: ExtraTensors = _no_extra) -> int:
    """All parameters and buffers of `module`, plus what `extra(submodule)` says a library keeps
    outside them (bitsandbytes' quant_state, HQQ's meta dict), each storage counted once."""
    seen: set = set()
    total = tensor_bytes(list(module.parameters()) + list(module.buffers()), seen)
    for mod in module.modules():
        total += tensor_bytes(extra(mod), seen)
    return total


def is_linear_like(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def linear_weight_stats(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",),
                        extra: ExtraTensors = _no_extra) -> tuple[int, int]:
    """(logical weights, stored bytes without bias) over the linear layers that quantizers target.

    The output head is skipped by default: most backends leave it (often tied to the embedding)
    in float, and counting it would blur the bits-per-weight of the quantized layers. A storage
    shared by several layers (e.g. a code table) counts once."""
    seen: set = set()
    n_weights = n_bytes = 0
    for name, mod in model.named_modules():
        if not is_linear_like(mod) or name.split(".")[-1] in skip:
            continue
        n_weights += mod.in_features * mod.out_features
        n_bytes += tensor_bytes(_own(mod, skip_bias=True) + extra(mod), seen)
    return n_weights, n_bytes
