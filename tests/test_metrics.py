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
