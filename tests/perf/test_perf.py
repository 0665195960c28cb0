"""harness.perf: timing against a sleep-based fake clock, roofline arithmetic against hand-computed
layers, probes and perf measurements on CPU (tiny model), the shape: refusal, hardware profile
matching, and the roofline report section (synthetic records and a tiny run)."""

from __future__ import annotations

import json
import math
import statistics
import time

import pytest

from harness.errors import HarnessError
from harness.perf.roofline import ModelDims, layer_costs, phase_roofline
from harness.perf.timing import Samples, Timer, percentile, repeat


class FakeClock:
    """A clock that only moves when the code under test 'sleeps'."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_repeat_with_a_sleep_based_fake_clock():
    clock = FakeClock()
    durations = iter([9.0, 9.0, 0.1, 0.2, 0.3, 0.4, 1.0])  # two warm-ups, then five repeats
    samples = repeat(lambda: clock.sleep(next(durations)), warmup=2, repeats=5, clock=clock)
    assert samples.seconds == pytest.approx([0.1, 0.2, 0.3, 0.4, 1.0])  # warm-ups excluded
    assert samples.median == pytest.approx(0.3)
    assert samples.half_iqr == pytest.approx((0.4 - 0.2) / 2)
    assert samples.p(90) == pytest.approx(0.4 + 0.6 * 0.6)
    rate, spread = samples.rate_spread(6.0)  # e.g. 6 tokens per repeat
    assert rate == pytest.approx(20.0)
    assert spread == pytest.approx((30.0 - 15.0) / 2)


def test_timer_on_real_sleep():
    with Timer("cpu") as t:
        time.sleep(0.02)
    assert 0.019 <= t.seconds < 0.5


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    xs = [3.0, 1.0, 7.0, 2.0, 9.0, 4.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert math.isnan(Samples().median)


TINY = ModelDims(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_roofline_decode_layers_by_hand():
    costs = {c.name: c for c in layer_costs(TINY, "decode", batch=1, context=3)}  # fp16 weights and activations
    q = costs["q_proj"]  # 8 -> 8
    assert (q.ops, q.weight_bytes, q.act_bytes, q.kv_bytes, q.count) == (128, 128, 32, 0, 2)
    k = costs["k_proj"]  # 8 -> 4 (one kv head of 4), output goes to the cache
    assert (k.ops, k.weight_bytes, k.act_bytes, k.kv_bytes) == (64, 64, 16, 8)
    down = costs["down_proj"]  # 16 -> 8
    assert (down.ops, down.weight_bytes, down.act_bytes) == (256, 256, 48)
    att = costs["attention"]  # 4 keys (3 cached + the new one), 2 heads x 4 dims
    assert att.ops == 2 * (2 * 2 * 4 * 4) + 5 * 2 * 4
    assert att.kv_bytes == 2 * 4 * 1 * 4 * 2  # K and V of 4 positions, 1 kv head, fp16
    head = costs["lm_head"]
    assert (head.ops, head.weight_bytes, head.act_bytes, head.count) == (160, 160, 36, 1)
    assert costs["embedding"].ops == 0


def test_roofline_quantized_weights_pay_bits_and_dequantization():
    costs = {c.name: c for c in layer_costs(TINY, "decode", 1, 3, bits_per_weight=4.5, dequant_ops=2.0)}
    q = costs["q_proj"]
    assert q.weight_bytes == pytest.approx(64 * 4.5 / 8)  # 4-bit g64 with fp16 scale+zero
    assert q.ops == 128 + 2 * 64
    assert costs["lm_head"].weight_bytes == 160  # the head stays at 16 bits


def test_roofline_prefill_and_floor():
    pre = {c.name: c for c in layer_costs(TINY, "prefill", batch=2, context=5)}
    assert pre["q_proj"].ops == 2 * 8 * 8 * 10  # 10 rows
    assert pre["lm_head"].ops == 2 * 8 * 10 * 2  # logits for the last token of each prompt only
    roof = phase_roofline(TINY, "decode", 1, 3, peak=1e30, bandwidth=1.0)
    costs = layer_costs(TINY, "decode", 1, 3)
    assert roof.floor_s == pytest.approx(sum(c.bytes * c.count for c in costs))  # memory-bound: floor = bytes / bw
    placed = roof.placed(seconds=2 * roof.floor_s, bandwidth=1.0)
    assert placed["bandwidth_utilisation"] == pytest.approx(0.5)
    assert placed["roofline_fraction"] == pytest.approx(0.5)
    assert placed["tokens_s"] == pytest.approx(placed["roofline_tokens_s"] / 2)
    with pytest.raises(ValueError):
        layer_costs(TINY, "training", 1, 1)


def test_llama2_7b_decode_bytes_match_the_weights():
    from importlib import resources
    from types import SimpleNamespace

    cfg = json.loads((resources.files("harness.perf") / "shapes" / "llama-2-7b.json").read_text())
    dims = ModelDims.from_config(SimpleNamespace(**cfg))  # the shipped shape file, read as a config
    assert dims == ModelDims(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, vocab=32000)
    roof = phase_roofline(dims, "decode", 1, 0, peak=750e12, bandwidth=3.0e12)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) * 2 + 4096 * 32000 * 2
    assert linear / 1e9 == pytest.approx(13.21, abs=0.01)
    assert roof.bytes == pytest.approx(linear, rel=0.002)  # activations, norms and one KV row are small
    assert roof.roofline_tokens_s == pytest.approx(3.0e12 / linear, rel=0.003)  # ~227 tok/s on 3 TB/s


def test_cpu_probes_measure_something():
    from harness.perf.probes import run_probes

    ceilings = run_probes("cpu", quick=True)
    assert ceilings["memory_bandwidth"].value > 1e8 and ceilings["memory_bandwidth"].unit == "bytes/s"
    assert len(ceilings["memory_bandwidth"].samples_s) == ceilings["memory_bandwidth"].n
    assert ceilings["gemm_fp32"].value > 1e8


def test_hardware_profiles_match_their_devices():
    from harness import hardware

    expected = {
        "NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200",
        "NVIDIA A100-SXM4-80GB": "a100-80gb", "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA A100 80GB PCIe": "a100-80gb",
        "NVIDIA L40S": "l40s", "NVIDIA L4": "l4", "NVIDIA A10G": "a10g", "Tesla T4": "t4",
        "NVIDIA GeForce RTX 4090": "rtx-4090", "NVIDIA GeForce RTX 3090": "rtx-3090",
    }
    for device, name in expected.items():
        assert hardware.match_profile(device, "gpu").name == name, device
    assert hardware.match_profile("NVIDIA GeForce GTX 1080", "gpu") is None
    for profile in hardware.profiles().values():
        if profile.kind == "gpu":
            assert profile.memory_bandwidth_bytes_s and profile.memory_bytes and profile.tdp_w and profile.peak_flops["fp16"]
    assert "no datasheet profile" in hardware.describe(None)


def test_shape_models_refuse_quality_measurements(tmp_path, monkeypatch):
    from harness.run.planner import plan
    from harness.run.suite import load_suite

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    body = """
name: s
models: [shape:llama-2-7b]
device: cpu
backends: [{name: fp, variants: [{dtype: float16}]}]
measurements:
  - {name: speed, new_tokens: 4}
"""
    (tmp_path / "ok.yaml").write_text(body)
    cells = plan(load_suite(str(tmp_path / "ok.yaml"))).cells
    assert len(cells) == 1 and cells[0].model == "shape:llama-2-7b"
    (tmp_path / "bad.yaml").write_text(body + "  - {name: perplexity}\n")
    with pytest.raises(HarnessError, match="random-init weights.*perplexity need real weights"):
        plan(load_suite(str(tmp_path / "bad.yaml")))
    # weight-only quanto needs no text: planned without calibration; its activation variant is refused
    quanto = body.replace("{name: fp, variants: [{dtype: float16}]}", "{name: quanto, variants: [{weights: int4}]}")
    (tmp_path / "quanto.yaml").write_text(quanto)
    (cell,) = plan(load_suite(str(tmp_path / "quanto.yaml"))).cells
    assert cell.calibration is None
    (tmp_path / "quanto-a8.yaml").write_text(quanto.replace("{weights: int4}", "{weights: int8, activations: int8}"))
    with pytest.raises(HarnessError, match="calibrated backend.*quanto"):
        plan(load_suite(str(tmp_path / "quanto-a8.yaml")))
    from harness.models.zoo import ModelSource, load_model, resolve_model

    with pytest.raises(HarnessError, match="did you mean"):
        resolve_model("shape:llama-2-7")
    tiny = tmp_path / "tiny-shape"  # load_shape on a small config: random init in the shape's dtype, no tokenizer
    tiny.mkdir()
    (tiny / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64, "torch_dtype": "bfloat16"}))
    model, tokenizer = load_model(ModelSource(name="shape:tiny", path=str(tiny), kind="shape"))
    assert tokenizer is None and model.model.embed_tokens.weight.dtype.is_floating_point
    assert str(model.model.embed_tokens.weight.dtype) == "torch.bfloat16" and model.model.embed_tokens.weight.std() > 0
    assert all(p.device.type == "cpu" for p in model.parameters()) and model.model.norm.weight.eq(1).all()
    import torch

    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_perf_measurements_on_a_tiny_model(tmp_path, harness_env):
    import torch

    from harness.adapters import get_adapter
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext
    from harness.models.zoo import load_model, resolve_model

    model, tok = load_model(resolve_model("tiny:llama"))
    fp = get_adapter("fp")
    qmodel = fp.quantize(model, fp.parse_variant({}), None, torch.device("cpu"))
    cell = tmp_path / "cells" / "c1"
    cell.mkdir(parents=True)
    ctx = CellContext(qmodel=qmodel, tokenizer=tok, model_name="tiny:llama", artifact_dir=cell)
    speed = get_measurement("speed")
    values = {v.metric: v for v in speed.run(ctx, speed.Params(prompt_lengths=[16], batch_sizes=[1, 2], contexts=[8],
                                                                new_tokens=4, repeats=2, quick_probes=True))}
    d = values["decode_tokens_s@framework-b2-c8"]
    assert d.unit == "tokens/s" and d.n == 2 and len(d.params["samples_s"]) == 2 and d.uncertainty is not None
    assert d.params["tokens_per_repeat"] == 2 * 3  # batch 2 x 3 intervals between 4 tokens
    assert d.value == pytest.approx(statistics.median(6 / s for s in d.params["samples_s"]))
    assert 0 < d.params["bandwidth_utilisation"] and d.params["roofline_tokens_s"] > 0
    assert "warm-up 1" in d.protocol and "framework" in d.protocol
    assert {"decode_tokens_s", "prefill_tokens_s", "prefill_tokens_s@p16", "tpot_s@framework-b1-c8",
            "ttft_s@framework-b1-c8", "bandwidth_utilisation"} <= set(values)
    assert not any(m.startswith("decode_tokens_s@graph") for m in values)  # graph mode needs CUDA
    layers = {x["layer"]: x for x in values["decode_tokens_s"].params["layers"]}
    assert sum(x["decode_floor_share"] for x in layers.values()) == pytest.approx(1.0)
    assert layers["q_proj"]["prefill_intensity"] > layers["q_proj"]["decode_intensity"]  # 16 rows vs 1
    tp = values["tpot_s@framework-b1-c8"].params
    assert tp["p50"] <= tp["p90"] <= tp["p99"]
    shared = json.loads((tmp_path / "cells" / "ceilings-cpu.json").read_text())
    assert shared["cell"] == "c1"  # measured once per run, reused by the next cell
    ceilings = get_measurement("ceilings")
    cv = {v.metric: v for v in ceilings.run(ctx, ceilings.Params(quick=True))}
    assert cv["memory_bandwidth"].value == shared["ceilings"]["memory_bandwidth"]["value"]
    memory = get_measurement("memory")
    mv = {v.metric: v for v in memory.run(ctx, memory.Params(context=8, new_tokens=2))}
    assert mv["kv_cache_bytes_per_token"].value == 2 * 2 * 2 * 16 * 4  # 2 layers, 2 kv heads x 16 dims, fp32
    assert mv["weight_bytes_true"].value == qmodel.weight_bytes()


def _speed_record(cell, mode, value, frac, **kw):
    from harness.results.records import Record

    params = {"phase": "decode", "mode": mode, "batch": 1, "context": 128, "intensity": 1.0, "achieved_flops": value * 1e9,
              "roofline_tokens_s": value / frac, "roofline_fraction": frac, "bandwidth_utilisation": frac, "samples_s": [0.1]}
    return Record(cell_id=cell, suite="s", model="m", backend="fp", variant=cell, device="cuda", hardware_profile="h100-sxm",
                  run_id="r", measurement="speed", metric=f"decode_tokens_s@{mode}-b1-c128", value=value, unit="tokens/s",
                  n=3, uncertainty=1.0, params=params, **kw)


def test_roofline_section_places_points_and_reports_the_gap():
    import pandas as pd

    from harness.results.records import Record
    from harness.reports.section_roofline import build

    ceil = [Record(cell_id="a", suite="s", model="m", backend="fp", variant="a", device="cuda", hardware_profile="h100-sxm",
                   run_id="r", measurement="ceilings", metric=m, value=v, unit=u, params={"datasheet": d})
            for m, v, u, d in [("memory_bandwidth", 3.0e12, "bytes/s", 3.35e12), ("gemm_fp16", 750e12, "FLOP/s", 989e12)]]
    recs = ceil + [_speed_record("a", "framework", 20.0, 0.09), _speed_record("a", "graph", 160.0, 0.7),
                   _speed_record("a", "triton", 280.0, 0.9)]
    df = pd.DataFrame([r.model_dump() for r in recs])
    section = build(df, {})
    assert section.title == "Roofline" and len(section.figures) == 1
    names = [t.name for t in section.figures[0].data]
    assert "measured fp16" in names and "datasheet fp16" in names
    gap = section.tables[1]
    assert gap.headers[4::2] == ["graph tokens/s", "lean tokens/s", "triton tokens/s"]
    assert gap.rows[0][5][0] == "8.00x" and gap.rows[0][7][0] == "-"  # graph / framework; no lean point here
    assert gap.rows[0][-1][0] == "14.00x"  # triton / framework
    headline = _speed_record("a", "framework", 20.0, 0.09).model_copy(update={"metric": "decode_tokens_s"})
    headline.params["layers"] = [{"layer": "q_proj", "count": 32, "decode_intensity": 1.0, "prefill_intensity": 300.0,
                                  "decode_bytes": 1e9, "decode_floor_share": 0.25, "decode_bound": "memory"}]
    with_layers = build(pd.DataFrame([r.model_dump() for r in recs + [headline]]), {})
    per_layer = with_layers.tables[-1]
    assert "share of decode floor" in per_layer.headers and per_layer.rows[0][5][0] == "25.0%"
    assert build(df[df.measurement == "ceilings"], {}) is None


@pytest.mark.slow
def test_llm_perf_suite_on_the_embedded_model(tmp_path):
    from harness.run.runner import run_suite
    from harness.results.run_dir import load_records
    from harness.run.suite import load_suite

    result = run_suite(load_suite("llm-perf"), out=tmp_path / "run", backends=["fp"], device="cpu")  # one cell: CI time
    df = load_records(tmp_path / "run")
    ok = df[df.status == "ok"]
    assert result.failed == 0
    assert (ok.metric == "memory_bandwidth").any() and (ok.metric == "decode_tokens_s").sum() == 1
    assert ok[ok.metric == "decode_tokens_s@framework-b2-c32"].params.iloc[0]["bandwidth_utilisation"] > 0
    html = result.report.read_text()
    assert "Roofline" in html and "share of decode floor" in html and "section failed" not in html


def test_every_decode_mode_a_suite_can_name_is_registered():
    from typing import get_args

    from harness.perf.measurements import DECODE_MODES, SpeedParams

    named = set(get_args(get_args(SpeedParams.model_fields["modes"].annotation)[0]))
    assert named == set(DECODE_MODES)
