"""ONNX Runtime INT8 on a sentence encoder, through onnxruntime.quantization itself.

The float encoder is exported once to ONNX with torch's dynamo exporter (`dynamo=True`; the
TorchScript exporter traced BERT's mask logic for the example shape and gave wrong outputs on
other lengths) and cached under ~/.cache/qharness/onnx with ORT's recommended pre-processing
(`quant_pre_process`). Each cell then runs ORT's own quantizer on that file:

- `mode: dynamic`: `quantize_dynamic` (weights int8/uint8 once, activations per forward:
  DynamicQuantizeLinear + MatMulInteger); also quantizes the embedding tables (Gather).
- `mode: static`: `quantize_static` with a CalibrationDataReader over the suite's calibration
  windows (the corpus split evaluation never uses), calibrated by MinMax, Entropy or Percentile,
  written as QDQ (QuantizeLinear/DequantizeLinear pairs that ORT fuses) or QOperator (QLinear*).
- `mode: fp32`: the exported file as is (ORT's float speed, the baseline for its INT8 speed-up).

The model runs in an InferenceSession on the CPU execution provider with as many intra-op
threads as torch uses, so torch and ORT rows of one run are timed alike. Bytes are counted from
the quantized file's initializers, not asked of a library: `weight_bytes` is every initializer
(and Constant node) in the graph; `linear_stats` follows the fp32 graph's MatMul/Gemm weights
into the quantized graph by ORT's naming (`W_quantized`, `W_scale`, `W_zero_point`)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from harness.adapters.base import Adapter, Availability, CalibrationSet, QuantizedModel, VariantConfig
from harness.errors import HarnessError
from harness.models.encoders import pool, pooling_config
from harness.models.zoo import cache_root

EXPORT_FORMAT = 1  # bump when the cached export changes
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_STATIC_ONLY = {"activation_type": "quint8", "calibration_method": "minmax", "quant_format": "qdq"}
_QUANTIZED_ONLY = {"weight_type": "qint8", "per_channel": False, "reduce_range": False, "op_types": None}


class OrtVariant(VariantConfig):
    mode: Literal["fp32", "dynamic", "static"] = "dynamic"
    weight_type: Literal["qint8", "quint8"] = "qint8"
    per_channel: bool = False
    reduce_range: bool = False  # 7-bit weights: avoids int16 overflow of VPMADDUBSW on AVX2 CPUs without VNNI
    activation_type: Literal["quint8", "qint8"] = "quint8"  # static only
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # static only
    quant_format: Literal["qdq", "qoperator"] = "qdq"  # static only
    # op_types_to_quantize: None = the library's default (for static: every op it can quantize,
    # incl. the attention-mask Add and LayerNorm, which ruins BERT); e.g. [MatMul] = the linears
    op_types: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _knobs_fit_mode(self) -> OrtVariant:
        for defaults, modes in ((_STATIC_ONLY, ("static",)), (_QUANTIZED_ONLY, ("dynamic", "static"))):
            changed = [k for k, v in defaults.items() if getattr(self, k) != v]
            if changed and self.mode not in modes:
                raise ValueError(f"{', '.join(changed)} only apply to mode {' or '.join(modes)}, not mode '{self.mode}'")
        return self

    def label(self) -> str:
        if self.mode == "fp32":
            return "ort-fp32"
        parts = ["ort-dyn" if self.mode == "dynamic" else f"ort-static-{self.calibration_method}-{self.quant_format}"]
        parts.append({"qint8": "s8", "quint8": "u8"}[self.weight_type])
        if self.mode == "static" and self.activation_type != "quint8":
            parts.append("act-s8")
        parts += ["pc"] * self.per_channel + ["rr"] * self.reduce_range
        if self.op_types is not None:
            parts.append("+".join(self.op_types).lower())
        return "-".join(parts)


# --- export (cached) ----------------------------------------------------------------------------

def _fingerprint(source: Any) -> str:
    """Changes when the weights, torch (the exporter) or our export recipe change."""
    folder = Path(source.path)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".json"))
    stat = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    blob = json.dumps([source.name, str(folder), stat, torch.__version__, EXPORT_FORMAT]).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


class _LastHiddenState(torch.nn.Module):
    """The encoder with plain tensor inputs and its token states as the one output; pooling stays
    outside the graph so every variant is pooled by the same code."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def export_encoder(model: torch.nn.Module, tokenizer: Any) -> tuple[Path, dict[str, Any]]:
    """(pre-processed fp32 ONNX file, export info), exported once per model and cached."""
    source = model.qharness_source
    dest = cache_root() / "onnx" / f"{source.name.replace(':', '-').replace('/', '_')}-{_fingerprint(source)}"
    info_file = dest / "export.json"
    if not info_file.exists():
        from onnxruntime.quantization.shape_inference import quant_pre_process

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))  # same filesystem: atomic rename
        example = tokenizer(["an example sentence", "a second, somewhat longer example sentence"],
                            padding=True, return_tensors="pt")
        names = tuple(n for n in INPUTS if n in example)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            torch.onnx.export(_LastHiddenState(model.float()).eval(), (), str(tmp / "raw.onnx"),
                              kwargs={n: example[n] for n in names}, dynamo=True, input_names=list(names),
                              output_names=["last_hidden_state"], external_data=False, verbose=False,
                              dynamic_shapes={n: {0: batch, 1: seq} for n in names})
        export_s = time.perf_counter() - t0
        quant_pre_process(str(tmp / "raw.onnx"), str(tmp / "model.onnx"), skip_symbolic_shape=True)
        (tmp / "raw.onnx").unlink()
        info = {"exporter": "torch.onnx.export(dynamo=True)", "export_s": round(export_s, 1), "inputs": list(names),
                "preprocess": "onnxruntime.quantization.quant_pre_process(skip_symbolic_shape=True)"}
        (tmp / "export.json").write_text(json.dumps(info))
        if dest.exists() and not info_file.exists():
            shutil.rmtree(dest)  # a broken earlier export
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same export first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / "model.onnx", json.loads(info_file.read_text())


# --- bytes ------------------------------------------------------------------------------------

def graph_tensors(model: Any) -> dict[str, Any]:
    """name -> numpy array of every initializer and Constant node value in the graph."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def matmul_weights(path: Path) -> dict[str, int]:
    """name -> element count of the 2-D weights that MatMul/Gemm nodes of a float graph multiply by."""
    import onnx

    model = onnx.load(str(path))
    tensors = graph_tensors(model)
    return {name: int(tensors[name].size) for node in model.graph.node if node.op_type in ("MatMul", "Gemm")
            for name in node.input if name in tensors and tensors[name].ndim == 2}


def onnx_bytes(path: Path, weights: dict[str, int]) -> dict[str, Any]:
    """Bytes of a (quantized) graph's tensors: all of them, and those of the float graph's MatMul
    weights (quantized codes + scales + zero points under ORT's names, or the float tensor)."""
    import onnx

    tensors = graph_tensors(onnx.load(str(path)))
    linear = 0
    for name in weights:
        # ORT names a quantized weight W_quantized / W_scale / W_zero_point; a Gemm weight that it
        # turned into a MatMul first (quantize_dynamic of a vision model's head) is W_Transposed_...
        stem = next((s for s in (name, f"{name}_Transposed") if f"{s}_quantized" in tensors), name)
        stored = [name] if name in tensors else [f"{stem}{s}" for s in ("_quantized", "_scale", "_zero_point")]
        linear += sum(int(tensors[n].nbytes) for n in stored if n in tensors)
    dtypes: dict[str, int] = {}
    for array in tensors.values():
        dtypes[str(array.dtype)] = dtypes.get(str(array.dtype), 0) + int(array.nbytes)
    return {"total": sum(int(a.nbytes) for a in tensors.values()), "linear": linear,
            "linear_weights": sum(weights.values()), "file": path.stat().st_size, "by_dtype": dtypes}


# --- calibration ------------------------------------------------------------------------------

def calibration_reader(calibration: CalibrationSet, tokenizer: Any, inputs: list[str]):
    """The harness's calibration windows as encoder inputs, one window per batch, framed by the
    tokenizer's [CLS] ... [SEP] as a sentence would be."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader

    first = [t for t in (tokenizer.cls_token_id,) if t is not None]
    last = [t for t in (tokenizer.sep_token_id,) if t is not None]

    def feeds(window: torch.Tensor) -> dict[str, np.ndarray]:
        body = window.tolist()[: max(1, calibration.seq_len - 2)]
        ids = np.asarray([[*first, *body, *last]], dtype=np.int64)
        all_inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        return {k: all_inputs[k] for k in inputs}

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([feeds(w) for w in calibration.input_ids])

        def get_next(self):
            return next(self.items, None)

    return Reader()


# --- the model --------------------------------------------------------------------------------

class OrtEncoderModel(QuantizedModel):
    """An ONNX file run by an ONNX Runtime CPU session. `module` is an empty placeholder."""

    def __init__(self, path: Path, pooling: dict[str, Any], counted: dict[str, Any], info: dict[str, Any]):
        import onnxruntime as ort

        super().__init__(torch.nn.Module(), torch.device("cpu"), info=info)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.pooling, self.counted, self.path = pooling, counted, path
        self.info.update(intra_op_threads=options.intra_op_num_threads, providers=self.session.get_providers())

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: batch[name].cpu().numpy() for name in self.inputs}
        hidden = self.session.run(None, feeds)[0]
        return pool(torch.from_numpy(hidden), batch["attention_mask"], **self.pooling)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise HarnessError("onnxruntime: this adapter runs sentence encoders, which have no logits")

    def weight_bytes(self) -> int:
        return self.counted["total"]

    def linear_stats(self) -> tuple[int, int]:
        return self.counted["linear_weights"], self.counted["linear"]


@contextmanager
def library_chatter_to_log():
    """The quantizer prints calibration progress to stdout (the worker's progress channel) and
    logs a warning per tensor it skips on the root logger: send prints to the log, keep errors."""
    import logging
    import sys

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        root.setLevel(level)


def workdir() -> Path:
    """A per-process folder for quantized files, removed when the worker exits."""
    path = Path(tempfile.mkdtemp(prefix="qharness-ort-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class OnnxRuntimeAdapter(Adapter):
    name: ClassVar[str] = "onnxruntime"
    description: ClassVar[str] = "ONNX Runtime INT8 (quantize_dynamic / quantize_static) of a sentence encoder on CPU"
    extra: ClassVar[str | None] = "onnx"
    Variant: ClassVar[type[VariantConfig]] = OrtVariant
    needs_calibration: ClassVar[bool] = True  # used by mode static only
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx", "onnxscript")
    tasks: ClassVar[tuple[str, ...]] = ("encoder",)

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "the onnxruntime adapter runs the CPU execution provider only")
        for module, package in (("onnxruntime.quantization", "onnxruntime"), ("onnx", "onnx"), ("onnxscript", "onnxscript")):
            found = Availability.of_import(module, package, self.extra)
            if not found.ok:
                return found
        return Availability(True)

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, OrtVariant)
        from transformers import AutoTokenizer

        source = getattr(model, "qharness_source", None)
        if source is None or source.task != "encoder":
            raise HarnessError("onnxruntime: only sentence encoders are supported (e.g. builtin:minilm-l6-v2)")
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        fp32, export_info = export_encoder(model, tokenizer)
        info: dict[str, Any] = {"export": export_info, "mode": variant.mode}
        path = fp32
        if variant.mode != "fp32":
            path = workdir() / "model.int8.onnx"
            self._quantize(fp32, path, variant, calibration, tokenizer, export_info["inputs"], info)
        counted = onnx_bytes(path, matmul_weights(fp32))
        info.update(file_bytes=counted["file"], bytes_by_dtype=counted["by_dtype"],
                    kernel=f"onnxruntime CPUExecutionProvider ({variant.label()})")
        return OrtEncoderModel(path, pooling_config(model), counted, info)

    @staticmethod
    def _quantize(src: Path, dst: Path, variant: OrtVariant, calibration: CalibrationSet | None, tokenizer: Any,
                  inputs: list[str], info: dict[str, Any]) -> None:
        from onnxruntime.quantization import (
            CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
        )

        types = {"qint8": QuantType.QInt8, "quint8": QuantType.QUInt8}
        common = dict(per_channel=variant.per_channel, reduce_range=variant.reduce_range,
                      weight_type=types[variant.weight_type],
                      op_types_to_quantize=list(variant.op_types) if variant.op_types is not None else None)
        if variant.mode == "dynamic":
            with library_chatter_to_log():
                quantize_dynamic(str(src), str(dst), **common)
            info["quantizer"] = "onnxruntime.quantization.quantize_dynamic"
            return
        if calibration is None:
            raise HarnessError("onnxruntime: mode static needs calibration windows (the suite's calibration: block)")
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
        with library_chatter_to_log():
            quantize_static(str(src), str(dst), calibration_reader(calibration, tokenizer, inputs),
                            quant_format=formats[variant.quant_format], activation_type=types[variant.activation_type],
                            calibrate_method=methods[variant.calibration_method], **common)
        info.update(quantizer="onnxruntime.quantization.quantize_static", calibration=calibration.describe())
