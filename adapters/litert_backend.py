"""LiteRT (TFLite's successor) INT8 of a vision model: converted by litert-torch, run by LiteRT.

    exported = torch.export.export(model, (example,)).module()
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(exported, quantizer); calibrate on the calibration split
    converted = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(converted, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export("model.tflite")                     # the flatbuffer a phone would ship

and the .tflite is run by LiteRT's interpreter (`ai_edge_litert.interpreter.Interpreter`, its
XNNPACK CPU delegate, torch's thread count). `mode: fp32` converts the float model (LiteRT's own
float baseline). Bytes: `weight_bytes` and `stored_file` are the batch-1 flatbuffer's size;
`linear_stats` counts the converted graph's int8 constants before conversion (codes + scales +
zero points).

A .tflite has fixed shapes here: converting with a dynamic batch (`dynamic_shapes=`) fails in
litert-torch 0.10.0's JAX lowering of the flatten (`aten.view` with a symbolic size: "Shapes must be
1D sequences of concrete values"), and resizing a batch-1 flatbuffer's input fails in XNNPACK
("failed to reshape"). So the quantized graph is converted once per batch size the measurements
use (batch 1 at quantize time, others on first use, ~7 s each), and classification runs in chunks
of CHUNK images, the last one padded.

**Not installable in the project's pinned environment (December 2026).** litert-torch 0.10.0 (the
only release that accepts torch 2.13: `torch<2.15`; 0.9.x need `torch<2.13`) requires
litert-converter 0.5.0, which pins xdsl 0.28.0, which requires typing-extensions<4.13, while
pydantic 2.14 (the harness's validation) requires typing-extensions>=4.16.
`pip install --dry-run -c constraints.txt litert-torch` fails with "xdsl 0.28.0 depends on
typing-extensions<4.13 and >=4.7 / The user requested (constraint) typing-extensions==4.16.0"; without
the constraints pip would downgrade pydantic to 2.11.10 and typing-extensions to 4.12.2 under every
other backend. So in the project's environment `harness env` shows the reason (`UNAVAILABLE`) and the
cell is skipped with it. ai-edge-litert (the runtime alone) installs, but without litert-torch there
is nothing to turn the PyTorch model into a .tflite. The adapter itself ran in a separate venv
(torch 2.13.0+cpu, litert-torch 0.10.0, ai-edge-litert 2.3.0, pydantic 2.11.10; December 2026):
fp32 and int8 both 98.53% on the digits test split like the float model, int8 flatbuffer 32,000
bytes (fp32 100,844), docs/VISION.md.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.adapters.pt2e import count_converted
from harness.adapters.vision_model import require_vision, weight_layer_stats
from harness.adapters.torch_static import calibrate, check_calibration_size
from harness.adapters.vision_model import VisionModel
from harness.models.vision import calibration_images, example_input

UNAVAILABLE = ("litert-torch is not installed, and cannot be beside the pinned stack: pip: 'xdsl 0.28.0 depends on "
               "typing-extensions<4.13 and >=4.7' (litert-torch 0.10.0 -> litert-converter 0.5.0 -> xdsl) vs "
               "typing-extensions 4.16.0 (pydantic 2.14 needs >=4.16); litert-torch 0.9.x need torch<2.13 (docs/VISION.md)")
QUANTIZER_MODULE = "litert_torch.quantize.pt2e_quantizer"
CONFIG_MODULE = "litert_torch.quantize.quant_config"
PT2E_MODULE = "torchao.quantization.pt2e.quantize_pt2e"


class LiteRTVariant(VariantConfig):
    mode: Literal["int8", "fp32"] = "int8"
    per_channel: bool = True
    calibration_images: int | None = Field(None, gt=0)  # int8 only: first n of the calibration split
    calibration_batch: int = Field(32, gt=0)

    def label(self) -> str:
        if self.mode == "fp32":
            return "litert-fp32"
        n = f"-cal{self.calibration_images}" if self.calibration_images else ""
        return f"litert-int8-{'pc' if self.per_channel else 'pt'}{n}"


CHUNK = 64  # classification batch of a fixed-shape flatbuffer


class LiteRTModel(VisionModel):
    """Fixed-shape .tflite flatbuffers (one per batch size, converted on first use) run by LiteRT's
    interpreter; `module` is an empty placeholder."""

    def __init__(self, convert, weights: tuple[int, int], info: dict[str, Any]):
        super().__init__(torch.nn.Module(), torch.device("cpu"), info=info)
        self.convert, self.weights = convert, weights
        self.runners: dict[int, tuple[Any, int, int]] = {}
        self.flatbuffer = self._runner(1)[3]

    def _runner(self, batch: int):
        if batch not in self.runners:
            from ai_edge_litert.interpreter import Interpreter

            flatbuffer = self.convert(batch)
            interpreter = Interpreter(model_content=flatbuffer, num_threads=torch.get_num_threads())
            interpreter.allocate_tensors()
            self.runners[batch] = (interpreter, interpreter.get_input_details()[0],
                                   interpreter.get_output_details()[0], flatbuffer)
        return self.runners[batch]

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        """One invocation; a fully integer flatbuffer (int8 input and output, as litert-torch's
        PT2E quantizer makes it) gets its input quantized and its output dequantized with the
        scale and zero point the flatbuffer declares, as an app on a phone would."""
        import numpy as np

        interpreter, inp, out, _ = self._runner(images.shape[0])
        data = images.float().contiguous().numpy()
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            limits = np.iinfo(inp["dtype"])
            data = np.clip(np.round(data / scale + zero), limits.min, limits.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], data)
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            result = (result.astype(np.float32) - zero) * scale
        return torch.from_numpy(np.array(result, dtype=np.float32))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n in self.runners or n <= CHUNK:
            return self._run(images)
        outs = []
        for i in range(0, n, CHUNK):
            chunk = images[i:i + CHUNK]
            pad = CHUNK - chunk.shape[0]
            if pad:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            outs.append(self._run(chunk)[:CHUNK - pad])
        return torch.cat(outs)

    def weight_bytes(self) -> int:
        return len(self.flatbuffer)

    def linear_stats(self) -> tuple[int, int]:
        return self.weights

    def stored_file(self) -> tuple[int, str]:
        return len(self.flatbuffer), f".tflite (LiteRT flatbuffer, {self.info['mode']})"


class LiteRTAdapter(Adapter):
    name: ClassVar[str] = "litert"
    description: ClassVar[str] = "LiteRT (TFLite) INT8: litert-torch conversion with its PT2E quantizer, run by LiteRT"
    extra: ClassVar[str | None] = None  # no extra: litert-torch cannot be installed beside torch 2.13
    Variant: ClassVar[type[VariantConfig]] = LiteRTVariant
    packages: ClassVar[tuple[str, ...]] = ("litert-torch", "ai-edge-litert")
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "LiteRT's interpreter runs on the CPU here")
        found = Availability.of_import("litert_torch", "litert-torch")
        if not found.ok:
            return Availability(False, UNAVAILABLE) if "not installed" in found.reason else found
        return Availability.of_import("ai_edge_litert.interpreter", "ai-edge-litert")

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        check_calibration_size(self.name, variant.calibration_images, shapes)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        import importlib

        import litert_torch

        assert isinstance(variant, LiteRTVariant)
        require_vision(model, "litert")
        model = model.float().eval()
        info: dict[str, Any] = {"mode": variant.mode, "kernel": "LiteRT interpreter (XNNPACK CPU delegate)",
                                "scheme": "static INT8 (PTQ, pt2e)" if variant.mode == "int8" else "float",
                                "runtime": "LiteRT"}
        kwargs: dict[str, Any] = {}
        if variant.mode == "int8":
            pt2e, lq = importlib.import_module(PT2E_MODULE), importlib.import_module(QUANTIZER_MODULE)
            quantizer = lq.PT2EQuantizer().set_global(lq.get_symmetric_quantization_config(is_per_channel=variant.per_channel))
            batch = ({0: torch.export.Dim("batch", min=1, max=4096)},)  # calibration batches of any size
            prepared = pt2e.prepare_pt2e(torch.export.export(model, (example_input(4),), dynamic_shapes=batch).module(),
                                         quantizer)
            images = calibration_images(model, variant.calibration_images)
            calibrate(prepared, images, variant.calibration_batch)
            # litert-torch takes the unfolded graph; the int8 weights it will store are counted on a
            # folded copy (codes + scales + zero points, as the pt2e adapter counts them)
            counted = count_converted(pt2e.convert_pt2e(copy.deepcopy(prepared)))
            model = pt2e.convert_pt2e(prepared, fold_quantize=False)
            weights = (counted["weights"], counted["weight_bytes"])
            kwargs["quant_config"] = importlib.import_module(CONFIG_MODULE).QuantConfig(pt2e_quantizer=quantizer)
            info["calibration"] = {"split": "calibration", "images": int(images.shape[0])}
        else:
            weights = weight_layer_stats(model)
        def convert(batch: int) -> bytes:
            edge = litert_torch.convert(model, (example_input(batch),), **kwargs)
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.tflite"
                edge.export(str(path))
                return path.read_bytes()

        qmodel = LiteRTModel(convert, weights, info)
        info.update(tflite_bytes=len(qmodel.flatbuffer),
                    converter="litert_torch.convert (one fixed-shape flatbuffer per batch size)")
        return qmodel
