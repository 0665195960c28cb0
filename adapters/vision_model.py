"""What every vision adapter hands the measurements: a `VisionModel`, a QuantizedModel that
classifies images (`classify`) and counts its bytes from what is stored.

Bytes, three ways, none of them "parameters x bits":
- `weight_bytes()` (the cell's footprint): every tensor of the model's state_dict, each storage
  once, at the dtype it is stored in. A quantized tensor counts its int8 codes plus its
  quantization parameters as torch stores them (per channel: float64 scales + int64 zero points;
  per tensor: one double + one int64). Eager quantized convs keep their weights in packed params
  that are neither parameters nor buffers: the state_dict unpacks them, so they are counted.
- `linear_stats()` (bits per weight): the weights of the conv and linear layers (logical count)
  and the bytes their stored weights take (codes + scales + zero points; bias excluded).
- `stored_file()`: the model as its runtime stores it (bytes, format): `torch.save(state_dict)`
  here; the ONNX, pt2e, ExecuTorch and LiteRT models override it with the file they run.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import torch

from harness.adapters.base import QuantizedModel
from harness.errors import HarnessError

_QSCHEMES_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


def stored_tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor takes as stored: a quantized tensor's integer codes plus its quantization
    parameters at the dtypes torch keeps them; any other tensor's elements."""
    if not t.is_quantized:
        return t.numel() * t.element_size()
    codes = t.numel() * t.element_size()  # qint8 / quint8: one byte each
    if t.qscheme() in _QSCHEMES_PER_CHANNEL:
        scales, zeros = t.q_per_channel_scales(), t.q_per_channel_zero_points()
        return codes + scales.numel() * scales.element_size() + zeros.numel() * zeros.element_size()
    return codes + 8 + 8  # one double scale, one int64 zero point


def _walk(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _walk(v)


def state_dict_bytes(state: dict[str, Any]) -> int:
    """Bytes of every tensor in a state_dict (tensors inside tuples too: dynamic Linear's packed
    params), each storage once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for value in state.values():
        for t in _walk(value):
            key = (t.data_ptr(), t.numel()) if not t.is_quantized else (id(t), t.numel())
            if key in seen:
                continue
            seen.add(key)
            total += stored_tensor_bytes(t)
    return total


def layer_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weight of a conv or linear layer, float or quantized (eager quantized modules expose it
    through a method that unpacks their packed params); None for anything else."""
    kind = type(module).__name__
    if isinstance(module, torch.nn.Sequential) or not any(k in kind for k in ("Conv", "Linear")):
        return None
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    return weight if isinstance(weight, torch.Tensor) else None


def weight_layer_stats(module: torch.nn.Module) -> tuple[int, int]:
    """(logical weights, stored bytes) of the conv and linear layers, bias excluded."""
    n_weights = n_bytes = 0
    for m in module.modules():
        w = layer_weight(m)
        if w is not None:
            n_weights += w.numel()
            n_bytes += stored_tensor_bytes(w)
    return n_weights, n_bytes


class VisionModel(QuantizedModel):
    """An image classifier run by torch: `classify(images)` -> float32 logits (N, classes)."""

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images.to(self.device, self._input_dtype())).float()

    def _input_dtype(self) -> torch.dtype:
        """The float dtype of the model's weights (fp: bf16/fp16 variants); float32 for quantized
        models, whose QuantStub takes float32."""
        floats = (p.dtype for p in self.module.parameters() if p.is_floating_point())
        return next(floats, torch.float32)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise HarnessError("vision models classify images; they have no token logits")

    def weight_bytes(self) -> int:
        return state_dict_bytes(self.module.state_dict())

    def linear_stats(self) -> tuple[int, int]:
        return weight_layer_stats(self.module)

    def stored_file(self) -> tuple[int, str]:
        """(bytes, format) of the model as its runtime stores it."""
        return len(torch_save_bytes(self.module.state_dict())), "torch.save(state_dict)"


def _whichmodule_skipping_broken(obj: Any, name: str) -> str:
    """pickle.whichmodule, but a module whose attribute lookup raises anything (transformers'
    lazy modules import optional libraries on lookup: "No module named 'torchvision'") is
    skipped instead of failing the save."""
    module_name = getattr(obj, "__module__", None)
    if module_name is not None:
        return module_name
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name in ("__main__", "__mp_main__"):
            continue
        try:
            found = module
            for part in name.split("."):
                found = getattr(found, part)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
        if found is obj:
            return module_name
    return "__main__"


def torch_save_bytes(obj: Any) -> bytes:
    """What torch.save(obj) writes, byte for byte. The C pickler looks up the module of objects
    that do not name theirs (quantization schemes, e.g. torch.per_channel_affine) by scanning
    sys.modules, and in a worker that scan reaches transformers' lazy modules, whose lookups can
    raise (seen: every eager quantized cell failed with "No module named 'torchvision'"). So the
    pure-Python pickler writes the same opcodes with a scan that skips such modules."""
    import pickle
    import types

    buffer = io.BytesIO()
    original = pickle.whichmodule
    pickle.whichmodule = _whichmodule_skipping_broken
    try:
        torch.save(obj, buffer, pickle_module=types.SimpleNamespace(
            __name__="pickle", Pickler=pickle._Pickler, dump=pickle.dump))
    finally:
        pickle.whichmodule = original
    return buffer.getvalue()


def require_vision(model: torch.nn.Module, backend: str, hint: str = "") -> None:
    """One line when a vision-only backend is handed another kind of model (the planner refuses it
    first by the adapter's `tasks`; this guards direct calls)."""
    if getattr(getattr(model, "qharness_source", None), "task", None) != "vision":
        raise HarnessError(f"{backend}: only vision models are wired here (e.g. builtin:digits-cnn){hint}")


def as_vision_model(qmodel: QuantizedModel) -> QuantizedModel:
    """The same model as a VisionModel when it is an image classifier (adapters shared with other
    kinds, e.g. fp and torch-int8, call this), else unchanged."""
    source = getattr(qmodel.module, "qharness_source", None)
    if getattr(source, "task", None) != "vision" or isinstance(qmodel, VisionModel):
        return qmodel
    info = {"scheme": "float", "runtime": "torch eager", **qmodel.info}
    return VisionModel(qmodel.module, qmodel.device, info=info, generate_kwargs=qmodel.generate_kwargs)
