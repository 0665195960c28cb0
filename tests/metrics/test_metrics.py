"""Perplexity arithmetic against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from harness.metrics.perplexity import ppl_with_stderr, token_nll


def test_token_nll_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    ids = torch.randint(0, 11, (2, 7))
    nll = token_nll(logits, ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none").view(2, 6)
    assert nll.shape == (2, 6)
    assert torch.allclose(nll.float(), expected, atol=1e-6)


def test_ppl_and_stderr_by_hand():
    nll = np.array([1.0, 2.0, 3.0, 2.0])
    ppl, se = ppl_with_stderr(nll)
    assert ppl == math.exp(2.0)
    sd = math.sqrt(((1 - 2) ** 2 + 0 + 1 + 0) / 3)
    assert se == math.exp(2.0) * sd / 2


def test_uniform_model_has_vocab_perplexity():
    logits = torch.zeros(1, 50, 13)
    ids = torch.randint(0, 13, (1, 50))
    ppl, _ = ppl_with_stderr(token_nll(logits, ids).flatten().numpy())
    assert abs(ppl - 13) < 1e-9


def test_paired_ratio_by_hand(tmp_path):
    import json

    from harness.metrics.perplexity import paired_ratio, paired_values

    ref = np.array([1.0, 2.0, 3.0, 4.0])
    cand = ref + np.array([0.1, 0.3, 0.1, 0.3])
    np.save(tmp_path / "nll-c-8.npy", ref)
    (tmp_path / "nll-c-8.json").write_text(json.dumps({"tokens_sha1": "abc", "n": 4}))
    p = paired_ratio(cand, "abc", tmp_path, "nll-c-8")
    assert math.isclose(p["ln_ratio"], 0.2)
    sd = math.sqrt(4 * 0.1**2 / 3)
    assert math.isclose(p["ln_se"], sd / 2)
    ratio, ln = paired_values(p, "gptq", {})
    assert math.isclose(ratio.value, math.exp(0.2)) and math.isclose(ratio.uncertainty, math.exp(0.2) * sd / 2)
    # the paired error is far below what two independent errors would give
    independent = math.hypot(ref.std(ddof=1), cand.std(ddof=1)) / 2
    assert ln.uncertainty < independent / 5
    assert paired_ratio(cand, "other tokens", tmp_path, "nll-c-8") is None
    assert paired_ratio(cand, "abc", None, "nll-c-8") is None


def test_divergence_by_hand():
    from harness.metrics.divergence import summarize, token_divergence

    ref = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    q = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    ids = torch.tensor([[0, 0, 1]])
    kld, agree, dp = token_divergence(ref, q, ids)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5)
    assert torch.allclose(kld, torch.tensor([expected, 0.0], dtype=torch.float64))
    assert agree.tolist() == [False, True]
    assert torch.allclose(dp, torch.tensor([0.25 - 0.5, 0.0], dtype=torch.float64))
    values = {v.metric: v for v in summarize(kld.numpy(), agree.numpy().astype(float), dp.numpy(), {})}
    assert math.isclose(values["kld_mean"].value, expected / 2, rel_tol=1e-6)
    assert values["top1_agreement"].value == 0.5 and math.isclose(values["top1_agreement"].uncertainty, 0.5 / math.sqrt(2))
    assert math.isclose(values["delta_p_rms"].value, math.sqrt(0.25**2 / 2), rel_tol=1e-6)
    assert values["kld_p50"].n == 2


def test_identical_models_do_not_diverge():
    from harness.metrics.divergence import token_divergence

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 17)
    kld, agree, dp = token_divergence(logits, logits.clone(), torch.randint(0, 17, (2, 9)))
    assert kld.abs().max() < 1e-12 and agree.all() and dp.abs().max() < 1e-12
