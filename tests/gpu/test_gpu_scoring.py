"""The scorer on a real CUDA device (skipped without one; run on the lent GPU): with the lean
rewrites in place (harness/metrics/lean_ops.py) its NLLs equal transformers' own fp16 logits'."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_lean_scoring_equals_the_models_own_logits_on_cuda():
    import transformers

    from harness.adapters.base import QuantizedModel
    from harness.metrics.perplexity import token_nll
    from harness.metrics.scoring import Scorer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    scorer = Scorer(QuantizedModel(module=model, device=torch.device("cuda")))
    assert len(scorer.head.lean) == 2, scorer.head.lean
    windows = torch.randint(1, 256, (5, 40), generator=torch.Generator().manual_seed(1))
    got = np.stack([s.nll for s in scorer.windows(windows)])
    with torch.no_grad():
        want = token_nll(model(windows.cuda()).logits.float().cpu(), windows).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_warm_up_runs_on_cuda_and_is_not_counted():
    import transformers

    from harness.adapters.base import QuantizedModel
    from harness.metrics.scoring import Scorer

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    scorer = Scorer(QuantizedModel(module=transformers.LlamaForCausalLM(cfg).to("cuda").eval(), device=torch.device("cuda")))
    assert scorer.warm_up() > 0.0 and scorer.stats.forward_tokens == 0
