"""Integration tests on the embedded SmolLM2-135M (real weights, real text). Minutes on 2 cores;
the first run converts the GGUF (~40 s) into the user cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from harness.results.run_dir import load_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from harness.models.zoo import resolve_model

    return resolve_model("builtin:smollm2-135m")


def test_cached_conversion_matches_gguf_load(smollm2):
    """The safetensors cache gives the same logits as transformers' own GGUF load."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from harness.models.zoo import load_model

    gguf = Path(smollm2.meta["gguf_file"])
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    cached, tokenizer = load_model(smollm2)
    ids = tokenizer("Quantization trades accuracy for memory and speed.", return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (direct(ids).logits - cached(ids).logits).abs().max().item()
    assert diff == 0.0
    assert sum(p.numel() for p in cached.parameters()) == 134_515_008


def test_group_size_128_is_refused_on_576_wide_layers(tmp_path):
    from typer.testing import CliRunner

    from harness.cli.main import app

    suite = tmp_path / "g128.yaml"
    suite.write_text("name: g128\nmodels: [builtin:smollm2-135m]\nbackends:\n  - name: rtn\n"
                     "    variants: [{bits: 4, group_size: 128}]\n")
    result = CliRunner().invoke(app, ["run", "--suite", str(suite), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: rtn: group_size 128 does not divide in_features 576 of model.layers.0.self_attn.q_proj (try 64 or 32)"
    ]


def test_llm_smoke_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "llm-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {out / 'report.html'}" in proc.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["provenance"]["versions"]["torch"] == torch.__version__
    assert info["provenance"]["cpu"] and info["hardware_profile"]

    df = load_records(out)
    assert set(df[df.measurement == "cell"].status) == {"ok"}
    value = df.pivot_table(index="variant", columns="metric", values="value", aggfunc="first")
    ppl = value["ppl"]
    assert ppl.notna().all() and (ppl > 1).all() and (ppl < 1000).all()
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.01
    assert abs(ppl["int8-pc-sym"] / ppl["fp32"] - 1) < 0.02
    assert ppl["int4-g64-asym"] > 1.05 * ppl["int8-pc-sym"]
    assert value.loc["int4-g64-asym", "bits_per_weight"] == pytest.approx(4 + 16 / 64 + 4 / 64)
    wb = value["weight_bytes"]
    assert wb["int4-g64-asym"] < wb["int8-pc-sym"] < wb["bf16"] < wb["fp32"]
    ppl_rows = df[df.metric == "ppl"]
    assert (ppl_rows.protocol == "gptq").all() and (ppl_rows.n == 8 * 255).all() and (ppl_rows.uncertainty > 0).all()
    # paired ratio to the reference: consistent with the plain ratio, and far tighter than the
    # per-cell error bars (the cells score the same tokens)
    ratio = df[df.metric == "ppl_ratio"].set_index("variant")
    assert set(ratio.index) == {"bf16", "int8-pc-sym", "int4-g64-asym"}
    for variant, row in ratio.iterrows():
        assert row.value == pytest.approx(ppl[variant] / ppl["fp32"], rel=1e-6)
        assert row.uncertainty < ppl_rows.set_index("variant").uncertainty[variant] / ppl[variant] / 2
    assert ratio.value["int4-g64-asym"] - 3 * ratio.uncertainty["int4-g64-asym"] > 1.0  # int4 is worse, beyond noise
    # divergence from the reference, computed live on the same windows
    kld, top1 = value["kld_mean"], value["top1_agreement"]
    assert kld.notna().sum() == 3 and pd.isna(kld["fp32"])  # the reference does not diverge from itself
    assert 0 < kld["int8-pc-sym"] < kld["int4-g64-asym"] and kld["bf16"] < kld["int4-g64-asym"]
    assert top1["int8-pc-sym"] > top1["int4-g64-asym"] > 0.5
    html = (out / "report.html").read_text()
    assert "int4-g64-asym" in html and "Pareto" in html
