"""PyTorch 2 export (pt2e) static INT8 with `X86InductorQuantizer`, lowered by Inductor.

    exported = torch.export.export(model, (example,), dynamic_shapes=...).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)       # conv+bn folded, observers inserted
    for images in calibration batches: prepared(images)
    converted = convert_pt2e(prepared)                  # quantize/dequantize ops around the convs
    compiled = torch.compile(converted)                 # Inductor fuses q/dq patterns into int8 oneDNN kernels

The APIs come from torchao (`torchao.quantization.pt2e`): torch 2.13 no longer ships
`torch.ao.quantization.quantize_pt2e` nor `torch.ao.quantization.quantizer` (checked: both fail to
import); which modules were used is recorded in the cell's backend info. Weights int8 per output
channel (symmetric), activations uint8 per tensor from the calibration split; `lower: inductor`
compiles with `torch._inductor.config.freezing = True`, as the x86 tutorial does (the int8 patterns
are matched on frozen weights); `lower: none` runs the converted graph as it is (reference q/dq
arithmetic in float: right numbers, no int8 speed).

**Bytes, counted honestly.** The converted GraphModule keeps tensors that its graph no longer
reads (what is left of the float parameters after conv+bn folding) next to the int8 constants it
does read. `weight_bytes` counts only the tensors the graph reads through `get_attr` (int8
weights, their per-channel scales and zero points, float biases), each storage once; the
unread bytes are reported beside it in the backend info (`unread_tensor_bytes`), never hidden.
`linear_stats` follows each conv / linear weight input back through its dequantize op to the
int8 constant and its scales and zero points. `stored_file` is the converted program re-exported
and written with `torch.export.save` (a `.pt2`): graph code and every constant it holds.

Causal LMs go through `adapters/pt2e_llm.py` (backend `pt2e-llm`): the same quantizer and this
module's counting on the exported decoder, calibrated on the suite's token windows."""

from __future__ import annotations

import io
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import (Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig,
                                   all_available)
from harness.adapters.vision_model import require_vision
from harness.adapters.torch_static import calibrate, check_calibration_size
from harness.adapters.vision_model import VisionModel, stored_tensor_bytes
from harness.models.vision import calibration_images, example_input

PT2E_MODULE = "torchao.quantization.pt2e.quantize_pt2e"
QUANTIZER_MODULE = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"
EXPORT_BATCH = 4  # example batch for torch.export (batch is a dynamic dimension, 1..MAX_BATCH)
MAX_BATCH = 4096
_WEIGHT_OPS = ("conv2d", "linear", "convolution", "conv1d", "conv3d")


class PT2EVariant(VariantConfig):
    lower: Literal["inductor", "none"] = "inductor"
    calibration_images: int | None = Field(None, gt=0)  # first n of the calibration split; None: all of it
    calibration_batch: int = Field(32, gt=0)

    def label(self) -> str:
        n = f"-cal{self.calibration_images}" if self.calibration_images else ""
        return f"pt2e-x86-{self.lower}{n}"


def graph_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """name -> tensor of every get_attr the graph reads."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                out[node.target] = value
    return out


def _all_tensors(gm: torch.nn.Module) -> list[torch.Tensor]:
    tensors = list(gm.state_dict(keep_vars=True).values())
    for mod in gm.modules():
        tensors += [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
    return tensors


def distinct_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += stored_tensor_bytes(t)
    return total


def count_converted(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """What the converted graph reads (total, by dtype), what it holds without reading, and the
    conv / linear weights (logical count, stored bytes: int8 codes + scales + zero points)."""
    read = graph_tensors(gm)
    by_dtype: dict[str, int] = {}
    for t in read.values():
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + stored_tensor_bytes(t)
    total_read = distinct_bytes(read.values())
    everything = distinct_bytes(_all_tensors(gm))
    n_weights = n_bytes = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not any(op in str(node.target) for op in _WEIGHT_OPS) or len(node.args) < 2:
            continue
        w = node.args[1]
        if getattr(w, "op", None) == "call_function" and "dequantize" in str(w.target):
            attrs = [a for a in w.args if getattr(a, "op", None) == "get_attr"]
            tensors = [read[a.target] for a in attrs if a.target in read]
            codes = next((t for t in tensors if t.dtype in (torch.int8, torch.uint8)), None)
            if codes is not None:
                n_weights += codes.numel()
                n_bytes += distinct_bytes(tensors)
        elif getattr(w, "op", None) == "get_attr" and w.target in read:
            n_weights += read[w.target].numel()
            n_bytes += stored_tensor_bytes(read[w.target])
    return {"read": total_read, "by_dtype": by_dtype, "unread": max(0, everything - total_read),
            "weights": n_weights, "weight_bytes": n_bytes}


class PT2EModel(VisionModel):
    """The converted GraphModule (`module`), run compiled (`runner`) or as it is."""

    def __init__(self, converted: torch.fx.GraphModule, runner, counted: dict[str, Any], example: torch.Tensor,
                 info: dict[str, Any]):
        super().__init__(converted, torch.device("cpu"), info=info)
        self.runner, self.counted, self.example = runner, counted, example

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.runner(images.float()).float()

    def weight_bytes(self) -> int:
        return self.counted["read"]

    def linear_stats(self) -> tuple[int, int]:
        return self.counted["weights"], self.counted["weight_bytes"]

    def stored_file(self) -> tuple[int, str]:
        program = torch.export.export(self.module, (self.example,), dynamic_shapes=_dynamic_batch())
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        return buffer.getbuffer().nbytes, "torch.export.save of the converted program (.pt2)"


def _dynamic_batch():
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


class PT2EAdapter(Adapter):
    name: ClassVar[str] = "pt2e"
    description: ClassVar[str] = "PyTorch 2 export static INT8 (torchao X86InductorQuantizer, prepare/convert_pt2e, Inductor)"
    extra: ClassVar[str | None] = "torchao"
    Variant: ClassVar[type[VariantConfig]] = PT2EVariant
    packages: ClassVar[tuple[str, ...]] = ("torchao",)
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "X86InductorQuantizer targets x86 CPUs")
        return all_available(((PT2E_MODULE, "torchao"), (QUANTIZER_MODULE, "torchao")), self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        check_calibration_size(self.name, variant.calibration_images, shapes)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        import importlib

        assert isinstance(variant, PT2EVariant)
        require_vision(model, "pt2e", " (causal LMs: backend pt2e-llm)")
        pt2e, xiq = importlib.import_module(PT2E_MODULE), importlib.import_module(QUANTIZER_MODULE)
        example = example_input(EXPORT_BATCH)
        images = calibration_images(model, variant.calibration_images)
        exported = torch.export.export(model.float().eval(), (example,), dynamic_shapes=_dynamic_batch()).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = pt2e.prepare_pt2e(exported, quantizer)
        calibrate(prepared, images, variant.calibration_batch)
        converted = pt2e.convert_pt2e(prepared)
        counted = count_converted(converted)
        runner = converted
        if variant.lower == "inductor":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            runner = torch.compile(converted, dynamic=False)
        lowered = variant.lower == "inductor"
        info = {"kernel": "Inductor-compiled int8 (oneDNN)" if lowered else "converted q/dq graph, not lowered",
                "apis": {"prepare/convert": PT2E_MODULE, "quantizer": QUANTIZER_MODULE,
                         "config": "get_default_x86_inductor_quantization_config()"},
                "scheme": "static INT8 (PTQ, pt2e)",
                "runtime": "torch Inductor" if variant.lower == "inductor" else "torch (converted graph, not lowered)",
                "lower": variant.lower, "calibration": {"split": "calibration", "images": int(images.shape[0])},
                "tensor_bytes_read_by_graph": counted["read"], "unread_tensor_bytes": counted["unread"],
                "bytes_by_dtype": counted["by_dtype"]}
        return PT2EModel(converted, runner, counted, example, info)
