"""ONNX Runtime INT8 of a vision model, through onnxruntime.quantization itself.

The float CNN is exported once (`torch.onnx.export(dynamo=True)`, batch a dynamic dimension) and
pre-processed by ORT's `quant_pre_process` (which folds each BatchNorm into its Conv), cached
under ~/.cache/qharness/onnx/<model>-<fingerprint>. Then, per cell:

- `mode: static`: `quantize_static` with a `CalibrationDataReader` over the model's calibration
  split (harness.models.vision; never trained on, never scored), MinMax / Entropy / Percentile, QDQ
  (QuantizeLinear/DequantizeLinear pairs that ORT fuses into QLinearConv at session load) or
  QOperator; weights int8 (per channel with `per_channel: true`), activations uint8 by default;
- `mode: dynamic`: `quantize_dynamic` (ConvInteger / MatMulInteger, activations per call);
- `mode: fp32`: the exported file itself (ORT's float speed).

The knobs are the encoder adapter's (`adapters/onnxruntime_backend.py`, `OrtVariant`), plus
`calibration_images`. The session is the CPU execution provider with torch's thread count.
Bytes: `weight_bytes` is every initializer and Constant of the graph that runs, `linear_stats`
follows the float graph's Conv / Gemm / MatMul weights into the quantized graph by ORT's names
(`W_quantized`, `W_scale`, `W_zero_point`), `stored_file` is the .onnx file's size."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from harness.adapters.base import (Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig,
                                   all_available)
from harness.adapters.vision_model import require_vision
from harness.adapters.onnxruntime_backend import OrtVariant, graph_tensors, library_chatter_to_log, onnx_bytes, workdir
from harness.adapters.torch_static import check_calibration_size
from harness.adapters.vision_model import VisionModel
from harness.models.vision import calibration_images, example_input
from harness.models.zoo import cache_root

EXPORT_FORMAT = 1  # bump when the cached export changes
INPUT = "images"


class OrtVisionVariant(OrtVariant):
    calibration_images: int | None = Field(None, gt=0)  # static only: first n of the calibration split

    @model_validator(mode="after")
    def _calibration_is_static(self) -> OrtVisionVariant:
        if self.calibration_images is not None and self.mode != "static":
            raise ValueError(f"calibration_images only applies to mode static, not mode '{self.mode}'")
        return self

    def label(self) -> str:
        n = f"-cal{self.calibration_images}" if self.calibration_images else ""
        return super().label() + n


def export_vision(model: torch.nn.Module) -> Path:
    """The pre-processed fp32 ONNX file of a vision model, exported once and cached."""
    source = model.qharness_source
    key = json.dumps([source.meta.get("recipe_hash"), torch.__version__, EXPORT_FORMAT])
    dest = cache_root() / "onnx" / f"{source.name.replace(':', '-')}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if not (dest / "export.json").exists():
        from onnxruntime.quantization.shape_inference import quant_pre_process

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            torch.onnx.export(model.float().eval(), (example_input(4),), str(tmp / "raw.onnx"), dynamo=True,
                              input_names=[INPUT], output_names=["logits"], external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        export_s = time.perf_counter() - t0
        quant_pre_process(str(tmp / "raw.onnx"), str(tmp / "model.onnx"), skip_symbolic_shape=True)
        (tmp / "raw.onnx").unlink()
        (tmp / "export.json").write_text(json.dumps({
            "exporter": "torch.onnx.export(dynamo=True)", "export_s": round(export_s, 1),
            "preprocess": "onnxruntime.quantization.quant_pre_process(skip_symbolic_shape=True)"}))
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)  # a broken earlier export
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same export first
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "model.onnx"


def weight_inputs(path: Path) -> dict[str, int]:
    """name -> element count of the weights Conv / Gemm / MatMul nodes of a float graph read."""
    import onnx

    model = onnx.load(str(path))
    tensors = graph_tensors(model)
    return {node.input[1]: int(tensors[node.input[1]].size) for node in model.graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in tensors}


def calibration_reader(images: torch.Tensor, batch: int = 32):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{INPUT: images[i:i + batch].numpy()} for i in range(0, images.shape[0], batch)])

        def get_next(self):
            return next(self.items, None)

    return Reader()


class OrtVisionModel(VisionModel):
    """An ONNX file run by an ONNX Runtime CPU session; `module` is an empty placeholder."""

    def __init__(self, path: Path, counted: dict[str, Any], info: dict[str, Any]):
        import onnxruntime as ort

        super().__init__(torch.nn.Module(), torch.device("cpu"), info=info)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.path, self.counted = path, counted
        self.info.update(intra_op_threads=options.intra_op_num_threads, providers=self.session.get_providers())

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT: images.float().numpy()})[0])

    def weight_bytes(self) -> int:
        return self.counted["total"]

    def linear_stats(self) -> tuple[int, int]:
        return self.counted["linear_weights"], self.counted["linear"]

    def stored_file(self) -> tuple[int, str]:
        return self.path.stat().st_size, f".onnx file ({self.info['mode']})"


class OrtVisionAdapter(Adapter):
    name: ClassVar[str] = "onnxruntime-vision"
    description: ClassVar[str] = "ONNX Runtime INT8 (quantize_static QDQ / quantize_dynamic) of a vision model on CPU"
    extra: ClassVar[str | None] = "onnx"
    Variant: ClassVar[type[VariantConfig]] = OrtVisionVariant
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx", "onnxscript")
    tasks: ClassVar[tuple[str, ...]] = ("vision",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "this adapter runs ONNX Runtime's CPU execution provider only")
        return all_available((("onnxruntime.quantization", "onnxruntime"), ("onnx", "onnx"), ("onnxscript", "onnxscript")),
                             self.extra)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        check_calibration_size(self.name, variant.calibration_images, shapes)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:

        assert isinstance(variant, OrtVisionVariant)
        require_vision(model, "onnxruntime-vision", "; sentence encoders run on the onnxruntime adapter")
        fp32 = export_vision(model)
        scheme = {"fp32": "float", "static": "static INT8 (PTQ)", "dynamic": "dynamic INT8"}[variant.mode]
        info: dict[str, Any] = {"export": json.loads((fp32.parent / "export.json").read_text()), "mode": variant.mode,
                                "scheme": scheme, "runtime": "ONNX Runtime (CPU EP)"}
        path = fp32
        if variant.mode != "fp32":
            path = workdir() / "model.int8.onnx"
            self._quantize(model, fp32, path, variant, info)
        counted = onnx_bytes(path, weight_inputs(fp32))
        info.update(file_bytes=counted["file"], bytes_by_dtype=counted["by_dtype"],
                    kernel=f"onnxruntime CPUExecutionProvider ({variant.label()})")
        return OrtVisionModel(path, counted, info)

    @staticmethod
    def _quantize(model: torch.nn.Module, src: Path, dst: Path, variant: OrtVisionVariant, info: dict[str, Any]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        common = dict(per_channel=variant.per_channel, reduce_range=variant.reduce_range,
                      weight_type=types[variant.weight_type],
                      op_types_to_quantize=list(variant.op_types) if variant.op_types is not None else None)
        if variant.mode == "dynamic":
            with library_chatter_to_log():
                quantize_dynamic(str(src), str(dst), **common)
            info["quantizer"] = "onnxruntime.quantization.quantize_dynamic"
            return
        images = calibration_images(model, variant.calibration_images)
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
        with library_chatter_to_log():
            quantize_static(str(src), str(dst), calibration_reader(images), quant_format=formats[variant.quant_format],
                            activation_type=types[variant.activation_type],
                            calibrate_method=methods[variant.calibration_method], **common)
        info.update(quantizer="onnxruntime.quantization.quantize_static",
                    calibration={"split": "calibration", "images": int(images.shape[0])})
