"""Calibrated quantizers (gptqmodel, llm-compressor, optimum GPTQ, legacy auto-gptq/autoawq) and the
artifact cache: cache mechanics without any library (fast), the libraries' own quantize + save +
load on a tiny random Llama, a second harness run of a cell loading from the cache, and (slow) GPTQ
and AWQ at 4-bit g64 on the embedded SmolLM2 against fp32 on the same tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from harness.adapters import get_adapter
from harness.adapters.base import CalibrationSet, LinearShape, ModelShapes
from harness.models.artifacts import META, artifact_key, cached_build
from harness.errors import HarnessError

pytestmark = pytest.mark.native  # in-process native code: run in a child pytest (tests/isolation.py)

CPU = torch.device("cpu")
SMOL_SHAPES = ModelShapes(linears=(LinearShape("model.layers.0.self_attn.q_proj", 576, 576),
                                   LinearShape("model.layers.0.mlp.down_proj", 1536, 576)))


def _calibration(n: int = 2, seq: int = 16, seed: int = 0) -> CalibrationSet:
    ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet("boolq-wiki", n, seq, seed, ids)


# --- the artifact cache, no quantization library ---------------------------------------------------

class _Source:
    def __init__(self, path):
        self.name, self.kind, self.path = "local-test", "local", str(path)


def test_cache_builds_once_then_hits_with_the_original_time(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    key = artifact_key(_Source(model_dir), "x", {"bits": 4}, _calibration(), {"lib": "1"}, "cpu")
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "weights.bin").write_bytes(b"q")
        return {"library_s": 1.5}

    first, info1 = cached_build(key, build, root=tmp_path / "cache")
    second, info2 = cached_build(key, build, root=tmp_path / "cache")
    assert len(calls) == 1 and first == second and (second / "weights.bin").read_bytes() == b"q"
    assert (info1["artifact_cache"], info2["artifact_cache"]) == ("miss", "hit")
    assert info2["quantize_s"] == pytest.approx(info1["quantize_s"]) and info2["library_s"] == 1.5
    assert json.loads((second / META).read_text())["key"]["variant"] == {"bits": 4}
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary folders left


def test_cache_key_follows_tokens_variant_versions_and_model_files(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"1234")
    base = dict(adapter="x", variant={"bits": 4}, calibration=_calibration(), versions={"lib": "1"}, device="cpu")
    digest = artifact_key(_Source(model_dir), **base)[0]
    assert artifact_key(_Source(model_dir), **base)[0] == digest  # deterministic
    for change in ({"variant": {"bits": 3}}, {"versions": {"lib": "2"}}, {"device": "cuda"},
                   {"calibration": _calibration(seed=1)}):  # same description shape, other tokens
        assert artifact_key(_Source(model_dir), **{**base, **change})[0] != digest, change
    (model_dir / "model.safetensors").write_bytes(b"12345")  # re-converted weights
    assert artifact_key(_Source(model_dir), **base)[0] != digest


def test_failed_build_leaves_nothing_and_rebuild_replaces(tmp_path, monkeypatch):
    key = artifact_key(None, "x", {}, _calibration(), {}, "cpu")
    orphan = tmp_path / f".{key[0]}.tmp-{2**22 + 12345}-deadbeef"  # a build killed mid-way (no such pid)
    orphan.mkdir()

    def broken(folder):
        (folder / "half").write_bytes(b"")
        raise RuntimeError("library crashed")

    with pytest.raises(RuntimeError):
        cached_build(key, broken, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the failed build's folder nor the orphan
    cached_build(key, lambda folder: (folder / "v").write_text("1") and None, root=tmp_path)
    monkeypatch.setenv("QHARNESS_ARTIFACTS", "rebuild")
    folder, info = cached_build(key, lambda folder: (folder / "v").write_text("2") and None, root=tmp_path)
    assert info["artifact_cache"] == "rebuilt" and (folder / "v").read_text() == "2"


# --- variants and limits: one line, before any work --------------------------------------------------

@pytest.mark.parametrize(("backend", "params", "needle"), [
    ("gptqmodel", {"group_size": 128}, "group_size 128 does not divide in_features 576"),
    ("llmcompressor", {"group_size": 128}, "try 64 or 32"),
    ("optimum-gptq", {"group_size": 256}, "does not divide"),
    ("auto-gptq", {"group_size": 128}, "shape '[-1, 128, N]' is invalid"),
    ("autoawq", {"group_size": 128}, "does not divide"),
])
def test_group_size_refused_against_layer_shapes(backend, params, needle):
    adapter = get_adapter(backend)
    with pytest.raises(HarnessError) as exc:
        adapter.check(adapter.parse_variant(params), SMOL_SHAPES, "cpu")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("backend", "params"), [
    ("gptqmodel", {"method": "awq", "bits": 8}),
    ("llmcompressor", {"recipe": "awq", "scheme": "W8A8", "group_size": None}),
    ("llmcompressor", {"recipe": "smoothquant", "scheme": "W4A16"}),
    ("llmcompressor", {"scheme": "W8A8"}),  # per channel: group_size must be null
])
def test_inconsistent_variants_are_refused(backend, params):
    with pytest.raises(ValidationError):
        get_adapter(backend).parse_variant(params)


def test_legacy_backends_say_exactly_why_not_here():
    import transformers

    reason = get_adapter("auto-gptq").availability("cpu")
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not reason.ok and "transformers 4.x" in reason.reason and transformers.__version__ in reason.reason
    awq = get_adapter("autoawq")
    cpu = awq.variant_availability(awq.parse_variant({}), "cpu")
    assert not cpu.ok and "intel_extension_for_pytorch" in cpu.reason and "270 s per layer" in cpu.reason
    assert get_adapter("auto-gptq").variant_availability(get_adapter("auto-gptq").parse_variant({}), "cpu").reason \
        .startswith("auto-gptq quantizes only on CUDA")


def test_calibration_is_required():
    with pytest.raises(HarnessError, match="needs a calibration set"):
        get_adapter("llmcompressor").quantize(torch.nn.Linear(2, 2), get_adapter("llmcompressor").parse_variant({}),
                                              None, CPU)


# --- the libraries on a tiny random Llama ----------------------------------------------------------------

@pytest.fixture
def tiny(harness_env):
    from harness.models.corpora import calibration_windows
    from harness.models.zoo import load_model, resolve_model

    model, tokenizer = load_model(resolve_model("tiny:llama"))
    ids = calibration_windows(tokenizer, "boolq-wiki", 4, 64, 0)
    return model, CalibrationSet("boolq-wiki", 4, 64, 0, ids)


TINY = [
    ("llmcompressor", {"recipe": "gptq", "group_size": 32}, ("weight_packed", 4.0, 5.5)),
    ("llmcompressor", {"recipe": "smoothquant", "scheme": "W8A8", "group_size": None}, ("weight_scale", 8.0, 9.0)),
]


@pytest.mark.parametrize(("backend", "params", "expect"), TINY, ids=[f"{b}-{p['recipe']}" for b, p, _ in TINY])
def test_tiny_quantize_save_load_and_cache(tiny, backend, params, expect):
    pytest.importorskip(backend)
    model, calibration = tiny
    attr, low, high = expect
    adapter = get_adapter(backend)
    variant = adapter.parse_variant(params)
    ids = calibration.input_ids[:1, :32]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    q = adapter.quantize(model, variant, calibration, CPU)
    assert q.info["artifact_cache"] == "miss" and q.info["quantize_s"] > 0
    assert sum(hasattr(m, attr) for m in q.module.modules()) == 14  # every linear but the head
    assert low < q.bits_per_weight() < high
    out = q.logits(ids)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)  # quantized, not the float model


def test_second_run_of_a_cell_loads_the_artifact(tmp_path, harness_env):
    """Through the harness (process per cell): run 1 quantizes, run 2 of the same cell loads."""
    pytest.importorskip("gptqmodel")
    from conftest import tiny_suite
    from harness.run.runner import run_suite
    from harness.results.run_dir import load_records
    from harness.run.suite import load_suite

    suite_path = tiny_suite(tmp_path / "s.yaml", extra_backends="""
        - name: gptqmodel
          variants: [{bits: 4, group_size: 32, sym: false}]
        """, timeout=600)
    text = suite_path.read_text() + "calibration: {n_samples: 4, seq_len: 64}\n"
    suite_path.write_text(text)
    seen = []
    for run in ("run1", "run2"):
        run_suite(load_suite(str(suite_path)), out=tmp_path / run, backends=["gptqmodel"])
        df = load_records(tmp_path / run)
        quant = df[(df.measurement == "quantize") & (df.metric == "seconds")].iloc[0]
        params = quant.params if isinstance(quant.params, dict) else json.loads(quant.params)
        ppl = df[df.metric == "ppl"].value.iloc[0]
        seen.append((params["artifact_cache"], params["quantize_s"], params["calibration"], ppl))
    (status1, original1, calibration, ppl1), (status2, original2, _, ppl2) = seen
    assert (status1, status2) == ("miss", "hit")
    assert original2 == pytest.approx(original1)  # the hit reports the original calibration time
    assert calibration == {"corpus": "boolq-wiki", "n_samples": 4, "seq_len": 64, "seed": 0}
    assert ppl2 == pytest.approx(ppl1, rel=1e-6) and math.isfinite(ppl1)
    from harness.reports.section_artifacts import build

    section = build(load_records(tmp_path / "run2"), {})
    (row,) = section.tables[0].rows
    assert row[0][0] == "gptqmodel:gptq-int4-g32-asym" and row[2][0] == "hit" and "4 x 64" in row[1][0]


# --- slow: the embedded model, 4-bit g64, a tiny calibration set (8 x 256) -------------------------------

SLOW = [
    ("gptqmodel", {"method": "gptq", "bits": 4, "group_size": 64, "sym": False}, "TorchAtenLinear"),
    ("llmcompressor", {"recipe": "awq", "scheme": "W4A16_ASYM", "group_size": 64}, "compressed-tensors"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "params", "kernel"), SLOW, ids=[b for b, _, _ in SLOW])
def test_smollm2_4bit_g64_close_to_fp32_and_beats_rtn(backend, params, kernel):
    """First run quantizes (minutes on 2 cores) into the user's artifact cache; later runs load it."""
    pytest.importorskip(backend)
    from conftest import smollm2_eval_windows
    from harness.models.corpora import calibration_windows

    model, tokenizer, ids = smollm2_eval_windows(2, 512)
    calibration = CalibrationSet("boolq-wiki", 8, 256, 0, calibration_windows(tokenizer, "boolq-wiki", 8, 256, 0))

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    with torch.no_grad():
        fp = nll(model(input_ids=ids).logits.float())
    rtn_model = get_adapter("rtn").quantize(type(model).from_pretrained(model.qharness_source.path),
                                            get_adapter("rtn").parse_variant({"bits": 4, "group_size": 64}), None, CPU)
    rtn = nll(rtn_model.logits(ids))
    adapter = get_adapter(backend)
    q = adapter.quantize(model, adapter.parse_variant(params), calibration, CPU)
    got = nll(q.logits(ids))
    assert kernel in q.info["kernel"] and q.info["artifact_cache"] in ("miss", "hit")
    assert 4.2 < q.bits_per_weight() < 4.8
    # calibrated 4-bit: worse than fp32, better than round-to-nearest at the same group size
    assert fp < got < rtn, (fp, got, rtn)
