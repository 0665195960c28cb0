"""Drift, outlier probes and layer sensitivity against hand computations (tiny models only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.metrics.base import CellContext


@pytest.fixture
def tiny(harness_env):
    from harness.adapters import get_adapter
    from harness.models.zoo import load_model, resolve_model

    source = resolve_model("tiny:llama", prepare=True)
    fp = get_adapter("fp")

    def fresh():
        model, tokenizer = load_model(source)
        return fp.quantize(model, fp.parse_variant({"dtype": "float32"}), None, torch.device("cpu")), tokenizer

    return fresh


def test_buckets_by_hand():
    from harness.metrics.drift import bucket_values

    kld = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0]])  # predictions of positions 1..5
    agree = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 0, 1]])
    values = bucket_values(kld, agree, 2, {})
    kl = [(v.params["pos_lo"], v.value, v.n) for v in values if v.metric == "kld_mean@pos"]
    assert kl == [(0, 1.0, 2), (2, 2.5, 4), (4, 4.5, 4)]
    top1 = [v.value for v in values if v.metric == "top1_agreement@pos"]
    assert top1 == [1.0, 0.75, 0.75]
    assert math.isclose(values[3].uncertainty, math.sqrt(0.75 * 0.25 / 4))
    assert math.isclose(values[2].uncertainty, np.std([2, 3, 2, 3], ddof=1) / 2)


def test_chunked_divergence_equals_whole(monkeypatch):
    from harness.metrics import drift
    from harness.metrics.divergence import token_divergence

    torch.manual_seed(0)
    ref, q, ids = torch.randn(2, 11, 7), torch.randn(2, 11, 7), torch.randint(0, 7, (2, 11))
    monkeypatch.setattr(drift, "CHUNK", 3)
    kld, agree = drift.positional_divergence(ref, q, ids)
    whole_kld, whole_agree, _ = token_divergence(ref, q, ids)
    assert kld.shape == (2, 10)
    assert torch.allclose(kld.flatten(), whole_kld) and torch.equal(agree.flatten(), whole_agree)


def test_first_divergence_and_censoring():
    from harness.metrics.drift import first_divergence, generation_values

    assert first_divergence([1, 2, 3], [1, 2, 4], 3) == 2
    assert first_divergence([1, 2, 3], [1, 2, 3], 3) is None
    assert first_divergence([1, 2], [1, 2, 3], 3) == 2  # one model stopped
    assert first_divergence([1, 9], [1, 9], 3) is None  # both stopped at the same place
    values = {v.metric: v.value for v in generation_values([0, 4, None, None], 10, {})}
    assert values["never_diverged_fraction"] == 0.5
    assert values["first_divergence_p50"] == np.percentile([0, 4, 10, 10], 50) == 7.0


def test_drift_end_to_end(tiny, tmp_path):
    from conftest import measure_against_reference
    from harness.metrics.drift import Drift, DriftParams

    ref, tokenizer = tiny()
    same, _ = tiny()
    params = DriftParams(seq_len=96, bucket=32, prompts=2, prompt_len=8, new_tokens=6)
    ref_values, values = measure_against_reference(Drift(), params, ref, same, tokenizer, tmp_path / "a")
    assert ref_values == []  # the reference cell stores, it does not compare with itself
    assert len(list((tmp_path / "a" / "reference-cell").glob("drift-greedy-*.json"))) == 1
    kld = [v for v in values if v.metric == "kld_mean@pos"]
    assert [v.params["pos_lo"] for v in kld] == [0, 32, 64] and [v.n for v in kld] == [31, 32, 32]
    assert max(v.value for v in kld) < 1e-4  # the 16-bit stored reference vs the same model
    assert {v.metric: v.value for v in values}["never_diverged_fraction"] == 1.0
    # a model that always predicts one token diverges at once wherever greedy reference does not
    with torch.no_grad():
        same.module.lm_head.weight.zero_()
        same.module.lm_head.weight[5] = 1.0  # tied with the embedding: still a valid model
    _, values = measure_against_reference(Drift(), params, ref, same, tokenizer, tmp_path / "b")
    assert min(v.value for v in values if v.metric == "kld_mean@pos") > 0.01
    assert Drift().run(CellContext(qmodel=ref, tokenizer=tokenizer, model_name="t", artifact_dir=tmp_path), params) == []
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="exceed the context"):
        measure_against_reference(Drift(), DriftParams(seq_len=4096), ref, same, tokenizer, tmp_path / "c")


def test_activation_stats_by_hand():
    from harness.metrics.outliers import ActStats

    torch.manual_seed(0)
    x = torch.randn(2, 50, 8)
    x[0, 3, 5] = 40.0  # one outlier channel
    stats = ActStats()
    stats.add(x[:1])
    stats.add(x[1:])
    s = stats.summary(sigma=6.0, abs_threshold=6.0)
    a = x.reshape(-1, 8).double().numpy()
    chan = np.abs(a).max(0)
    assert math.isclose(s["act_absmax"], 40.0)
    assert math.isclose(s["act_max_median_ratio"], 40.0 / np.median(chan), rel_tol=1e-9)
    flat = a.ravel()
    assert math.isclose(s["act_kurtosis"], ((flat - flat.mean()) ** 4).mean() / flat.var() ** 2, rel_tol=1e-9)
    assert s["act_outlier_channels_6sigma"] == float((chan > 6 * flat.std()).mean()) == 1 / 8
    assert s["act_outlier_channels_abs6"] == 1 / 8
    err, norm = 0.0, 0.0
    for w in (a[:50], a[50:]):  # per-tensor int8, absmax scale, one scale per window
        scale = np.abs(w).max() / 127
        err += ((np.clip(np.round(w / scale), -128, 127) * scale - w) ** 2).sum()
        norm += (w**2).sum()
    assert math.isclose(s["act_int8_pt_rel_error"], math.sqrt(err / norm), rel_tol=1e-4)


def test_outlier_probe_and_layer_error(tiny, tmp_path):
    from harness.metrics.outliers import Outliers, OutliersParams

    ref, tokenizer = tiny()
    cell, _ = tiny()
    with torch.no_grad():
        cell.module.model.layers[1].mlp.up_proj.weight.mul_(1.1)  # that layer's output error is exactly 10%
    params = OutliersParams(n_samples=1, seq_len=32)
    values = Outliers().run(CellContext(qmodel=ref, tokenizer=tokenizer, model_name="t", artifact_dir=tmp_path), params)
    per_layer = [v for v in values if v.metric == "act_max_median_ratio@layer"]
    assert len(per_layer) == 14 and all(v.value >= 1 for v in per_layer)
    w = ref.module.model.layers[0].mlp.down_proj.weight.detach().abs().amax(1)
    got = next(v.value for v in values if v.metric == "weight_row_max_median_ratio@layer"
               and v.params["layer"] == "model.layers.0.mlp.down_proj")
    assert math.isclose(got, float(w.max() / w.median()), rel_tol=1e-6)
    ctx = CellContext(qmodel=cell, tokenizer=tokenizer, model_name="t", artifact_dir=tmp_path, reference_model=lambda: ref)
    errors = {v.params["layer"]: v.value for v in Outliers().run(ctx, params) if v.metric == "layer_rel_error@layer"}
    assert math.isclose(errors.pop("model.layers.1.mlp.up_proj"), 0.1, rel_tol=1e-5)
    assert max(errors.values()) < 1e-6  # every other layer is fed the float input: no propagated error


def test_sensitivity_by_hand(tiny, tmp_path):
    import json

    from harness.adapters.rtn import RTNLinear, RTNVariant
    from harness.metrics.divergence import token_divergence
    from harness.metrics.sensitivity import Sensitivity, SensitivityParams
    from harness.models.corpora import calibration_windows

    ref, tokenizer = tiny()
    before = ref.logits(torch.arange(20)[None])
    params = SensitivityParams(n_samples=1, seq_len=32, schemes=["rtn-w4g64", "torch-dyn-int8-pt"],
                               groups=["down_proj"], keep=[2])
    ctx = CellContext(qmodel=ref, tokenizer=tokenizer, model_name="t", artifact_dir=tmp_path)
    values = Sensitivity().run(ctx, params)
    assert torch.equal(ref.logits(torch.arange(20)[None]), before)  # every float layer is back in place
    # one layer by hand
    name = "model.layers.1.self_attn.o_proj"
    ids = calibration_windows(tokenizer, "boolq-wiki", 1, 32, 0)
    twin, _ = tiny()
    parent = twin.module.model.layers[1].self_attn
    parent.o_proj = RTNLinear.from_linear(parent.o_proj, RTNVariant(bits=4, group_size=64))
    by_hand = float(token_divergence(ref.logits(ids), twin.logits(ids), ids)[0].mean())
    got = next(v for v in values if v.metric == "layer_kld@layer" and v.params["layer"] == name
               and v.params["scheme"] == "rtn-w4g64")
    assert math.isclose(got.value, by_hand, rel_tol=1e-6) and got.value > 0
    ranking = json.loads((tmp_path / "sensitivity.json").read_text())
    rows = ranking["ranking"]["rtn-w4g64"]
    assert len(rows) == 14 and rows[0]["kld_mean"] >= rows[-1]["kld_mean"]
    mixed = next(v for v in values if v.metric == "mixed_kld@keep")
    assert mixed.params["layers_kept"] == [r["layer"] for r in rows[:2]]
    assert mixed.params["bytes"] > mixed.params["base_bytes"] and "keep these 2 layers" in mixed.params["suggestion"]
    assert any(v.metric == "group_kld@group" and v.params["scheme"] == "torch-dyn-int8-pt" for v in values)
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="unknown sensitivity scheme"):
        Sensitivity().run(ctx, SensitivityParams(schemes=["rtn-w5"]))
    groups_only = Sensitivity().run(ctx, SensitivityParams(n_samples=1, seq_len=32, schemes=["rtn-w8"], groups=["down_proj"],
                                                           rank=False))
    assert [(v.metric, v.params["layers_in_group"]) for v in groups_only] == [("group_kld@group", 2)]


def test_backend_calibration_override_reaches_cells(harness_env, tmp_path):
    pytest.importorskip("optimum.quanto")
    from conftest import tiny_suite

    from harness.run.planner import plan
    from harness.run.suite import load_suite

    path = tiny_suite(tmp_path / "s.yaml", """
        - name: quanto
          variants: [{weights: int8, activations: int8, label: cal-wiki}]
        - name: quanto
          calibration: {corpus: lambada, n_samples: 2, seq_len: 32}
          variants: [{weights: int8, activations: int8, label: cal-lambada}]
    """)
    cells = {c.variant: c for c in plan(load_suite(str(path))).cells}
    assert cells["cal-wiki"].calibration["corpus"] == "boolq-wiki"
    assert cells["cal-lambada"].calibration == {"corpus": "lambada", "n_samples": 2, "seq_len": 32, "seed": 0}


def _frame(cells: dict[str, tuple[str, bool, list]]):
    """Records DataFrame from {cell_id: (variant, is_reference, [(measurement, MetricValue)])}."""
    from dataclasses import asdict

    import pandas as pd

    from harness.results.records import RECORD_COLUMNS, Record

    rows = []
    for cid, (variant, ref, values) in cells.items():
        for measurement, v in values:
            rows.append(Record(cell_id=cid, suite="s", model="m", backend="b", variant=variant, device="cpu",
                               is_reference=ref, run_id="r", measurement=measurement, **asdict(v)).model_dump())
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def test_report_sections_draw_from_records():
    from harness.metrics.base import MetricValue
    from harness.metrics.drift import bucket_values, generation_values
    from harness.metrics.outliers import _per_layer
    from harness.reports import section_calibration, section_drift, section_outliers

    layers = {"model.layers.0.mlp.down_proj": 300.0, "model.layers.0.mlp.up_proj": 3.0}
    drift = [("drift", v) for v in bucket_values(np.full((1, 7), 0.1), np.ones((1, 7)), 4, {"reference_cell": "ref"})
             + generation_values([3, None], 8, {"new_tokens": 8})]
    probes = [("outliers", v) for v in _per_layer(layers, "act_max_median_ratio", "p", 8, {"n_samples": 1})]
    errors = [("outliers", v) for v in _per_layer({k: v / 1000 for k, v in layers.items()}, "layer_rel_error", "p", 8, {})]
    sens = [("sensitivity", MetricValue("layer_kld@layer", k / 100, "nats", params={"layer": n, "scheme": "s"}))
            for n, k in layers.items()]
    cal = lambda corpus: ("quantize", MetricValue("seconds", 1.0, "s", params={"calibration": {"corpus": corpus}}))  # noqa: E731
    ppl = lambda corpus, v: ("perplexity", MetricValue("ppl", v, "ppl", params={"corpus": corpus}))  # noqa: E731
    df = _frame({
        "ref": ("fp32", True, probes + sens + [ppl("a", 10.0), ppl("b", 20.0)]),
        "q1": ("int8", False, drift + errors + [cal("a"), ppl("a", 11.0), ppl("b", 26.0)]),
        "q2": ("int8", False, [cal("b"), ppl("a", 12.0), ppl("b", 22.0)]),
    })
    section = section_drift.build(df, {})
    assert len(section.figures) == 2 and "b:fp32" in section.figures[0].layout.title.text
    assert list(section.figures[0].data[0].x) == [2.0, 6.0]  # bucket centres of [0,4) and [4,8)
    assert section.tables[0].rows[0][-1][0] == "0.5"  # never diverged
    section = section_outliers.build(df, {})
    assert len(section.figures) == 3
    assert list(section.figures[0].data[0].y) == ["L0.mlp.down_proj", "L0.mlp.up_proj"]
    section = section_calibration.build(df, {})
    gaps = {row[1][0]: row[-1][0] for row in section.tables[1].rows}
    assert gaps == {"a": f"{12 / 11:.3f}x", "b": f"{26 / 22:.3f}x"}
    assert section_drift.build(df[df["measurement"] != "drift"], {}) is None
