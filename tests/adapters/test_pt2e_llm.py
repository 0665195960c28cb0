"""pt2e-llm (adapters/pt2e_llm.py): torch.export of a Llama decoder, X86InductorQuantizer, prepare/convert_pt2e,
the converted graph run unlowered behind a causal-LM front. Fast tests on the tiny random Llama (export, convert,
bytes from the int8 constants, logits near the float model's, what the front refuses); one slow test on the
embedded SmolLM2. The converted graph runs aten ops in float (no oneDNN kernels: `lower: none`), so these tests
run in-process; the Inductor lowering is not tested here (its compile takes minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from harness.adapters import get_adapter
from harness.adapters.base import CalibrationSet, LinearShape, ModelShapes
from harness.errors import HarnessError
from harness.weights.footprint import module_bytes

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")

CPU = torch.device("cpu")


def random_calibration(vocab: int, n: int = 4, seq: int = 32) -> CalibrationSet:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))
    return CalibrationSet("random", n, seq, 0, ids)


@pytest.fixture
def tiny(harness_env):
    """(float tiny Llama, ids, its logits, the bytes its float target linears take)."""
    from harness.adapters.linears import linear_names
    from harness.models.zoo import load_model, resolve_model

    model, _ = load_model(resolve_model("tiny:llama"))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    linears = [model.get_submodule(n) for n in linear_names(model)]
    return model, ids, ref, linears


def expected_stats(linears, float_names: tuple[str, ...] = (), names=None):
    """(weights, bytes) if each int8 linear stores int8 codes + a float32 scale and an int64 zero point per
    output channel (as torchao's convert_pt2e stores them), and each float one its float32 weight."""
    n = b = 0
    for i, lin in enumerate(linears):
        n += lin.weight.numel()
        kept = names is not None and names[i].rpartition(".")[2] in float_names
        b += lin.weight.numel() * 4 if kept else lin.weight.numel() + lin.out_features * (4 + 8)
    return n, b


def test_static_int8_exports_converts_and_counts_the_int8_constants(tiny) -> None:
    model, ids, ref, linears = tiny
    float_bytes = module_bytes(model)
    q = get_adapter("pt2e-llm").quantize(model, get_adapter("pt2e-llm").parse_variant({}), random_calibration(256), CPU)
    info = q.info
    assert info["int8_linears"] == len(linears) == 14 and info["float_linears"] == 0
    assert info["activation_quantize_ops"] > 0 and info["calibration"]["windows_used"] == 4
    assert "lm_head" in info and "tied" in info["lm_head"]
    # bits per weight: int8 codes + per-channel scale and zero point, not 32
    n_weights, n_bytes = q.linear_stats()
    assert (n_weights, n_bytes) == expected_stats(linears)
    assert 8.0 < q.bits_per_weight() < 10.0  # tiny layers (64/128 wide): 96 bits of qparams a channel weigh
    # weight bytes: what the graph reads (+ the float head, here the embedding itself: once); the float
    # linear weights the graph still holds are reported, not counted
    assert info["unread_tensor_bytes"] >= sum(lin.weight.numel() * 4 for lin in linears)
    assert q.weight_bytes() == info["tensor_bytes_read_by_graph"] < 0.5 * float_bytes
    assert info["bytes_by_dtype"]["torch.int8"] == n_weights
    # logits near the float model's, and not equal to them (it did quantize)
    logits = q.logits(ids)
    err = (logits - ref).abs().max().item()
    assert logits.shape == ref.shape and 0 < err < 0.05 * ref.abs().max().item()
    # dynamic batch and sequence, down to one token
    assert q.logits(ids[:1, :1]).shape == (1, 1, 256)
    assert q.logits(torch.randint(0, 256, (3, 41))).shape == (3, 41, 256)


def test_the_front_is_called_as_a_transformers_model_and_refuses_what_it_cannot_do(tiny) -> None:
    from harness.metrics.drift import greedy
    from harness.metrics.kvcache import kv_cache_bytes
    from harness.metrics.scoring import Head

    model, ids, ref, _ = tiny
    adapter = get_adapter("pt2e-llm")
    q = adapter.quantize(model, adapter.parse_variant({}), random_calibration(256), CPU)
    head = Head(q)
    assert head.split is not None, "the scorer splits decoder and float head, as for any transformers model"
    assert torch.allclose(head.logits(head.features(ids)), q.logits(ids))
    assert not hasattr(q.module, "generate")
    tokens, how = greedy(q, ids[:, :8], 3, None)
    assert [len(t) for t in tokens] == [3, 3] and "no KV cache" in how
    with pytest.raises(HarnessError, match="no KV cache"):
        kv_cache_bytes(q, ids[:1])
    with pytest.raises(HarnessError, match="no KV cache"):
        q.module(input_ids=ids, use_cache=True)
    with pytest.raises(HarnessError, match="attention-mask"):
        q.module(input_ids=ids, attention_mask=torch.zeros_like(ids))
    assert q.module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == ref.shape


def test_dynamic_activations_and_linears_kept_float(tiny) -> None:
    from harness.adapters.linears import linear_names

    model, ids, ref, linears = tiny
    names = linear_names(model)
    adapter = get_adapter("pt2e-llm")
    variant = adapter.parse_variant({"activations": "dynamic", "keep_float": ["down_proj"]})
    assert variant.label() == "pt2e-x86-dynamic-keep-down_proj" and not adapter.variant_needs_calibration(variant)
    q = adapter.quantize(model, variant, None, CPU)
    assert (q.info["int8_linears"], q.info["float_linears"]) == (12, 2)
    assert q.info["calibration"] is None and "is_dynamic=True" in q.info["apis"]["config"]
    assert q.linear_stats() == expected_stats(linears, ("down_proj",), names)
    err = (q.logits(ids) - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()


def test_variants_are_checked_before_any_model_loads() -> None:
    adapter = get_adapter("pt2e-llm")
    assert adapter.variant_needs_calibration(adapter.parse_variant({}))
    assert adapter.parse_variant({"calibration_windows": 8}).label() == "pt2e-x86-static-cal8"
    with pytest.raises(ValueError, match="calibration_windows only applies"):
        adapter.parse_variant({"activations": "dynamic", "calibration_windows": 8})
    shapes = ModelShapes(linears=(LinearShape("model.layers.0.mlp.down_proj", 1536, 576), LinearShape("lm_head", 576, 49152)))
    adapter.check(adapter.parse_variant({"keep_float": ["down_proj"]}), shapes, "cpu")
    with pytest.raises(HarnessError, match="keep_float lm_head names no linear"):
        adapter.check(adapter.parse_variant({"keep_float": ["lm_head"]}), shapes, "cpu")
    assert not adapter.availability("cuda").ok


def test_static_needs_calibration_windows(tiny) -> None:
    model, *_ = tiny
    adapter = get_adapter("pt2e-llm")
    with pytest.raises(HarnessError, match="need calibration windows"):
        adapter.quantize(model, adapter.parse_variant({}), None, CPU)


@pytest.mark.slow
def test_smollm2_static_int8_real_bytes_and_honest_quality() -> None:
    """Static per-tensor activations on SmolLM2: bytes of int8 constants (~8.2 bits a weight), and a perplexity
    that is worse than fp32 (activation outliers: docs/VISION.md) but a working model, not noise."""
    from harness.models.corpora import calibration_windows_at, eval_token_stream
    from harness.models.zoo import load_model, resolve_model

    model, tokenizer = load_model(resolve_model("builtin:smollm2-135m"))
    ids, starts, stream = calibration_windows_at(tokenizer, "boolq-wiki", 4, 128, 0)
    windows = eval_token_stream(tokenizer, "boolq-wiki", 2 * 256).view(2, 256)

    def ppl(qmodel) -> float:
        logits = qmodel.logits(windows[:, :-1])
        return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))

    fp32 = ppl(get_adapter("fp").quantize(model, get_adapter("fp").parse_variant({"dtype": "float32"}), None, CPU))
    adapter = get_adapter("pt2e-llm")
    q = adapter.quantize(model, adapter.parse_variant({}), CalibrationSet("boolq-wiki", 4, 128, 0, ids, starts, stream), CPU)
    assert q.info["int8_linears"] == 210 and q.info["float_linears"] == 0
    assert 8.1 < q.bits_per_weight() < 8.3  # 8 + 96 bits a channel over 576- and 1536-wide rows
    assert q.weight_bytes() < 0.45 * 134_515_008 * 4  # int8 decoder linears + the float32 embedding/head
    quantized = ppl(q)
    assert fp32 < quantized < 10 * fp32, (fp32, quantized)
