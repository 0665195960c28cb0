"""Graph-captured and lean decode on a real CUDA device (skipped without one; run on the lent GPU):
both produce one positive time per decoded token, and the lean decoder's greedy tokens match the
transformers model's."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _model():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


def test_graph_and_lean_decode_time_every_token():
    from harness.perf.decode import graph_decode
    from harness.perf.kernels.lean_decode import lean_graph_decode

    model = _model()
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(1)).cuda()
    graph = graph_decode(model, ids, 8)
    assert len(graph.tpot_s) == 8 and all(t > 0 for t in graph.tpot_s) and graph.kv_cache_bytes > 0
    for compile in (False, True):
        lean, decoder = lean_graph_decode(model, ids, 8, compile=compile)
        assert len(lean.tpot_s) == 8 and all(t > 0 for t in lean.tpot_s), lean
        assert decoder.fused and lean.mode == "graph-lean"


def test_lean_greedy_tokens_match_transformers_on_cuda():
    from harness.perf.kernels.lean_decode import LeanDecoder, check_against

    model = _model()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2)).cuda()
    got = check_against(model, LeanDecoder(model, 2, 32), ids, steps=6)
    assert got["argmax_agreement"] >= 0.85 and got["max_rel_logit_diff"] < 0.02, got


@pytest.mark.parametrize("pdl", ["1", "0"])
def test_triton_step_on_cuda_matches_transformers_and_replays(monkeypatch, pdl):
    """The compiled Triton kernels (tuned on the device, launched with and without programmatic
    dependent launch): logits match transformers', and the captured graph times every token."""
    pytest.importorskip("triton")
    from harness.perf.kernels.lean_decode import LeanDecoder, check_against, lean_graph_decode

    monkeypatch.setenv("QHARNESS_TRITON_PDL", pdl)
    model = _model()
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(3)).cuda()
    got = check_against(model, LeanDecoder(model, 1, 64, kernels="triton"), ids, steps=6)
    assert got["argmax_agreement"] >= 0.85 and got["max_rel_logit_diff"] < 0.02, got
    lean = LeanDecoder(model, 1, 64, kernels="triton")
    timing, _ = lean_graph_decode(model, ids, 8, lean=lean)
    assert len(timing.tpot_s) == 8 and all(t > 0 for t in timing.tpot_s) and "Triton" in timing.note
