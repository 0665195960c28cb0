"""The vision model kind (harness.models.vision), its adapters (eager static INT8 as the tutorial does it,
eager QAT, dynamic INT8, pt2e, ONNX Runtime static, ExecuTorch, LiteRT), its measurements
(classification, vision-speed, model-size), its report section, and one end-to-end run of a trimmed
vision-int8 suite. The model is trained once per session into the session's cache (~4 s)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from harness.adapters import get_adapter
from harness.errors import HarnessError

pytestmark = pytest.mark.native  # ONNX Runtime and ExecuTorch run native code in-process (tests/isolation.py)

needs = {name: pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")
         for name, module in (("ort", "onnxruntime"), ("torchao", "torchao"))}
CPU = torch.device("cpu")
FUSE = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3", "relu3"]]


@pytest.fixture(scope="module")
def digits(tiny_cache):
    """(source, float test accuracy) of builtin:digits-cnn trained into the session cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QHARNESS_CACHE", str(tiny_cache))
        from harness.models.zoo import resolve_model
        from harness.models.vision import accuracy, dataset, load_vision

        source = resolve_model("builtin:digits-cnn")
        model, _ = load_vision(source)
        yield source, accuracy(model, *dataset("test"))


def fresh(source):
    from harness.models.vision import load_vision

    return load_vision(source)[0]


def held_out_accuracy(qmodel) -> float:
    from harness.models.vision import dataset

    images, labels = dataset("test")
    return float((qmodel.classify(images).argmax(1) == labels).float().mean())


# --- the model kind ------------------------------------------------------------------------------

def test_the_model_is_trained_on_a_fixed_split_and_cached_by_its_recipe(digits) -> None:
    from pathlib import Path

    from harness.models.zoo import model_shapes
    from harness.models.vision import RECIPE, dataset, recipe_hash, split_of

    source, float_accuracy = digits
    assert float_accuracy >= 0.95, "a trained CNN gets ~98% on held-out digits"
    assert source.task == "vision" and source.meta["float_accuracy"]["test"] == pytest.approx(float_accuracy)
    assert Path(source.path).name == f"digits-cnn-{recipe_hash(RECIPE)}"
    sizes = source.meta["split_sizes"]
    assert sum(sizes.values()) == 1797 and sizes["test"] > 500 and sizes["calibration"] > 200
    # the split is by content: no image of one split appears in another
    seen = {split: {img.numpy().tobytes() for img in dataset(split)[0]} for split in sizes}
    assert not (seen["test"] & seen["train"]) and not (seen["test"] & seen["calibration"])
    assert all(split_of((img * 16).round().to(torch.uint8).numpy().tobytes(), 0) == "test" for img in dataset("test")[0][:20])
    shapes = model_shapes(source)
    assert shapes.task == "vision" and [s.name for s in shapes.linears] == ["conv1", "conv2", "conv3", "fc"]


def test_training_is_deterministic() -> None:
    from harness.models.vision import RECIPE, train

    short = {**RECIPE, "train": {**RECIPE["train"], "epochs": 1}}
    a, _ = train(short)
    b, _ = train(short)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- the seed's static INT8 example, as written ------------------------------------------------

def test_seed_static_int8_example_as_written(digits) -> None:
    """Eager static PTQ exactly as the seed (PyTorch's static-quantization tutorial) shows it."""
    from torch.ao.nn.intrinsic.quantized import ConvReLU2d
    from torch.ao.nn.quantized import DeQuantize, Linear, Quantize

    from harness.models.vision import accuracy, dataset

    source, float_accuracy = digits
    model = fresh(source)
    calibration_images, _ = dataset("calibration")

    model.eval()
    torch.ao.quantization.fuse_modules(model, FUSE, inplace=True)
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(model, inplace=True)
    with torch.no_grad():
        for i in range(0, calibration_images.shape[0], 32):
            model(calibration_images[i:i + 32])
    torch.ao.quantization.convert(model, inplace=True)

    assert all(isinstance(getattr(model, f"conv{i}"), ConvReLU2d) for i in (1, 2, 3))
    assert isinstance(model.fc, Linear) and isinstance(model.quant, Quantize) and isinstance(model.dequant, DeQuantize)
    assert model.conv1.weight().dtype == torch.qint8 and model.conv1.weight().qscheme() == torch.per_channel_affine
    assert abs(accuracy(model, *dataset("test")) - float_accuracy) <= 0.02


# --- adapters ----------------------------------------------------------------------------------

def float_model(source):
    return get_adapter("fp").quantize(fresh(source), get_adapter("fp").parse_variant({}), None, CPU)


def quantized(source, backend: str, params: dict):
    adapter = get_adapter(backend)
    assert adapter.availability("cpu").ok and "vision" in adapter.tasks
    return adapter.quantize(fresh(source), adapter.parse_variant(params), None, CPU)


def check_int8_contract(q, digits) -> None:
    """What every static INT8 vision cell must be: a VisionModel that says what it is, classifies
    like the float model (within 2 points), and stores ~8 bits per weight."""
    from harness.adapters.vision_model import VisionModel

    source, float_accuracy = digits
    reference = float_model(source)
    assert isinstance(q, VisionModel) and {"scheme", "runtime", "kernel"} <= set(q.info)
    logits = q.classify(torch.zeros(3, 1, 8, 8))
    assert logits.shape == (3, 10) and logits.dtype == torch.float32
    assert abs(held_out_accuracy(q) - float_accuracy) <= 0.02
    n_weights, n_bytes = q.linear_stats()
    assert n_weights == reference.linear_stats()[0] == 23824  # conv1-3 + fc
    assert 8.0 <= q.bits_per_weight() < 9.0  # int8 codes + per-channel scales and zero points
    assert q.weight_bytes() < 0.4 * reference.weight_bytes()
    file_bytes, form = q.stored_file()
    assert file_bytes > 0.8 * q.weight_bytes() and form


@pytest.mark.parametrize("backend,params", [
    ("torch-static", {"engine": "x86"}),
    ("torch-static", {"engine": "fbgemm", "calibration_images": 64}),
])  # ExecuTorch's int8 cell runs in the end-to-end test below (its lowering is the slowest quantizer here)
def test_static_int8_adapters_keep_accuracy_at_a_quarter_of_the_bytes(digits, backend, params) -> None:
    check_int8_contract(quantized(digits[0], backend, params), digits)


def test_eager_static_counts_packed_weights_from_the_state_dict(digits) -> None:
    source, _ = digits
    adapter = get_adapter("torch-static")
    q = adapter.quantize(fresh(source), adapter.parse_variant({}), None, CPU)
    assert q.info["quantized_modules"]["ConvReLU2d"] == 3 and q.info["calibration"]["images"] == source.meta["split_sizes"]["calibration"]
    # int8 codes + float64 scale + int64 zero point per output channel (16 + 32 + 64 + 10 channels), no bias
    assert q.linear_stats()[1] == 23824 + 16 * (16 + 32 + 64 + 10)
    # nothing float is left as a parameter: the packed weights are only reachable through the state_dict
    assert sum(p.numel() for p in q.module.parameters()) == 0 and q.weight_bytes() < 30_000


def test_qat_fine_tunes_on_the_train_split(digits) -> None:
    source, _ = digits
    adapter = get_adapter("torch-qat")
    q = adapter.quantize(fresh(source), adapter.parse_variant({"epochs": 1, "freeze_bn_epoch": 0}), None, CPU)
    training = q.info["training"]
    assert training["split"] == "train" and training["images"] == source.meta["split_sizes"]["train"]
    assert len(training["epoch_losses"]) == 1 and q.info["quantized_modules"]["ConvReLU2d"] == 3
    check_int8_contract(q, digits)
    with pytest.raises(ValueError, match="freeze_observer_epoch 0"):
        adapter.parse_variant({"freeze_observer_epoch": 0})


def test_dynamic_int8_quantizes_only_the_linear_head(digits) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    source, float_accuracy = digits
    adapter = get_adapter("torch-int8")
    q = adapter.quantize(fresh(source), adapter.parse_variant({"granularity": "per_channel"}), None, CPU)
    assert isinstance(q.module.fc, DynamicLinear) and isinstance(q.module.conv1, torch.nn.Conv2d)
    assert q.info["scheme"].startswith("dynamic") and abs(held_out_accuracy(q) - float_accuracy) <= 0.01
    assert q.bits_per_weight() > 30  # the convs, 97% of the weights, stay float32


@needs["torchao"]
def test_pt2e_counts_what_the_graph_reads_not_the_float_params_it_keeps(digits) -> None:
    q = quantized(digits[0], "pt2e", {"lower": "none"})
    check_int8_contract(q, digits)
    assert q.info["apis"]["prepare/convert"] == "torchao.quantization.pt2e.quantize_pt2e"
    assert q.info["bytes_by_dtype"]["torch.int8"] == 23824
    assert q.info["unread_tensor_bytes"] >= 4 * 23824  # the float conv/fc weights, still held by the module
    assert q.weight_bytes() == q.info["tensor_bytes_read_by_graph"] < 30_000


@needs["ort"]
def test_ort_vision_fp32_is_the_float_model_static_is_int8_and_knobs_fit_the_mode(digits) -> None:
    from pydantic import ValidationError

    source, _ = digits
    adapter = get_adapter("onnxruntime-vision")
    fp32 = adapter.quantize(fresh(source), adapter.parse_variant({"mode": "fp32"}), None, CPU)
    images = torch.rand(5, 1, 8, 8)
    assert torch.allclose(fp32.classify(images), float_model(source).classify(images), atol=1e-4)
    assert fp32.linear_stats() == (23824, 4 * 23824)
    static = quantized(source, "onnxruntime-vision", {"mode": "static", "per_channel": True})
    check_int8_contract(static, digits)
    assert static.info["quantizer"].endswith("quantize_static") and static.stored_file()[1].startswith(".onnx")
    with pytest.raises(ValidationError, match="calibration_images only applies to mode static"):
        adapter.parse_variant({"mode": "dynamic", "calibration_images": 8})


def test_adapters_refuse_what_they_cannot_do(digits, harness_env) -> None:
    from harness.models.zoo import load_model, resolve_model
    from harness.models.vision import calibration_images

    source, _ = digits
    llama, _ = load_model(resolve_model("tiny:llama"))
    static = get_adapter("torch-static")
    with pytest.raises(HarnessError, match="eager static INT8 needs a model written for it"):
        static.quantize(llama, static.parse_variant({}), None, CPU)
    with pytest.raises(HarnessError, match="calibration split has only"):
        calibration_images(fresh(source), 10_000)
    litert = get_adapter("litert")
    if importlib.util.find_spec("litert_torch") is None:
        reason = litert.availability("cpu").reason
        assert "typing-extensions<4.13" in reason and "torch<2.13" in reason


# --- measurements ------------------------------------------------------------------------------

def test_classification_pairs_each_cell_with_the_reference_on_the_same_images(digits, tmp_path) -> None:
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext
    from harness.metrics.meaning import lookup

    source, float_accuracy = digits
    measurement = get_measurement("classification")
    ref = float_model(source)
    q = float_model(source)
    with torch.no_grad():  # a damaged copy of the float model: some predictions flip
        q.module.fc.weight.add_(torch.randn(q.module.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    (tmp_path / "ref").mkdir(), (tmp_path / "q").mkdir()
    ref_values = measurement.run(CellContext(ref, None, source.name, tmp_path / "ref", is_reference=True), measurement.Params())
    assert [v.metric for v in ref_values] == ["accuracy"] and ref_values[0].value == pytest.approx(float_accuracy)
    n = source.meta["split_sizes"]["test"]
    assert ref_values[0].n == n and ref_values[0].uncertainty == pytest.approx((float_accuracy * (1 - float_accuracy) / n) ** 0.5)
    values = {v.metric: v for v in measurement.run(
        CellContext(q, None, source.name, tmp_path / "q", reference_dir=tmp_path / "ref"), measurement.Params())}
    assert set(values) == {"accuracy", "agreement", "accuracy_delta", "flip_rate", "kld_mean"}
    assert values["accuracy_delta"].value == pytest.approx(values["accuracy"].value - float_accuracy)
    assert values["accuracy_delta"].params["reference"].startswith("cell ") and "mcnemar_p" in values["flip_rate"].params
    assert values["agreement"].value < 1.0 and values["flip_rate"].value > 0 and values["kld_mean"].value > 0
    assert all(lookup(measurement.metrics, m) is not None for m in values)


def test_speed_and_size_measurements(digits, tmp_path) -> None:
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext

    source, _ = digits
    q = get_adapter("torch-static").quantize(fresh(source), get_adapter("torch-static").parse_variant({}), None, CPU)
    ctx = CellContext(q, None, source.name, tmp_path)
    speed = get_measurement("vision-speed")
    timed = {v.metric: v for v in speed.run(ctx, speed.Params(batch_sizes=(1, 8), warmup=1, repeats=5))}
    assert set(timed) == {f"{m}_b{b}" for m in ("latency_p50", "latency_p90", "throughput") for b in (1, 8)}
    assert len(timed["latency_p50_b8"].params["samples_s"]) == 5 and timed["latency_p90_b8"].value >= timed["latency_p50_b8"].value
    size = get_measurement("model-size").run(ctx, get_measurement("model-size").Params())
    assert size[0].metric == "file_bytes" and size[0].value == q.stored_file()[0] and "torch.save" in size[0].protocol


def test_planner_refuses_what_a_vision_model_cannot_do(digits, harness_env, tmp_path) -> None:
    from harness.run.planner import plan
    from harness.run.suite import load_suite

    def suite(model: str, backend: str, measurement: str, variant: str = "{}") -> str:
        path = tmp_path / f"{backend}-{measurement}.yaml"
        path.write_text(f"name: s\nmodels: [{model}]\ndevice: cpu\nreference: fp:fp32\nbackends:\n"
                        f"  - {{name: fp}}\n  - {{name: {backend}, variants: [{variant}]}}\n"
                        f"measurements:\n  - {{name: {measurement}}}\n")
        return str(path)

    with pytest.raises(HarnessError, match="measurement 'perplexity' does not apply to vision model"):
        plan(load_suite(suite("builtin:digits-cnn", "torch-static", "perplexity")))
    with pytest.raises(HarnessError, match="backend 'rtn' does not support vision model"):
        plan(load_suite(suite("builtin:digits-cnn", "rtn", "classification", "{bits: 8}")))
    with pytest.raises(HarnessError, match="backend 'torch-static' does not support causal-lm"):
        plan(load_suite(suite("tiny:llama", "torch-static", "perplexity")))


# --- the suite, trimmed, end to end --------------------------------------------------------------

def test_vision_int8_suite_trimmed_end_to_end(digits, harness_env, tmp_path) -> None:
    """fp32, the edge runtime (ExecuTorch XNNPACK INT8; eager static INT8 where executorch is
    missing) and LiteRT (skipped with its reason where litert-torch is missing) through `harness run`:
    records with their meaning, the report with the vision section."""
    from harness.reports.section_vision import build
    from harness.run.runner import run_suite
    from harness.results.run_dir import load_records
    from harness.run.suite import load_suite

    suite = load_suite("vision-int8")
    spec = suite.model_dump()
    edge = importlib.util.find_spec("executorch") is not None
    int8 = {"name": "executorch", "variants": [{"mode": "int8"}]} if edge else {"name": "torch-static", "variants": [{}]}
    label = "et-xnnpack-int8-pc" if edge else "static-x86"
    spec.update(name="vision-int8-trimmed", backends=[
        {"name": "fp", "variants": [{"dtype": "float32"}]}, int8, {"name": "litert", "variants": [{"mode": "int8"}]},
    ], measurements=[{"name": "classification"}, {"name": "vision-speed", "batch_sizes": [1, 16], "warmup": 2, "repeats": 10},
                     {"name": "model-size"}])
    result = run_suite(type(suite).model_validate(spec), out=tmp_path / "run")
    df = load_records(result.run_dir.path)
    status = df[df.measurement == "cell"].set_index("backend")["status"].to_dict()
    assert result.failed == 0 and status["fp"] == status[int8["name"]] == "ok"
    if importlib.util.find_spec("litert_torch") is None:
        assert status["litert"] == "skipped"
    value = lambda variant, metric: float(df[(df.variant == variant) & (df.metric == metric)].value.iloc[-1])  # noqa: E731
    assert value("fp32", "accuracy") >= 0.95 and value(label, "agreement") >= 0.98
    assert abs(value(label, "accuracy") - value("fp32", "accuracy")) <= 0.02 and 8 <= value(label, "bits_per_weight") < 9
    assert value(label, "file_bytes") < 0.4 * value("fp32", "file_bytes")
    assert value(label, "weight_bytes") < 0.4 * value("fp32", "weight_bytes")
    stamped = df[df.metric.isin(["accuracy", "latency_p50_b16", "file_bytes"])].set_index("metric")
    assert stamped.loc["file_bytes", "kind"].iloc[0] == "size" and stamped.loc["accuracy", "direction"].iloc[0] == 1
    assert (result.run_dir.path / "report.html").exists()
    section = build(df, {})
    assert section is not None and len(section.tables[0].rows) == 2
