"""The size of a model as its runtime stores it: the bytes of the file it would ship as.

The footprint every cell records (`weight_bytes`, `bits_per_weight`) counts tensors; this counts
the artifact: `torch.save(state_dict)` for eager torch models, the `.onnx` file ONNX Runtime
loads, the `.pt2` of a pt2e model (torch.export.save), the `.pte` ExecuTorch runs, the `.tflite`
LiteRT runs. Serialisation overhead (pickle, protobuf, flatbuffer headers, graph code) is part
of it, which is why it can differ from the tensor count; both are exact (counted, not sampled).
The model says what its file is (`QuantizedModel.stored_file()`: vision models,
harness/adapters/vision_model.py)."""

from __future__ import annotations

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec


class ModelSizeParams(MeasurementParams):
    pass


class ModelSize(Measurement):
    name = "model-size"
    needs_tokenizer = False
    tasks = ("vision",)
    Params = ModelSizeParams
    metrics = (MetricSpec("file_bytes", -1, "size", exact=True),)

    def run(self, ctx: CellContext, params: ModelSizeParams) -> list[MetricValue]:
        stored = getattr(ctx.qmodel, "stored_file", None)
        if stored is None:
            raise HarnessError(f"model-size: {type(ctx.qmodel).__name__} does not say how it is stored (stored_file)")
        n_bytes, form = stored()
        return [MetricValue("file_bytes", float(n_bytes), "bytes", protocol=f"bytes of the stored model: {form}",
                            params={"format": form, "weight_bytes": ctx.qmodel.weight_bytes()})]
