"""The scorer's GPU rewrites (harness/metrics/lean_ops.py): found on a Llama, the same outputs as
transformers' own RMSNorm and rotary embedding, originals back afterwards, a norm with other
arithmetic refused, and nothing rewritten on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from harness.adapters.base import QuantizedModel
from harness.metrics import lean_ops
from harness.metrics.scoring import Head


def _tiny_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # not all ones: the weight must be applied
            p.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rewrites_give_the_models_own_logits_and_are_undone(dtype, tol) -> None:
    model = _tiny_llama(dtype)
    norm_forward, rotary = modeling_llama.LlamaRMSNorm.forward, modeling_llama.apply_rotary_pos_emb
    patches = lean_ops.lean_patches(model)
    assert {(getattr(o, "__name__", None), name) for o, name, _ in patches} == {
        ("LlamaRMSNorm", "forward"), ("transformers.models.llama.modeling_llama", "apply_rotary_pos_emb")}
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        plain = model(ids).logits.float()
        with lean_ops.patched(patches):
            assert modeling_llama.apply_rotary_pos_emb is lean_ops.apply_rotary_pos_emb
            lean = model(ids).logits.float()
    assert modeling_llama.LlamaRMSNorm.forward is norm_forward and modeling_llama.apply_rotary_pos_emb is rotary
    assert (lean - plain).abs().max() <= tol * plain.abs().max()


def test_originals_come_back_after_an_error() -> None:
    patches = lean_ops.lean_patches(_tiny_llama(torch.float32))
    before = modeling_llama.LlamaRMSNorm.forward
    with pytest.raises(RuntimeError, match="boom"), lean_ops.patched(patches):
        assert modeling_llama.LlamaRMSNorm.forward is lean_ops.rms_norm_forward
        raise RuntimeError("boom")
    assert modeling_llama.LlamaRMSNorm.forward is before


def test_a_norm_with_other_arithmetic_is_refused() -> None:
    class OffsetRMSNorm(torch.nn.Module):  # Gemma's: x_normed * (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(16))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    assert not lean_ops._norm_matches(OffsetRMSNorm())
    assert lean_ops._norm_matches(modeling_llama.LlamaRMSNorm(16))


def test_the_rotary_rewrite_equals_rotate_half_without_duplicated_halves() -> None:
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # halves differ: no shortcut assumed
    for a, b in zip(modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), lean_ops.apply_rotary_pos_emb(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_nothing_is_rewritten_on_a_cpu() -> None:
    head = Head(QuantizedModel(module=_tiny_llama(torch.float32), device=torch.device("cpu")))
    assert head.lean == []
