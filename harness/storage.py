"""Count the bytes that weights really occupy in memory.

Libraries' own footprint helpers are not trusted (on a GPU run, torchao int8 and quanto int4
models both reported their fp16 size). We walk every parameter and buffer, open tensor
subclasses through `__tensor_flatten__` down to the plain tensors that hold data, and count each
underlying storage once (tied weights share one)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def module_bytes(module: torch.nn.Module) -> int:
    """All parameters and buffers of `module`, each storage counted once."""
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


def is_linear_like(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def linear_weight_stats(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> tuple[int, int]:
    """(logical weights, stored bytes without bias) over the linear layers that quantizers target.

    The output head is skipped by default: most backends leave it (often tied to the embedding)
    in float, and counting it would blur the bits-per-weight of the quantized layers."""
    n_weights = n_bytes = 0
    for name, mod in model.named_modules():
        if not is_linear_like(mod) or any(name.split(".")[-1] == s for s in skip):
            continue
        n_weights += mod.in_features * mod.out_features
        tensors = [t for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                   if n != "bias"]
        n_bytes += tensor_bytes(tensors)
    return n_weights, n_bytes
