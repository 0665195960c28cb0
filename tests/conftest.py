"""Shared fixtures. Tiny random models live in a per-session cache; the embedded model uses the
user's cache (its one-time conversion takes ~40 s, worth sharing across runs)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# tests marked `native` run in a child pytest: a native crash fails that test, not the run
from isolation import pytest_configure, pytest_runtest_logreport, pytest_runtest_logstart, pytest_runtest_protocol  # noqa: F401,E402

PLUGINS = Path(__file__).parent / "plugins"

# Without a GPU the fused Triton decode kernels (tests/perf/test_triton_decode.py) run under Triton's CPU
# interpreter; triton reads this when it is first imported, whichever test imports it first.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qharness-cache")


@pytest.fixture
def harness_env(monkeypatch, tiny_cache):
    """Environment for runs on tiny models with the chaos plugin importable in workers."""
    monkeypatch.setenv("QHARNESS_CACHE", str(tiny_cache))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(PLUGINS))
    return tiny_cache


def write_suite(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


TINY_SUITE = """
name: tiny
models: [tiny:llama]
device: cpu
timeout_s: {timeout}
reference: fp:fp32
backends:
  - name: fp
    variants: [{{dtype: float32}}]
{extra_backends}
measurements:
  - name: perplexity
    corpus: boolq-wiki
    seq_len: 64
    max_windows: 2
"""


def tiny_suite(path: Path, extra_backends: str = "", timeout: float = 120) -> Path:
    return write_suite(path, TINY_SUITE.format(extra_backends=textwrap.indent(textwrap.dedent(extra_backends), "  "),
                                               timeout=timeout))


def smollm2_eval_windows(windows: int, seq: int):
    """(fp32 SmolLM2, tokenizer, (windows, seq) token ids from the boolq-wiki eval split)."""
    from harness.models.corpora import eval_token_stream
    from harness.models.zoo import load_model, resolve_model

    model, tokenizer = load_model(resolve_model("builtin:smollm2-135m"))
    stream = eval_token_stream(tokenizer, "boolq-wiki", windows * seq)
    assert stream.numel() == windows * seq
    return model, tokenizer, stream.view(windows, seq)


def measure_against_reference(measurement, params, reference, model, tokenizer, folder: Path):
    """(reference cell's values, comparing cell's values) of one measurement, the way the worker
    runs them: the reference cell stores what it records, the comparing cell reads it."""
    from harness.metrics.base import CellContext
    from harness.metrics.scoring import cell_scorer, declare_reference_windows

    ref_dir, cell_dir = folder / "reference-cell", folder / "cell"
    ref_dir.mkdir(parents=True, exist_ok=True)
    cell_dir.mkdir(parents=True, exist_ok=True)
    ref_ctx = CellContext(qmodel=reference, tokenizer=tokenizer, model_name="reference", artifact_dir=ref_dir,
                          is_reference=True, scorer=cell_scorer(reference, ref_dir, None, True))
    declare_reference_windows(ref_ctx, [(measurement, params)])
    ref_values = measurement.run(ref_ctx, params)
    ctx = CellContext(qmodel=model, tokenizer=tokenizer, model_name="cell", artifact_dir=cell_dir, reference_dir=ref_dir,
                      scorer=cell_scorer(model, cell_dir, ref_dir, False))
    return ref_values, measurement.run(ctx, params)
