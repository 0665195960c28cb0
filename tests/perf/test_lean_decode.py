"""The lean decoder (graph-decode floor reference) computes what the transformers model computes."""

import pytest
import torch

from harness.perf.kernels.lean_decode import LeanDecoder, check_against


def _tiny(arch: str, kv_heads: int):
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=False)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("arch,kv_heads,fuse,attention", [("llama", 4, True, "sdpa"), ("llama", 2, False, "sdpa"),
                                                          ("qwen2", 2, True, "sdpa"), ("llama", 4, True, "matmul"),
                                                          ("qwen2", 2, True, "matmul")])
def test_lean_decoder_matches_transformers(arch, kv_heads, fuse, attention):
    model = _tiny(arch, kv_heads)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    lean = LeanDecoder(model, batch=2, max_seq=16, fuse=fuse, attention=attention)
    got = check_against(model, lean, ids, steps=5)
    assert got["argmax_agreement"] == 1.0
    assert got["max_rel_logit_diff"] < 1e-5, got


def test_lean_decoder_counts_fused_weights_once():
    model = _tiny("llama", 2)
    lean = LeanDecoder(model, batch=1, max_seq=8)
    body = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert lean.weight_bytes() == body
    assert lean.cache_bytes() == 2 * 2 * 1 * 2 * 8 * 16 * 4  # layers x (k, v) x batch x kv_heads x seq x head_dim x fp32


class _Wrapped(torch.nn.Module):
    """A projection that is not a plain nn.Linear (as a quantized backend's layer is not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_lean_decoder_calls_non_plain_projections_as_modules():
    model = _tiny("llama", 2)
    model.model.layers[1].mlp.up_proj = _Wrapped(model.model.layers[1].mlp.up_proj)
    lean = LeanDecoder(model, batch=2, max_seq=16, fuse=True)
    assert not lean.fused  # one projection cannot be concatenated: none are, modules are called as they are
    assert lean.layers[1].w13[1] is model.model.layers[1].mlp.up_proj
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    got = check_against(model, lean, ids, steps=3)
    assert got["argmax_agreement"] == 1.0 and got["max_rel_logit_diff"] < 1e-5, got


def test_lean_decoder_runs_a_torchao_quantized_model():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = _tiny("llama", 2)
    quantize_(model.model, Int8WeightOnlyConfig())  # decoder linears only; torchao's own int8 tensors
    lean = LeanDecoder(model, batch=1, max_seq=16)
    assert not lean.fused and type(lean.layers[0].wo.weight).__name__ != "Parameter"
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(2))
    got = check_against(model, lean, ids, steps=3)
    assert got["argmax_agreement"] == 1.0 and got["max_rel_logit_diff"] < 1e-4, got
    fp_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "layers" in n and "proj" in n)
    assert lean.weight_bytes() < fp_bytes  # int8 storage counted, not the float size


def test_lean_decoder_refuses_other_architectures():
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="not one of"):
        LeanDecoder(transformers.GPT2LMHeadModel(cfg), batch=1, max_seq=8)
