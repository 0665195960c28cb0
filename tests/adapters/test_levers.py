"""Levers beyond plain PTQ on tiny:llama: QAT trains (loss falls) and converts to real torchao
tensors; a hand-written mixed allocation lands on the intended modules with the right bytes; KV
cache variants shrink the cache as their bits say; TensorRT says why it cannot run here; the
report section puts each lever beside its comparator."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from harness.errors import HarnessError


@pytest.fixture
def tiny(harness_env):
    from harness.models.zoo import load_model, model_shapes, resolve_model

    source = resolve_model("tiny:llama")
    return lambda: load_model(source)[0], model_shapes(source)


def _windows(n: int, seq: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 250, (n, seq), generator=g)


def test_qat_loss_decreases_and_converts(tiny):
    pytest.importorskip("torchao")
    from harness.adapters.base import CalibrationSet
    from harness.adapters.qat import QATAdapter
    from harness.metrics.training import training_values

    build, shapes = tiny
    adapter = QATAdapter()
    variant = adapter.parse_variant({"scheme": "intx_weight_only", "bits": 4, "group_size": 32, "steps": 12, "lr": 1e-3,
                                     "batch_size": 2, "holdout": 2})
    adapter.check(variant, shapes, "cpu")
    ids = _windows(6, 48)
    q = adapter.quantize(build(), variant, CalibrationSet("random", 6, 48, 0, ids), torch.device("cpu"))
    losses = q.info["training"]["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    # converted: the decoder's linears hold torchao tensors, the head stays float
    kinds = {n: type(m.weight).__name__ for n, m in q.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("lm_head") in ("Parameter", "Tensor")
    assert set(kinds.values()) == {"IntxUnpackedToInt8Tensor"}
    assert q.logits(ids[:1]).shape == (1, 48, 256)
    values = {v.metric: v for v in training_values(q.info["training"])}
    assert values["train_steps"].value == 12 and values["train_seconds"].value > 0
    assert {"holdout_loss_float", "holdout_loss_ptq", "holdout_loss_qat", "holdout_recovery"} <= values.keys()


def test_qat_ptq_baseline_and_bad_input(tiny):
    pytest.importorskip("torchao")
    from harness.adapters.base import CalibrationSet
    from harness.adapters.qat import QATAdapter

    build, _ = tiny
    adapter = QATAdapter()
    ptq = adapter.parse_variant({"steps": 0, "group_size": 32})
    assert ptq.label() == "a8w4-g32-ptq"
    q = adapter.quantize(build(), ptq, CalibrationSet("random", 3, 32, 0, _windows(3, 32)), torch.device("cpu"))
    assert q.info["training"]["losses"] == [] and "qat" not in q.info["training"]["holdout_loss"]
    with pytest.raises(HarnessError, match="holdout"):
        adapter.quantize(build(), adapter.parse_variant({"holdout": 3}), CalibrationSet("r", 3, 32, 0, _windows(3, 32)),
                         torch.device("cpu"))
    assert not adapter.variant_availability(adapter.parse_variant({"scheme": "int4_weight_only", "group_size": 32}), "cpu").ok


def test_qat_holdout_never_shares_tokens_with_training():
    from harness.adapters.qat import holdout_split

    # windows of 10 tokens at these offsets: 0 and 1 held out cover [100, 110) and [300, 310)
    starts = [100, 300, 105, 200, 295, 310, 90, 0]
    split = holdout_split(len(starts), 10, 2, starts)
    assert split["held"] == [0, 1] and split["disjoint"] is True
    assert split["train"] == [3, 5, 6, 7]  # 105 and 295 overlap a held-out window; 310 and 90 (to 100) only touch
    assert split["dropped"] == 2
    for i in split["train"]:
        for h in split["held"]:
            assert not set(range(starts[i], starts[i] + 10)) & set(range(starts[h], starts[h] + 10))
    # no offsets known (adapter called directly): nothing can be checked and it says so
    assert holdout_split(4, 10, 1, None) == {"held": [0], "train": [1, 2, 3], "disjoint": None, "dropped": 0}


def test_qat_refuses_when_every_training_window_overlaps_the_holdout(tiny):
    pytest.importorskip("torchao")
    from harness.adapters.base import CalibrationSet
    from harness.adapters.qat import QATAdapter

    build, _ = tiny
    adapter = QATAdapter()
    calib = CalibrationSet("r", 3, 32, 0, _windows(3, 32), starts=[0, 5, 10], stream_tokens=50)
    with pytest.raises(HarnessError, match="overlaps the 1 held-out"):
        adapter.quantize(build(), adapter.parse_variant({"holdout": 1, "group_size": 32}), calib, torch.device("cpu"))


ALLOC = {"*.down_proj": {"bits": 8, "sym": True}, "model.layers.0.*": "float", "default": {"bits": 4, "group_size": 32}}


def test_mixed_rtn_allocation_lands_on_intended_modules(tiny):
    from harness.adapters.mixed import MixedPrecisionAdapter
    from harness.adapters.rtn import RTNLinear

    build, shapes = tiny
    adapter = MixedPrecisionAdapter()
    variant = adapter.parse_variant({"base": "rtn", "allocation": ALLOC})
    adapter.check(variant, shapes, "cpu")
    q = adapter.quantize(build(), variant, None, torch.device("cpu"))
    expected_bytes = n_weights = 0
    for name, mod in q.module.named_modules():
        if not hasattr(mod, "in_features") or name.endswith("lm_head"):
            continue
        w = mod.in_features * mod.out_features
        n_weights += w
        if name.endswith("down_proj"):  # first pattern wins, also in layer 0
            assert isinstance(mod, RTNLinear) and (mod.bits, mod.sym, mod.group_size) == (8, True, mod.in_features)
            expected_bytes += w + mod.out_features * 2  # int8 codes + one fp16 scale per row
        elif name.startswith("model.layers.0."):
            assert type(mod) is torch.nn.Linear
            expected_bytes += w * 4
        else:
            assert isinstance(mod, RTNLinear) and (mod.bits, mod.group_size, mod.sym) == (4, 32, False)
            groups = w // 32
            expected_bytes += w // 2 + groups * 2 + groups // 2  # 4-bit codes, fp16 scales, 4-bit zeros
    assert q.bits_per_weight() == pytest.approx(8 * expected_bytes / n_weights)
    assert q.info["allocation"]["model.layers.1.mlp.down_proj"] == "int8-pc-sym"


def test_mixed_hqq_and_ranking(tiny, tmp_path):
    pytest.importorskip("hqq")
    from harness.adapters.mixed import MixedPrecisionAdapter

    build, shapes = tiny
    ranking = tmp_path / "sensitivity.json"  # the sensitivity probe's layout
    ranking.write_text(json.dumps({"ranking": {"rtn-int4": [{"layer": "model.layers.1.self_attn.v_proj", "kld_mean": 0.3},
                                                            {"layer": "model.layers.0.mlp.up_proj", "kld_mean": 0.1}]}}))
    adapter = MixedPrecisionAdapter()
    variant = adapter.parse_variant({"base": "hqq", "allocation": {"default": {"bits": 4, "group_size": 32}},
                                     "ranking": str(ranking), "top": 1, "high": {"bits": 8, "group_size": 32}})
    adapter.check(variant, shapes, "cpu")
    q = adapter.quantize(build(), variant, None, torch.device("cpu"))
    bits = {n: m.meta["nbits"] for n, m in q.module.named_modules() if type(m).__name__ == "HQQLinear"}
    assert bits.pop("model.layers.1.self_attn.v_proj") == 8
    assert set(bits.values()) == {4} and len(bits) == 13
    with pytest.raises(HarnessError, match="matches no quantizable layer"):
        adapter.check(adapter.parse_variant({"base": "rtn", "allocation": {"*.nope": {"bits": 8}, "default": {"bits": 4}}}),
                      shapes, "cpu")
    with pytest.raises(HarnessError, match="does not divide"):
        adapter.check(adapter.parse_variant({"base": "rtn", "allocation": {"default": {"bits": 4, "group_size": 48}}}),
                      shapes, "cpu")


def test_kv_cache_bytes_follow_bits(tiny):
    pytest.importorskip("hqq")
    pytest.importorskip("optimum.quanto")
    from harness.adapters.kvcache import KVCacheAdapter
    from harness.metrics.kvcache import kv_cache_bytes

    build, shapes = tiny
    adapter = KVCacheAdapter()
    ids = _windows(1, 192)
    model = build()
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    nbytes, errors = {}, {}
    for name, params in {"float": {"kv": "none"}, "hqq8": {"kv": "hqq", "nbits": 8}, "hqq4": {"kv": "hqq", "nbits": 4},
                         "hqq2": {"kv": "hqq", "nbits": 2}, "quanto4": {"kv": "quanto", "nbits": 4},
                         "quanto2": {"kv": "quanto", "nbits": 2}}.items():
        variant = adapter.parse_variant(params)
        adapter.check(variant, shapes, "cpu")
        q = adapter.quantize(build(), variant, None, torch.device("cpu"))
        nbytes[name] = kv_cache_bytes(q, ids)
        errors[name] = float((q.logits(ids) - full).abs().max())
        assert q.bits_per_weight() == 32.0  # the cache is not weights
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert nbytes["float"] == 2 * cfg.num_hidden_layers * 192 * cfg.num_key_value_heads * head_dim * 4
    assert nbytes["hqq2"] < nbytes["hqq4"] < nbytes["hqq8"] < nbytes["float"]
    assert nbytes["quanto2"] < nbytes["quanto4"] < nbytes["float"]
    assert errors["float"] < 1e-4 < errors["hqq8"] < errors["hqq2"]  # chunked logits really go through the cache


def test_kv_cache_variant_validation():
    from harness.adapters.kvcache import KVCacheAdapter

    adapter = KVCacheAdapter()
    for bad in ({"kv": "quanto", "nbits": 8}, {"kv": "llamacpp"}, {"kv": "none", "nbits": 4},
                {"base": "llamacpp", "base_params": {"qtype": "Q8_0"}, "kv": "hqq", "nbits": 4}):
        with pytest.raises((HarnessError, ValueError)):  # pydantic ValidationError is a ValueError
            adapter.parse_variant(bad)
    v = adapter.parse_variant({"base": "llamacpp", "base_params": {"qtype": "Q8_0"}, "kv": "llamacpp", "type_k": "q4_0",
                               "type_v": "q4_0"})
    assert v.label() == "llamacpp-Q8_0+kv-kq4_0-vq4_0"


def test_tensorrt_says_why_not_here():
    from harness.adapters import get_adapter

    adapter = get_adapter("tensorrt")
    reason = adapter.availability("cpu").reason
    assert not adapter.availability("cpu").ok
    assert ("not installed" in reason and "pypi.nvidia.com" in reason and "modelopt" in reason) or "CUDA" in reason


def _rec(cell, backend, variant, vp, metric, value, measurement="m", params=None, ref=False):
    return {"cell_id": cell, "backend": backend, "variant": variant, "variant_params": vp, "metric": metric,
            "value": value, "measurement": measurement, "params": params or {}, "status": "ok", "is_reference": ref,
            "model": "m", "uncertainty": None, "n": 1, "unit": ""}


def test_levers_section_pairs_each_lever_with_its_comparator():
    from harness.reports.section_levers import build

    qv = {"scheme": "int8_dyn_act_intx_weight", "bits": 4, "group_size": 64}
    rows = [
        _rec("ref", "fp", "fp32", {"dtype": "float32"}, "ppl", 10.0, ref=True),
        _rec("ptq", "qat", "a8w4-g64-ptq", {**qv, "steps": 0}, "ppl", 14.0),
        _rec("qat", "qat", "a8w4-g64-qat8", {**qv, "steps": 8}, "ppl", 12.0),
        _rec("qat", "qat", "a8w4-g64-qat8", {**qv, "steps": 8}, "train_loss", 3.0, params={"step": 1}),
        _rec("u4", "rtn", "int4", {"bits": 4}, "bits_per_weight", 4.5),
        _rec("u4", "rtn", "int4", {"bits": 4}, "kld_mean", 0.2),
        _rec("mx", "mixed", "rtn-mix", {"base": "rtn"}, "bits_per_weight", 5.0),
        _rec("mx", "mixed", "rtn-mix", {"base": "rtn"}, "kld_mean", 0.1),
        _rec("kf", "kv-cache", "fp+kv-float", {"base": "fp", "base_params": {}, "kv": "none"}, "kv_cache_bytes", 1000.0,
             params={"context": 2048}),
        _rec("k4", "kv-cache", "fp+kv-hqq4", {"base": "fp", "base_params": {}, "kv": "hqq"}, "kv_cache_bytes", 250.0,
             params={"context": 2048}),
    ]
    section = build(pd.DataFrame(rows), {})
    assert section is not None and len(section.tables) == 3
    qat, mixed, kv = section.tables
    assert qat.rows[0][5][0] == "50%"  # (14 - 12) / (14 - 10)
    assert [r[0][0] for r in mixed.rows] == ["uniform", "mixed"]
    assert {r[0][0]: r[3][0] for r in kv.rows}["kv-cache:fp+kv-hqq4"] == "0.250"
    assert build(pd.DataFrame([rows[0]]), {}) is None


def test_mixed_llamacpp_maps_layers_to_gguf_tensor_overrides(tiny):
    from harness.adapters.mixed import APPLY, MixedPrecisionAdapter, gguf_tensor_name, resolve

    assert gguf_tensor_name("model.layers.12.mlp.down_proj") == "blk.12.ffn_down.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.o_proj") == "blk.0.attn_output.weight"
    with pytest.raises(HarnessError, match="no GGUF tensor name"):
        gguf_tensor_name("encoder.layer.0.attention.self.query")
    build, shapes = tiny
    adapter = MixedPrecisionAdapter()
    variant = adapter.parse_variant({"base": "llamacpp", "allocation": {"*.down_proj": {"qtype": "Q4_K_M"},
                                                                        "default": {"qtype": "Q4_0"}}})
    adapter.check(variant, shapes, "cpu")
    plan = {n: adapter._parse(variant, p) for n, p in resolve(variant, [s.name for s in shapes.targets()]).items()}
    with pytest.raises(HarnessError, match="a mix; per-layer qtypes"):  # refused before any conversion
        APPLY["llamacpp"](build(), plan, adapter._parse(variant, {"qtype": "Q4_0"}), torch.device("cpu"))
