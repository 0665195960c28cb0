"""The fused Triton decode step computes what transformers computes (run under Triton's CPU
interpreter here; the same kernels, compiled, are timed on the GPU by benchmarks/decode_triton.py)."""

import os

import pytest
import torch

if torch.cuda.is_available():  # the interpreter is process-wide: it would also run inductor's kernels there
    pytest.skip("CPU-interpreter tests; tests/gpu/test_gpu_decode.py runs the compiled kernels", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest sets it without a GPU)
pytest.importorskip("triton")

from harness.perf.kernels import triton_decode  # noqa: E402
from harness.perf.kernels.lean_decode import LeanDecoder, check_against  # noqa: E402

pytestmark = pytest.mark.native  # in-process native code: run in a child pytest (tests/isolation.py)



def _tiny(arch: str, heads: int, kv_heads: int, hidden: int = 64, head_dim: int | None = None):
    import transformers

    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=97, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=False, **({"head_dim": head_dim} if head_dim else {}))
    return model_cls(cfg).eval()


@pytest.mark.parametrize("arch,heads,kv_heads,hidden,head_dim", [
    ("llama", 4, 2, 64, None),   # grouped-query heads, 2 per kv head
    ("qwen2", 4, 2, 64, None),   # q/k/v biases
    ("llama", 6, 2, 96, 16),     # 3 q heads per kv head (not a power of two)
])
def test_triton_step_matches_transformers(arch, heads, kv_heads, hidden, head_dim):
    model = _tiny(arch, heads, kv_heads, hidden, head_dim)
    ids = torch.randint(3, 97, (1, 37), generator=torch.Generator().manual_seed(1))  # several blocks, empty splits
    lean = LeanDecoder(model, batch=1, max_seq=48, kernels="triton")
    assert lean.scratch.splits > 1
    got = check_against(model, lean, ids, steps=5)
    assert got["argmax_agreement"] == 1.0
    assert got["max_rel_logit_diff"] < 1e-5, got


@pytest.mark.parametrize("k", [48, 600])  # one masked tile; several tiles with a ragged last one
def test_gemv_epilogues_match_torch(k):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(2 * 10, k, generator=g), torch.randn(k, generator=g)
    norm, bias, res = torch.randn(k, generator=g), torch.randn(20, generator=g), torch.randn(20, generator=g)
    xn = norm * (x * torch.rsqrt(x.pow(2).mean() + 1e-5))
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(triton_decode.gemv(w, x), w @ x, **close)
    torch.testing.assert_close(triton_decode.gemv(w, x, norm=norm, eps=1e-5, bias=bias), w @ xn + bias, **close)
    torch.testing.assert_close(triton_decode.gemv(w, x, residual=res), res + w @ x, **close)
    gate, up = w[:10] @ xn, w[10:] @ xn
    torch.testing.assert_close(triton_decode.gemv(w, x, norm=norm, eps=1e-5, gated=True),
                               torch.nn.functional.silu(gate) * up, **close)


def test_triton_step_refuses_what_it_does_not_cover():
    model = _tiny("llama", 4, 2)
    with pytest.raises(ValueError, match="batch 2"):
        LeanDecoder(model, batch=2, max_seq=16, kernels="triton")
    model.model.layers[0].mlp.up_proj = torch.nn.Sequential(model.model.layers[0].mlp.up_proj)  # not a plain linear
    with pytest.raises(ValueError, match="not all plain float linears"):
        LeanDecoder(model, batch=1, max_seq=16, kernels="triton")
    with pytest.raises(ValueError, match="kernels must be torch or triton"):
        LeanDecoder(model, batch=1, max_seq=16, kernels="cuda")
