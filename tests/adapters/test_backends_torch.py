"""torch-int8 (torch.ao quantize_dynamic) and torchao adapters: fast tests on a tiny random Llama,
slow tests on the embedded SmolLM2-135M (about a minute on 2 cores)."""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings

import pytest
import torch

from harness.adapters import get_adapter
from harness.adapters.base import LinearShape, ModelShapes
from harness.errors import HarnessError
from harness.weights.footprint import linear_weight_stats, module_bytes

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    dynamic = pytest.importorskip("torch.ao.nn.quantized.dynamic")

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")

CPU = torch.device("cpu")

TORCH_INT8 = [{"granularity": "per_tensor"}, {"granularity": "per_channel"}]
TORCHAO_CPU = [
    {"scheme": "int8_weight_only"},
    {"scheme": "int8_dynamic_act_int8_weight"},
    {"scheme": "intx_weight_only", "bits": 4, "group_size": 32},
    {"scheme": "intx_weight_only", "bits": 4},
    {"scheme": "float8_weight_only"},  # runs on CPU in torchao 0.18 (dequantize + float matmul)
]
TORCHAO_TYPES = {"int8_weight_only": "Int8Tensor", "int8_dynamic_act_int8_weight": "Int8Tensor",
                 "intx_weight_only": "IntxUnpackedToInt8Tensor", "float8_weight_only": "Float8Tensor"}
SMOL_SHAPES = ModelShapes(linears=(LinearShape("model.layers.0.self_attn.q_proj", 576, 576),
                                   LinearShape("model.layers.0.mlp.down_proj", 1536, 576),
                                   LinearShape("lm_head", 576, 49152)))


@pytest.fixture
def tiny(harness_env):
    from harness.models.zoo import load_model, resolve_model

    model, _ = load_model(resolve_model("tiny:llama"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    return model, ids, ref


def _decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "in_features")]


# --- torch-int8 (fast) ---------------------------------------------------------------------------

@pytest.mark.parametrize("params", TORCH_INT8, ids=lambda p: p["granularity"])
def test_torch_int8_uses_dynamic_quantized_linear(tiny, params) -> None:
    model, ids, ref = tiny
    n_fp, bytes_fp = linear_weight_stats(model)
    total_fp = module_bytes(model)
    adapter = get_adapter("torch-int8")
    variant = adapter.parse_variant(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the adapter silences torch.ao's own
        q = adapter.quantize(copy.deepcopy(model), variant, None, CPU)
    layers = _decoder_linears(q.module)
    assert layers and all(isinstance(m, dynamic.Linear) for _, m in layers)
    assert type(q.module.lm_head) is torch.nn.Linear  # the head stays float
    assert q.info["quantized_layers"] == len(layers)
    weight, _ = layers[0][1]._packed_params._weight_bias()
    assert weight.dtype == torch.qint8
    expected_scheme = torch.per_channel_affine if params["granularity"] == "per_channel" else torch.per_tensor_affine
    assert weight.qscheme() == expected_scheme
    n, nbytes = q.linear_stats()
    assert n == n_fp
    # int8 codes plus a little for scales / zero points / column offsets, well under fp32
    assert n <= nbytes < 1.5 * n and nbytes < bytes_fp / 2.5
    assert 8.0 < q.bits_per_weight() < 12.0
    assert q.weight_bytes() < total_fp
    logits = q.logits(ids)
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()
    assert variant.label() == {"per_tensor": "dyn-int8-pt", "per_channel": "dyn-int8-pc"}[params["granularity"]]


def test_torch_int8_is_cpu_only() -> None:
    adapter = get_adapter("torch-int8")
    avail = adapter.availability("cuda")
    assert not avail.ok and avail.reason == "torch quantize_dynamic kernels are CPU-only (fbgemm/qnnpack)"
    assert adapter.availability("cpu").ok


# --- torchao (fast) ------------------------------------------------------------------------------

@needs_torchao
@pytest.mark.parametrize("params", TORCHAO_CPU, ids=lambda p: get_adapter("torchao").parse_variant(p).label())
def test_torchao_uses_its_tensor_subclasses(tiny, params) -> None:
    model, ids, ref = tiny
    n_fp, bytes_fp = linear_weight_stats(model)
    adapter = get_adapter("torchao")
    variant = adapter.parse_variant(params)
    adapter.check(variant, _tiny_shapes(), "cpu")
    q = adapter.quantize(copy.deepcopy(model), variant, None, CPU)
    layers = _decoder_linears(q.module)
    assert layers and all(type(m.weight).__name__ == TORCHAO_TYPES[params["scheme"]] for _, m in layers)
    assert type(q.module.lm_head.weight) in (torch.Tensor, torch.nn.Parameter)
    assert type(q.module.lm_head.weight).__module__.startswith("torch")
    # the storage walk must reach the 8-bit codes inside the subclass
    leaf_dtypes = {getattr(layers[0][1].weight, name).dtype for name in layers[0][1].weight.__tensor_flatten__()[0]}
    assert leaf_dtypes & {torch.int8, torch.float8_e4m3fn}
    n, nbytes = q.linear_stats()
    assert n == n_fp and n <= nbytes < 1.5 * n and nbytes < bytes_fp / 2.5
    assert q.weight_bytes() < module_bytes(model)
    logits = q.logits(ids)
    assert torch.isfinite(logits).all()
    assert (logits - ref).abs().max() < 0.2 * ref.abs().max()


def _tiny_shapes() -> ModelShapes:
    from harness.models.zoo import model_shapes, resolve_model

    return model_shapes(resolve_model("tiny:llama"))


@needs_torchao
def test_torchao_check_rejects_what_cannot_run_here(harness_env) -> None:
    adapter = get_adapter("torchao")
    shapes = _tiny_shapes()

    def message(params: dict, shapes: ModelShapes = shapes, device: str = "cpu") -> str:
        with pytest.raises(HarnessError) as exc:
            adapter.check(adapter.parse_variant(params), shapes, device)
        text = str(exc.value)
        assert "\n" not in text
        return text

    # device limits skip the cell (variant_availability) instead of failing the whole suite
    int4 = adapter.variant_availability(adapter.parse_variant({"scheme": "int4_weight_only", "group_size": 32}), "cpu")
    assert not int4.ok and int4.reason.startswith("torchao int4_weight_only needs CUDA (and the package mslk on torchao >= 0.15)")
    fp8 = adapter.variant_availability(adapter.parse_variant({"scheme": "float8_dynamic_act_float8_weight"}), "cpu")
    assert not fp8.ok and "compute capability >= 8.9" in fp8.reason
    assert message({"scheme": "intx_weight_only", "group_size": 48}) == (
        "torchao: group_size 48 does not divide in_features 64 of model.layers.0.self_attn.q_proj (try 32 or 16)")
    assert message({"scheme": "intx_weight_only", "group_size": 128}, SMOL_SHAPES) == (
        "torchao: group_size 128 does not divide in_features 576 of model.layers.0.self_attn.q_proj (try 64 or 32)")
    # the head is not a target: a group size that only fails on lm_head passes
    adapter.check(adapter.parse_variant({"scheme": "intx_weight_only", "group_size": 64}), SMOL_SHAPES, "cpu")
    adapter.check(adapter.parse_variant({"scheme": "int8_weight_only"}), shapes, "cpu")
    with pytest.raises(ValueError):
        adapter.parse_variant({"scheme": "int8_weight_only", "group_size": 64})
    with pytest.raises(ValueError):
        adapter.parse_variant({"scheme": "intx_weight_only", "bits": 9})
    assert set(adapter.versions()) == {"torchao", "torch"}


@needs_torchao
def test_torchao_int4_really_fails_on_cpu(tiny) -> None:
    """variant_availability() skips int4 on CPU because the library itself cannot do it here."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    model, _, _ = tiny
    adapter = get_adapter("torchao")
    with pytest.raises(Exception):  # noqa: B017 - whatever torchao raises (ImportError for mslk today)
        adapter.quantize(copy.deepcopy(model), adapter.parse_variant({"scheme": "int4_weight_only", "group_size": 32}),
                         None, CPU)


# --- SmolLM2-135M (slow) -------------------------------------------------------------------------

SEQ, WINDOWS = 256, 4


@pytest.fixture(scope="module")
def smol():
    from conftest import smollm2_eval_windows
    from harness.metrics.perplexity import token_nll

    model, tokenizer, windows = smollm2_eval_windows(WINDOWS, SEQ)
    with torch.inference_mode():
        nll = token_nll(model(input_ids=windows, use_cache=False).logits.float(), windows)
    n, nbytes = linear_weight_stats(model)
    return {"model": model, "windows": windows, "ppl": math.exp(nll.mean().item()),
            "n": n, "bytes": nbytes, "total": module_bytes(model)}


def _ppl(qmodel, windows: torch.Tensor) -> float:
    from harness.metrics.perplexity import token_nll

    nll = token_nll(qmodel.logits(windows), windows)
    assert torch.isfinite(nll).all()
    return math.exp(nll.mean().item())


SMOL_VARIANTS = [
    ("torch-int8", {"granularity": "per_tensor"}, (8.0, 8.5)),
    ("torch-int8", {"granularity": "per_channel"}, (8.0, 8.5)),
    pytest.param("torchao", {"scheme": "int8_weight_only"}, (8.0, 8.5), marks=needs_torchao),
    pytest.param("torchao", {"scheme": "int8_dynamic_act_int8_weight"}, (8.0, 8.5), marks=needs_torchao),
    # on CPU torchao stores intx codes unpacked in int8: 8 bits + a scale and zero point per group
    pytest.param("torchao", {"scheme": "intx_weight_only", "bits": 4, "group_size": 64}, (8.0, 9.0),
                 marks=needs_torchao),
]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "params", "bpw_range"), SMOL_VARIANTS,
                         ids=["torch-int8-pt", "torch-int8-pc", "torchao-int8wo", "torchao-int8dq", "torchao-intx4-g64"])
def test_smollm2_cpu_variants(smol, backend, params, bpw_range) -> None:
    from harness.models.zoo import model_shapes, resolve_model

    adapter = get_adapter(backend)
    variant = adapter.parse_variant(params)
    adapter.check(variant, model_shapes(resolve_model("builtin:smollm2-135m")), "cpu")
    q = adapter.quantize(copy.deepcopy(smol["model"]), variant, None, CPU)
    n, nbytes = q.linear_stats()
    assert n == smol["n"]
    bpw = q.bits_per_weight()
    assert bpw_range[0] < bpw < bpw_range[1], bpw
    assert nbytes < smol["bytes"] / 3
    assert q.weight_bytes() < smol["total"]
    ppl = _ppl(q, smol["windows"])
    print(f"\n{backend} {variant.label()}: bpw={bpw:.4f} weight_bytes={q.weight_bytes()} "
          f"linear_bytes={nbytes} ppl={ppl:.3f} (fp32 {smol['ppl']:.3f})")
    assert math.isfinite(ppl) and ppl > 1.0
    if params.get("scheme") == "int8_weight_only":
        assert abs(ppl / smol["ppl"] - 1) < 0.03
    else:
        assert ppl < 5 * smol["ppl"]  # degraded (activation outliers, 4-bit) but not broken
