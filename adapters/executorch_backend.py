"""ExecuTorch with the XNNPACK delegate, INT8 through the PT2E XNNPACKQuantizer: the edge path.

    exported = torch.export.export(model, (example,), dynamic_shapes=...).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer); calibrate on the calibration split
    converted = convert_pt2e(prepared)
    program = to_edge_transform_and_lower(torch.export.export(converted, ...),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    program.buffer                                    # the .pte file a phone would ship

and the .pte is run by ExecuTorch's own runtime (`executorch.runtime.Runtime`: the C++ runtime
behind pybind, XNNPACK kernels), not by torch. `mode: fp32` lowers the float model to XNNPACK
the same way, without quantizing (the edge runtime's own float baseline).

Weights int8 symmetric per output channel, activations int8 per tensor (asymmetric), calibrated
on the model's calibration split. Bytes: `weight_bytes` and `stored_file` are the .pte buffer's
size (the delegate packs the int8 weights into its own blob inside it: the file is what is
stored); `linear_stats` counts the int8 constants of the converted graph before lowering
(codes + scales + zero points, as pt2e's adapter does), which is what the delegate packs.
The batch dimension is dynamic (1..MAX_BATCH), so batch 1 and larger batches run one program. Its
upper bound is taken from the export example (`HintBasedSymShapeEvalPass`, example batch =
MAX_BATCH): executorch 1.5.1's default `ConstraintBasedSymShapeEvalPass` planned the input for 15
images whatever the declared maximum (seen with torch 2.13: "Attempted to resize a bounded tensor
with a maximum capacity of 960 elements")."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import (Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig,
                                   all_available)
from harness.adapters.vision_model import require_vision, weight_layer_stats
from harness.adapters.pt2e import PT2E_MODULE, count_converted
from harness.adapters.torch_static import calibrate, check_calibration_size
from harness.adapters.vision_model import VisionModel
from harness.models.vision import calibration_images, example_input

QUANTIZER_MODULE = "executorch.backends.xnnpack.quantizer.xnnpack_quantizer"
PARTITIONER_MODULE = "executorch.backends.xnnpack.partition.xnnpack_partitioner"
MAX_BATCH = 256  # the program's input capacity; larger batches run in chunks of this size


class ExecuTorchVariant(VariantConfig):
    mode: Literal["int8", "fp32"] = "int8"
    per_channel: bool = True
    calibration_images: int | None = Field(None, gt=0)  # int8 only: first n of the calibration split
    calibration_batch: int = Field(32, gt=0)

    def label(self) -> str:
        if self.mode == "fp32":
            return "et-xnnpack-fp32"
        n = f"-cal{self.calibration_images}" if self.calibration_images else ""
        return f"et-xnnpack-int8-{'pc' if self.per_channel else 'pt'}{n}"


def _dynamic_batch():
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


class ExecuTorchModel(VisionModel):
    """A .pte program run by ExecuTorch's runtime; `module` is an empty placeholder."""

    def __init__(self, buffer: bytes, weights: tuple[int, int], info: dict[str, Any]):
        from executorch.runtime import Runtime

        super().__init__(torch.nn.Module(), torch.device("cpu"), info=info)
        self.buffer, self.weights = buffer, weights
        self.program = Runtime.get().load_program(buffer)
        self.method = self.program.load_method("forward")

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        chunks = [images[i:i + MAX_BATCH].float().contiguous() for i in range(0, images.shape[0], MAX_BATCH)]
        return torch.cat([self.method.execute([chunk])[0].float() for chunk in chunks])

    def weight_bytes(self) -> int:
        return len(self.buffer)

    def linear_stats(self) -> tuple[int, int]:
        return self.weights

    def stored_file(self) -> tuple[int, str]:
        return len(self.buffer), f".pte (ExecuTorch program, XNNPACK delegate, {self.info['mode']})"


class ExecuTorchAdapter(Adapter):
    name: ClassVar[str] = "executorch"
    description: ClassVar[str] = "ExecuTorch XNNPACK delegate: INT8 through the PT2E XNNPACKQuantizer, ExecuTorch runtime"
    extra: ClassVar[str | None] = "edge"
    Variant: ClassVar[type[VariantConfig]] = ExecuTorchVariant
    packages: ClassVar[tuple[str, ...]] = ("executorch", "torchao")
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "ExecuTorch's XNNPACK delegate runs on the CPU")
        return all_available((("executorch.runtime", "executorch"), (QUANTIZER_MODULE, "executorch"),
                              (PT2E_MODULE, "torchao")), self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        check_calibration_size(self.name, variant.calibration_images, shapes)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        import importlib

        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes.sym_shape_eval_pass import HintBasedSymShapeEvalPass

        assert isinstance(variant, ExecuTorchVariant)
        require_vision(model, "executorch")
        example = example_input(MAX_BATCH)
        model = model.float().eval()
        info: dict[str, Any] = {"mode": variant.mode, "kernel": "ExecuTorch runtime, XNNPACK delegate",
                                "scheme": "static INT8 (PTQ, pt2e)" if variant.mode == "int8" else "float",
                                "runtime": "ExecuTorch (XNNPACK)"}
        if variant.mode == "int8":
            pt2e, xq = importlib.import_module(PT2E_MODULE), importlib.import_module(QUANTIZER_MODULE)
            exported = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch()).module()
            quantizer = xq.XNNPACKQuantizer().set_global(xq.get_symmetric_quantization_config(is_per_channel=variant.per_channel))
            prepared = pt2e.prepare_pt2e(exported, quantizer)
            images = calibration_images(model, variant.calibration_images)
            calibrate(prepared, images, variant.calibration_batch)
            model = pt2e.convert_pt2e(prepared)
            counted = count_converted(model)
            weights = (counted["weights"], counted["weight_bytes"])
            info.update(quantizer=f"{QUANTIZER_MODULE}.XNNPACKQuantizer(get_symmetric_quantization_config("
                                  f"is_per_channel={variant.per_channel}))",
                        calibration={"split": "calibration", "images": int(images.shape[0])})
        else:
            weights = weight_layer_stats(model)
        partitioner = importlib.import_module(PARTITIONER_MODULE).XnnpackPartitioner()
        program = torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())
        edge = to_edge_transform_and_lower(program, partitioner=[partitioner])
        executorch_program = edge.to_executorch(ExecutorchBackendConfig(sym_shape_eval_pass=HintBasedSymShapeEvalPass()))
        buffer = bytes(executorch_program.buffer)
        info.update(pte_bytes=len(buffer), lowering="to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])")
        return ExecuTorchModel(buffer, weights, info)
