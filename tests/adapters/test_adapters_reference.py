"""The two reference adapters (fp, rtn) and the bit packing they rely on: fast CPU tests."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.adapters import get_adapter
from harness.adapters.base import LinearShape, ModelShapes
from harness.adapters.rtn import RTNLinear, RTNVariant
from harness.errors import HarnessError
from harness.weights.packing import pack_bits, packed_nbytes, unpack_bits


# --- packing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_roundtrip_all_widths_and_odd_lengths(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    for numel in (0, 1, 3, 7, 8, 9, 13, 64, 127, 1001):
        codes = torch.randint(0, 2**bits, (numel,), generator=gen, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
        assert torch.equal(unpack_bits(packed, bits, numel), codes)
    extremes = torch.tensor([0, 2**bits - 1] * 9, dtype=torch.uint8)  # all-ones / all-zero bits
    assert torch.equal(unpack_bits(pack_bits(extremes, bits), bits, 18), extremes)


@pytest.mark.parametrize(("bits", "expected"), [(8, 4096), (4, 2048), (3, 1536), (2, 1024), (1, 512)])
def test_packed_sizes_exact(bits: int, expected: int) -> None:
    packed = pack_bits(torch.zeros(4096, dtype=torch.uint8), bits)
    assert packed.numel() == expected == 4096 * bits // 8
    assert packed.untyped_storage().nbytes() == expected  # a fresh storage, not a view


def test_pack_rejects_out_of_range_codes() -> None:
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)


# --- RTN numerics --------------------------------------------------------------------------------

def _rel_err(weight: torch.Tensor, variant: RTNVariant) -> float:
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    w_hat = RTNLinear.from_linear(lin, variant).dequantize()
    return ((w_hat - weight).norm() / weight.norm()).item()


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [None, 64])
def test_rtn_error_decreases_with_bits(weight: torch.Tensor, sym: bool, group_size: int | None) -> None:
    errs = [_rel_err(weight, RTNVariant(bits=b, group_size=group_size, sym=sym)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and len(set(errs)) == 4, errs
    assert errs[-1] < 0.01, errs


def test_group_quantization_beats_per_channel_with_outlier_column(weight: torch.Tensor) -> None:
    w = weight.clone()
    w[:, 5] *= 50.0
    for sym in (False, True):
        assert _rel_err(w, RTNVariant(bits=4, group_size=64, sym=sym)) < _rel_err(w, RTNVariant(bits=4, sym=sym))


def test_rtn_keeps_zero_groups_and_bias() -> None:
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.zero_()
    q = RTNLinear.from_linear(lin, RTNVariant(bits=3, group_size=8))
    assert torch.equal(q.dequantize(), torch.zeros(4, 16))
    x = torch.randn(2, 16)
    assert torch.allclose(q(x), lin(x))


# --- check ---------------------------------------------------------------------------------------

def test_check_refuses_group_that_does_not_divide() -> None:
    shapes = ModelShapes(linears=(
        LinearShape("model.layers.0.self_attn.q_proj", 576, 576),
        LinearShape("model.layers.0.mlp.down_proj", 1536, 576),
        LinearShape("lm_head", 576, 49152),
    ))
    rtn = get_adapter("rtn")
    with pytest.raises(HarnessError) as exc:
        rtn.check(rtn.parse_variant({"bits": 4, "group_size": 128}), shapes, "cpu")
    msg = str(exc.value)
    assert "576" in msg and "128" in msg and "q_proj" in msg and "64" in msg and "\n" not in msg
    for ok in ({"bits": 4, "group_size": 64}, {"bits": 4, "group_size": 32}, {"bits": 8}):
        rtn.check(rtn.parse_variant(ok), shapes, "cpu")


def test_variant_labels_and_validation() -> None:
    rtn, fp = get_adapter("rtn"), get_adapter("fp")
    assert rtn.parse_variant({"bits": 4, "group_size": 64}).label() == "int4-g64-asym"
    assert rtn.parse_variant({"bits": 8, "sym": True}).label() == "int8-pc-sym"
    assert [fp.parse_variant({"dtype": d}).label() for d in ("float32", "bfloat16", "float16")] == [
        "fp32", "bf16", "fp16"]
    for bad in ({"bits": 1}, {"bits": 4, "group_size": 0}, {"bits": 4, "typo": 1}):
        with pytest.raises(ValueError):
            rtn.parse_variant(bad)


# --- end to end on a tiny Llama ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def _run(tiny: torch.nn.Module, backend: str, params: dict):
    adapter = get_adapter(backend)
    return adapter.quantize(copy.deepcopy(tiny), adapter.parse_variant(params), None, torch.device("cpu"))


def _expected_bpw(model: torch.nn.Module, bits: int, group_size: int | None, sym: bool) -> float:
    total_w = total_bits = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            gs = group_size or m.in_features
            per_w = bits + 16 / gs + (0 if sym else bits / gs)
            total_w += m.weight.numel()
            total_bits += m.weight.numel() * per_w
    return total_bits / total_w


@pytest.mark.parametrize(("bits", "group_size", "sym"), [(8, None, True), (4, 64, False), (3, 64, False),
                                                         (2, 32, False)])
def test_bits_per_weight_matches_formula(tiny, bits: int, group_size: int | None, sym: bool) -> None:
    qm = _run(tiny, "rtn", {"bits": bits, "group_size": group_size, "sym": sym})
    assert qm.bits_per_weight() == _expected_bpw(tiny, bits, group_size, sym)
    if group_size == 64 and bits == 4:
        assert qm.bits_per_weight() == 4.3125
    assert qm.info["quantized_layers"] == 14


def test_rtn_end_to_end_logits_and_bytes(tiny, ids) -> None:
    ref = _run(tiny, "fp", {})
    l32 = ref.logits(ids)
    q8, q4 = _run(tiny, "rtn", {"bits": 8, "sym": True}), _run(tiny, "rtn", {"bits": 4, "group_size": 64})
    l8, l4 = q8.logits(ids), q4.logits(ids)
    assert l8.dtype == l4.dtype == torch.float32 and l8.shape == l32.shape == (2, 32, 128)
    e8 = ((l8 - l32).norm() / l32.norm()).item()
    e4 = ((l4 - l32).norm() / l32.norm()).item()
    assert e8 < 0.01 and e8 < e4 and torch.isfinite(l4).all(), (e8, e4)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in q4.module.named_modules()
                   if not n.endswith("lm_head"))
    _, fp32_linear_bytes = ref.linear_stats()
    assert q4.weight_bytes() < 0.5 * fp32_linear_bytes
    assert q4.linear_stats()[1] < 0.15 * fp32_linear_bytes


def test_fp_bf16_halves_linear_bytes(tiny, ids) -> None:
    f32, bf16 = _run(tiny, "fp", {}), _run(tiny, "fp", {"dtype": "bfloat16"})
    assert bf16.linear_stats()[1] * 2 == f32.linear_stats()[1]
    assert bf16.weight_bytes() * 2 == f32.weight_bytes()
    assert f32.bits_per_weight() == 32.0 and bf16.bits_per_weight() == 16.0
    assert bf16.logits(ids).dtype == torch.float32
    assert get_adapter("fp").versions()["torch"] == torch.__version__


def test_rtn_evaluating_holds_the_same_weights_only_inside(tiny: torch.nn.Module, ids: torch.Tensor) -> None:
    """Drift's greedy continuations run under `evaluating()` (as does every Scorer call): each weight is dequantized once and
    reused there, bitwise the weight every forward rebuilds (same logits, same tokens); outside,
    nothing is held, and the stored bytes are the packed ones either way."""
    q = _run(tiny, "rtn", {"bits": 4, "group_size": 32})
    layers = [m for m in q.module.modules() if isinstance(m, RTNLinear)]
    before = q.weight_bytes()
    with torch.no_grad():
        plain = q.module(input_ids=ids).logits
        gen = q.module.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
        with q.evaluating() as held:
            assert held and all(m.held is not None for m in layers)
            assert q.weight_bytes() == before
            assert torch.equal(q.module(input_ids=ids).logits, plain)
            assert all(torch.equal(m.held[torch.float32], m.dequantize()) for m in layers)
            assert torch.equal(q.module.generate(input_ids=ids[:, :8], max_new_tokens=6, do_sample=False,
                                                 pad_token_id=0), gen)
    assert all(m.held is None for m in layers)
