"""bitsandbytes, optimum-quanto and HQQ adapters: the libraries' own layers, bytes counted from
storage, one-line check() errors (fast, tiny random Llama), and perplexity on the embedded
SmolLM2-135M against fp32 on the same tokens (slow)."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from pydantic import ValidationError

from harness.adapters import get_adapter
from harness.adapters.base import CalibrationSet, LinearShape, ModelShapes
from harness.errors import HarnessError
from harness.weights.footprint import module_bytes

pytestmark = pytest.mark.native  # in-process native code: run in a child pytest (tests/isolation.py)

CPU = torch.device("cpu")
LIBS = {"bnb": "bitsandbytes", "quanto": "optimum.quanto", "hqq": "hqq.core.quantize"}


def _need(backend: str) -> None:
    pytest.importorskip(LIBS[backend])


def _layer_types(module: torch.nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in module.named_modules()
            if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def _library_types(backend: str) -> tuple[type, ...]:
    if backend == "bnb":
        import bitsandbytes as bnb

        return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    if backend == "quanto":
        from optimum.quanto.nn import QLinear

        return (QLinear,)
    from hqq.core.quantize import HQQLinear

    return (HQQLinear,)


# --- fast: tiny random Llama ---------------------------------------------------------------------

@pytest.fixture
def tiny(harness_env):
    from harness.models.zoo import load_model, resolve_model

    model, _ = load_model(resolve_model("tiny:llama"))
    return model


TINY_VARIANTS = [
    ("bnb", {"mode": "int8"}, 8),
    ("bnb", {"mode": "nf4"}, 4),
    ("bnb", {"mode": "fp4", "double_quant": True, "compute_dtype": "bfloat16"}, 4),
    ("quanto", {"weights": "int8"}, 8),
    ("quanto", {"weights": "int4"}, 4),
    ("quanto", {"weights": "int2"}, 2),
    ("quanto", {"weights": "int8", "activations": "int8", "calibration_batches": 2}, 8),
    ("hqq", {"bits": 4, "group_size": 64}, 4),
    ("hqq", {"bits": 3, "group_size": 32}, 3),
    ("hqq", {"bits": 8, "group_size": 64, "axis": 0}, 8),
]


@pytest.mark.parametrize(("backend", "params", "bits"), TINY_VARIANTS,
                         ids=[f"{b}-{'-'.join(map(str, p.values()))}" for b, p, _ in TINY_VARIANTS])
def test_tiny_quantize_uses_library_layers_and_shrinks(tiny, backend: str, params: dict, bits: int) -> None:
    _need(backend)
    adapter = get_adapter(backend)
    assert adapter.availability().ok
    versions = adapter.versions()
    assert "torch" in versions and len(versions) == 2 and all(versions.values())
    variant = adapter.parse_variant(params)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny(input_ids=ids, use_cache=False).logits.float()
    float_bytes = module_bytes(tiny)
    n_float = sum(m.weight.numel() for name, m in tiny.named_modules()
                  if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))
    calibration = CalibrationSet("random", 4, 32, 0, torch.randint(0, 256, (4, 32)))

    q = adapter.quantize(copy.deepcopy(tiny), variant, calibration, CPU)

    types = _layer_types(q.module)
    assert len(types) == 14 and all(issubclass(t, _library_types(backend)) for t in types.values()), types
    assert type(q.module.lm_head) is torch.nn.Linear  # the head stays float
    assert q.info["quantized_layers"] == 14
    n_weights, n_bytes = q.linear_stats()
    assert n_weights == n_float
    bpw = q.bits_per_weight()
    # codes plus per-row / per-group metadata; tiny layers (64-128 wide) carry relatively more of it
    assert bits <= bpw < bits + 2.5, bpw
    assert q.weight_bytes() < float_bytes - (32 - bits - 2.5) * n_float / 8
    logits = q.logits(ids)
    assert logits.shape == ref.shape and torch.isfinite(logits).all()
    assert (logits - ref).abs().max() > 0  # something really was quantized
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > (0.9 if bits == 8 else 0.3)


def _shapes(*widths: tuple[int, int]) -> ModelShapes:
    linears = [LinearShape(f"model.layers.0.mlp.l{i}", i_f, o_f) for i, (i_f, o_f) in enumerate(widths)]
    return ModelShapes(linears=tuple(linears + [LinearShape("lm_head", 100, 100)]))


def _one_line_error(adapter, params: dict, shapes: ModelShapes, match: str) -> None:
    with pytest.raises(HarnessError, match=match) as err:
        adapter.check(adapter.parse_variant(params), shapes, "cpu")
    assert "\n" not in str(err.value)


def test_check_errors_are_one_line() -> None:
    if importlib_missing := [b for b in LIBS if _spec_missing(LIBS[b])]:
        pytest.skip(f"not installed: {importlib_missing}")
    ok = _shapes((576, 192), (1536, 576))
    hqq, bnb, quanto = get_adapter("hqq"), get_adapter("bnb"), get_adapter("quanto")
    _one_line_error(hqq, {"bits": 4, "group_size": 128}, ok,
                    r"^hqq: group_size 128 does not divide in_features 576 of model\.layers\.0\.mlp\.l0 \(try 64 or 32\)$")
    _one_line_error(hqq, {"bits": 4, "group_size": 20}, ok, "multiple of 8")
    hqq.check(hqq.parse_variant({"bits": 4, "group_size": 64}), ok, "cpu")
    # the head is not a target: its width 100 never matters
    _one_line_error(bnb, {"mode": "nf4"}, _shapes((576, 192), (96, 64)), "blocksize 64 does not divide in_features 96")
    _one_line_error(bnb, {"mode": "nf4"}, _shapes((64, 48)), "out_features 48")
    bnb.check(bnb.parse_variant({"mode": "nf4"}), ok, "cpu")
    bnb.check(bnb.parse_variant({"mode": "int8"}), _shapes((96, 48)), "cpu")
    _one_line_error(quanto, {"weights": "int2"}, _shapes((3, 7)), "packs 4 weights per byte")
    quanto.check(quanto.parse_variant({"weights": "int4"}), ok, "cpu")


def _spec_missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


@pytest.mark.parametrize(("backend", "bad"), [
    ("bnb", {"mode": "int3"}),  # 3-bit cannot be asked for
    ("bnb", {"mode": "int8", "double_quant": True}),
    ("bnb", {"mode": "nf4", "threshold": 4.0}),
    ("bnb", {"mode": "nf4", "blocksize": 32}),
    ("quanto", {"weights": "int3"}),
    ("quanto", {"activations": "int4"}),
    ("hqq", {"bits": 5}),
    ("hqq", {"bits": 4, "axis": 2}),
])
def test_variant_schema_rejects(backend: str, bad: dict) -> None:
    with pytest.raises(ValidationError):
        get_adapter(backend).parse_variant(bad)


def test_labels() -> None:
    bnb, quanto, hqq = get_adapter("bnb"), get_adapter("quanto"), get_adapter("hqq")
    assert bnb.parse_variant({"mode": "int8"}).label() == "llm.int8-t6"
    assert bnb.parse_variant({"mode": "nf4"}).label() == "nf4-fp32"
    assert bnb.parse_variant({"mode": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}).label() == "nf4-dq-bf16"
    assert quanto.parse_variant({"weights": "int4"}).label() == "wint4"
    assert quanto.parse_variant({"activations": "int8"}).label() == "wint8-aint8-cal4"
    assert hqq.parse_variant({"bits": 4}).label() == "int4-g64-ax1"


@pytest.mark.parametrize(("backend", "module", "package"), [
    ("bnb", "bitsandbytes", "bitsandbytes"), ("quanto", "optimum.quanto", "optimum-quanto"),
    ("hqq", "hqq.core.quantize", "hqq"),
])
def test_missing_library_is_reported(monkeypatch, backend: str, module: str, package: str) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith(module + ".") or name == module.split(".")[0]:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    avail = get_adapter(backend).availability()
    assert not avail.ok and avail.reason == f"{package} is not installed (pip install 'qharness[{backend}]')"


# --- slow: embedded SmolLM2-135M -----------------------------------------------------------------

SEQ, WINDOWS = 256, 4


@pytest.fixture(scope="module")
def smol():
    """(fp32 model, eval windows, fp32 per-token NLL, calibration windows), loaded once."""
    from conftest import smollm2_eval_windows
    from harness.models.corpora import calibration_windows

    model, tok, windows = smollm2_eval_windows(WINDOWS, SEQ)
    cal = CalibrationSet("boolq-wiki", 4, SEQ, 0, calibration_windows(tok, "boolq-wiki", 4, SEQ, 0))
    assert not any(torch.equal(c, w) for c in cal.input_ids for w in windows)
    return model, windows, _nll(lambda ids: model(input_ids=ids, use_cache=False).logits, windows), cal


def _nll(forward, windows: torch.Tensor) -> torch.Tensor:
    from harness.metrics.perplexity import token_nll

    with torch.no_grad():
        return torch.cat([token_nll(forward(w[None]).float(), w[None]).reshape(-1) for w in windows])


def _ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


# (backend, params, expected bits per weight from the storage layout or None, max ppl ratio to fp32)
# SmolLM2 target layers have in_features 576 or 1536.
SLOW = [
    # int8 codes + one float32 absmax per output row: 8 + 32/576 .. 8 + 32/1536; LLM.int8 also
    # quantizes activations (fp16 outlier columns), so it is held to 10% rather than 3%
    ("bnb", {"mode": "int8"}, (8.02, 8.06), 1.10),
    # nf4: 4 bits + float32 absmax per 64 = 4.5 (+ a 16-entry code table per layer);
    # double quant: 8-bit absmax per 64 + float32 per 256 blocks + 256-entry table per layer ~ 4.13-4.15
    # (bitsandbytes' AVX512-BF16 CPU layout, when used, stores bf16 absmax: 4.25; see _expected_bnb)
    ("bnb", {"mode": "nf4"}, None, 1.6),
    ("bnb", {"mode": "nf4", "double_quant": True}, None, 1.6),
    ("quanto", {"weights": "int8"}, (8.02, 8.06), 1.03),
    # int4 codes + float32 scale and shift per group of 96 (576 wide) or 128 (1536 wide)
    ("quanto", {"weights": "int4"}, (4.5, 4.67), 2.0),
    ("quanto", {"weights": "int8", "activations": "int8"}, (8.02, 8.06), None),
    # codes + float32 scale and zero per group of 64: bits + 1
    ("hqq", {"bits": 4, "group_size": 64}, (4.999, 5.001), 1.6),
    ("hqq", {"bits": 8, "group_size": 64}, (8.999, 9.001), 1.03),
]


def _expected_bnb(q) -> tuple[float, float]:
    if q.info.get("cpu_packed"):
        return (4.25, 4.26)
    return (4.12, 4.16) if q.info["label"].startswith("nf4-dq") else (4.5, 4.51)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "params", "bpw_range", "max_ratio"), SLOW,
                         ids=[f"{b}-{'-'.join(map(str, p.values()))}" for b, p, _, _ in SLOW])
def test_smollm2_quality_and_bytes(smol, backend, params, bpw_range, max_ratio) -> None:
    _need(backend)
    model, windows, ref_nll, cal = smol
    adapter = get_adapter(backend)
    variant = adapter.parse_variant(params)
    float_bytes = module_bytes(model)

    q = adapter.quantize(copy.deepcopy(model), variant, cal, CPU)
    q.info["label"] = variant.label()

    assert all(issubclass(t, _library_types(backend)) for t in _layer_types(q.module).values())
    assert q.info["quantized_layers"] == 210  # 30 blocks x 7 projections; the (tied) head stays float
    bpw = q.bits_per_weight()
    lo, hi = bpw_range or _expected_bnb(q)
    assert lo <= bpw <= hi, (variant.label(), bpw)
    n_weights, n_bytes = q.linear_stats()
    assert q.weight_bytes() < float_bytes - n_weights * 4 + n_bytes + 1024 * 1024  # only the linears changed

    nll = _nll(q.logits, windows)
    ppl, ref = _ppl(nll), _ppl(ref_nll)
    print(f"\n{backend} {variant.label()}: bpw={bpw:.4f} weight_bytes={q.weight_bytes()} "
          f"linear_bytes={n_bytes} ppl={ppl:.3f} fp32={ref:.3f} n={nll.numel()} info={q.info}")
    assert math.isfinite(ppl) and nll.numel() == ref_nll.numel() == WINDOWS * (SEQ - 1)
    assert not torch.equal(nll, ref_nll)
    if max_ratio is not None:
        assert ppl <= ref * max_ratio, (variant.label(), ppl, ref)
    _PPL[(backend, variant.label())] = ppl
    if backend == "quanto" and params.get("activations") == "int8":
        # static per-tensor int8 activations lose to weight-only int8 on this model (outliers)
        if ("quanto", "wint8") not in _PPL:
            w8 = adapter.quantize(copy.deepcopy(model), adapter.parse_variant({"weights": "int8"}), None, CPU)
            _PPL[("quanto", "wint8")] = _ppl(_nll(w8.logits, windows))
        assert ppl > _PPL[("quanto", "wint8")], (ppl, _PPL[("quanto", "wint8")])


_PPL: dict[tuple[str, str], float] = {}  # perplexities measured in this module, by (backend, label)
