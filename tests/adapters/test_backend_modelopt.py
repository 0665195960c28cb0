"""The modelopt adapter: TensorRT's recipes through ModelOpt's own mtq.quantize on a tiny Llama (CPU),
storage counted as each recipe stores its weights, and the suite's knobs checked before any work."""

from __future__ import annotations

import pytest
import torch

from harness.adapters import get_adapter
from harness.adapters.base import CalibrationSet, LinearShape, ModelShapes
from harness.errors import HarnessError

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (extra 'modelopt')")


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("recipe, block, bits, lo, hi", [
    ("fp8", None, 8.0, 8.0, 8.1),  # fp8 codes + per-tensor amax
    ("int8-sq", None, 8.0, 8.2, 8.8),  # int8 codes + per-channel amax + smoothing scales (fp32)
    ("int4-awq", 64, 4.0, 4.5, 5.0),  # int4 codes + one fp32 amax per 64 + AWQ's pre-quant scales
    ("w4a8-awq", 64, 4.0, 4.5, 5.0),
])
def test_recipes_quantize_and_count_their_storage(recipe, block, bits, lo, hi):
    adapter = get_adapter("modelopt")
    model = _tiny()
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    cal = CalibrationSet("test", 4, 32, 0, torch.randint(0, 256, (4, 32)))
    variant = adapter.parse_variant({"recipe": recipe, "block_size": block, "calibration_batches": 4})
    q = adapter.quantize(model, variant, cal, torch.device("cpu"))
    assert q.info["quantized_layers"] == 14 and q.info["weight_bits"] == [bits]  # 7 linears x 2 layers; lm_head kept
    assert lo <= q.bits_per_weight() <= hi
    out = q.logits(ids)
    err = float((out - ref).abs().max())
    assert 0 < err < 0.5 * float(ref.abs().max())  # quantized (it changed) and still the same model
    assert q.weight_bytes() < sum(t.numel() * 4 for t in model.state_dict().values())


def test_block_size_is_checked_before_any_work():
    adapter = get_adapter("modelopt")
    shapes = ModelShapes(linears=(LinearShape("model.layers.0.mlp.down_proj", 576, 1536),))
    with pytest.raises(HarnessError, match="blocks of 128 do not divide in_features 576"):
        adapter.check(adapter.parse_variant({"recipe": "int4-awq"}), shapes, "cpu")
    adapter.check(adapter.parse_variant({"recipe": "int4-awq", "block_size": 64}), shapes, "cpu")
    with pytest.raises(HarnessError, match="block_size is for"):
        adapter.check(adapter.parse_variant({"recipe": "fp8", "block_size": 64}), shapes, "cpu")


def test_no_calibration_is_one_line():
    adapter = get_adapter("modelopt")
    with pytest.raises(HarnessError, match="calibrate"):
        adapter.quantize(_tiny(), adapter.parse_variant({"recipe": "fp8"}), None, torch.device("cpu"))
