"""TensorRT engines (the seeds' production path): ONNX export of the model's logits, then a
TensorRT engine built with INT8 (implicit, calibrated with an entropy calibrator on the
calibration windows) or FP8 (explicit: Q/DQ nodes inserted by NVIDIA ModelOpt before export)
precision, run through the TensorRT runtime.

NOT RUN IN THIS PROJECT. Written against TensorRT 10's documented Python API
(`Builder.create_network`, `OnnxParser`, `IBuilderConfig.set_flag(BuilderFlag.INT8/FP8)`,
`IInt8EntropyCalibrator2`, `build_serialized_network`, `execute_async_v3`) and ModelOpt's
`modelopt.torch.quantization.quantize(model, FP8_DEFAULT_CFG, forward_loop)`, but never
executed: TensorRT needs a CUDA GPU (none here), and it cannot be installed: PyPI's
tensorrt-cu13-libs is an sdist that downloads the real wheel from pypi.nvidia.com at build time
(tried 2026-12-02: urlopen fails, that index is not reachable), and the lent GPU machine reaches
no package registry. Its recipes' quality is measured by the `modelopt` adapter. `availability` says which of these applies; numbers from this adapter
exist only where someone ran it. Note also: implicit INT8 calibration is deprecated since
TensorRT 10.1 in favour of explicit quantization (ModelOpt Q/DQ), which is the FP8 path here.

Bytes: the serialized engine's size (weights plus kernels' tactics), not a storage walk: TensorRT
owns the memory."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from harness.adapters.base import Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig
from harness.errors import HarnessError

NOT_CARRIED = ("it cannot be installed here: on PyPI tensorrt-cu13-libs (11.4.0.106) is a 15 kB sdist whose build "
               "(wheel_stub) downloads the real wheel from NVIDIA's own index (pypi.nvidia.com), which this network "
               "does not reach, and the lent GPU machine reaches no package registry at all; this adapter is written "
               "against TensorRT's documented API and has not been run here. TensorRT's quantization recipes are "
               "measured through the modelopt adapter instead (quality in simulation, no engine speed)")


class TensorRTVariant(VariantConfig):
    precision: Literal["int8", "fp8"]
    calibration_batches: int = Field(8, gt=0)  # int8: calibration windows fed to the entropy calibrator
    workspace_gib: float = Field(4.0, gt=0)

    def label(self) -> str:
        return f"trt-{self.precision}"


class TensorRTModel(QuantizedModel):
    """A deserialized engine; `module` is a placeholder (TensorRT owns weights and memory)."""

    def __init__(self, engine_bytes: bytes, device: torch.device, info: dict[str, Any]):
        import tensorrt as trt

        super().__init__(torch.nn.Module(), device, info=info)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_bytes)
        self.context = self.engine.create_execution_context()
        self._size = len(engine_bytes)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.device, torch.int64).contiguous()
        self.context.set_input_shape("input_ids", tuple(ids.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device=self.device)
        self.context.set_tensor_address("input_ids", ids.data_ptr())
        self.context.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise HarnessError("tensorrt: execute_async_v3 failed")
        stream.synchronize()
        return out

    def weight_bytes(self) -> int:
        return self._size

    def linear_stats(self) -> tuple[int, int]:
        return 0, self._size  # per-layer storage is not visible inside an engine


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(_LogitsOnly(model).eval(), (example,), str(path), input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes=({0: "batch", 1: "seq"},), dynamo=True)


def _calibrator(windows: torch.Tensor, device: torch.device):
    import tensorrt as trt

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [w[None].to(device, torch.int64).contiguous() for w in windows]
            self.i = 0

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):
            if self.i >= len(self.batches):
                return None
            self.current = self.batches[self.i]
            self.i += 1
            return [self.current.data_ptr()]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache) -> None:
            return None

    return Calibrator()


def build_engine(onnx_path: Path, variant: TensorRTVariant, seq_len: int, calibration: torch.Tensor | None,
                 device: torch.device) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise HarnessError(f"tensorrt: ONNX parse failed: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(variant.workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (1, seq_len), (1, seq_len))
    config.add_optimization_profile(profile)
    if variant.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = _calibrator(calibration, device)
    else:
        config.set_flag(trt.BuilderFlag.FP8)  # the Q/DQ nodes in the ONNX graph carry the scales
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise HarnessError(f"tensorrt: building the {variant.precision} engine failed (see TensorRT's log)")
    return bytes(engine)


class TensorRTAdapter(Adapter):
    name: ClassVar[str] = "tensorrt"
    description: ClassVar[str] = "TensorRT INT8 (calibrated) / FP8 (ModelOpt Q/DQ) engines from ONNX; CUDA only, not run here"
    Variant: ClassVar[type[VariantConfig]] = TensorRTVariant
    needs_calibration: ClassVar[bool] = True
    packages: ClassVar[tuple[str, ...]] = ("tensorrt", "nvidia-modelopt", "onnx")

    def availability(self, device: str = "cpu") -> Availability:
        if importlib.util.find_spec("tensorrt") is None:
            return Availability(False, f"tensorrt is not installed; it needs a CUDA GPU, and {NOT_CARRIED}")
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            return Availability(False, f"tensorrt builds and runs engines on CUDA GPUs only (device here: {device})")
        return Availability(True)

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        assert isinstance(variant, TensorRTVariant)
        if variant.precision == "fp8":
            if importlib.util.find_spec("modelopt") is None:
                return Availability(False, "tensorrt fp8 needs nvidia-modelopt to insert FP8 Q/DQ nodes before export "
                                           "(not installed)")
            if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
                return Availability(False, "tensorrt fp8 needs compute capability >= 8.9 (Ada/Hopper)")
        return Availability(True)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        return None

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, TensorRTVariant)
        if calibration is None:
            raise HarnessError("tensorrt: needs calibration windows (the suite's calibration section)")
        device = torch.device(device)
        windows = calibration.input_ids[:variant.calibration_batches]
        model = model.to(device).eval()
        if variant.precision == "fp8":
            import modelopt.torch.quantization as mtq

            def forward_loop(m):
                for w in windows:
                    m(input_ids=w[None].to(device), use_cache=False)

            model = mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)
        with tempfile.TemporaryDirectory(prefix="qharness-trt-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(model, windows[:1].to(device), onnx_path)
            engine = build_engine(onnx_path, variant, int(windows.shape[1]), windows, device)
        import tensorrt as trt

        return TensorRTModel(engine, device, info={"kernel": f"TensorRT {trt.__version__} {variant.precision} engine",
                                                   "engine_bytes": len(engine), "validated_here": False})
