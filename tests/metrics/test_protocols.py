"""Perplexity protocols (gptq, lm-eval, llama.cpp) against hand computations.

A bigram "model" (logits depend only on the current token) makes each protocol's answer
computable by hand: the NLL of a token depends only on its predecessor, so what differs between
protocols is exactly which (predecessor, token) pairs get scored."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from harness.metrics.base import CellContext
from harness.metrics.perplexity import Perplexity, PerplexityParams, rolling_windows

V = 32
DOCS = [
    "The quick brown fox jumps over the lazy dog near the river bank today.",
    "Quantized models lose a little quality.",
    "Short one.",
    "A much longer document " * 6 + "that needs several rolling windows of the small context used here.",
]


class CharTokenizer:
    """Characters -> ids 1..V-1; id 0 is BOS (and EOS)."""

    def __init__(self, add_bos: bool):
        self.bos_token_id = self.eos_token_id = 0
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=False):
        ids = [1 + ord(c) % (V - 1) for c in text]
        return {"input_ids": ([0] if add_special_tokens and self.add_bos else []) + ids}


class Bigram:
    def __init__(self):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 2

    def logits(self, ids):
        return self.table[ids]

    def nll(self, prev: int, tok: int) -> float:
        return float(-torch.log_softmax(self.table[prev].double(), -1)[tok])


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS))
    return f"file:{path}"


def run(tmp_path, corpus, add_bos=False, **params):
    model = Bigram()
    ctx = CellContext(qmodel=model, tokenizer=CharTokenizer(add_bos), model_name="bigram", artifact_dir=tmp_path)
    values = Perplexity().run(ctx, PerplexityParams(corpus=corpus, **params))
    return model, {v.metric: v for v in values}


def stream_ids(tok_add_bos=False) -> list[int]:
    return CharTokenizer(tok_add_bos)("\n\n".join(DOCS))["input_ids"]


def test_rolling_windows_by_hand():
    pairs = rolling_windows([1, 2, 3, 4, 5], prefix_token=0, max_seq_len=3)
    assert pairs == [([0], [1, 2, 3]), ([2, 3], [4, 5])]
    # every token is predicted once, each input at most max_seq_len long
    tokens = list(range(1, 50))
    pairs = rolling_windows(tokens, 0, 8)
    assert [t for _, cont in pairs for t in cont] == tokens
    assert all(len(ctx_ + cont) - 1 <= 8 for ctx_, cont in pairs)


def test_rolling_windows_equal_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    rng = np.random.default_rng(0)
    for n, seq in [(1, 4), (7, 4), (50, 8), (64, 8), (300, 17)]:
        tokens = rng.integers(1, 100, n).tolist()
        ours = rolling_windows(tokens, 0, seq)
        theirs = [utils.make_disjoint_window(p) for p in utils.get_rolling_token_windows(tokens, 0, seq, 1)]
        assert ours == [(list(a), list(b)) for a, b in theirs]


def test_gptq_by_hand(tmp_path, corpus):
    model, v = run(tmp_path, corpus, protocol="gptq", seq_len=16)
    ids = stream_ids()
    n_win = len(ids) // 16
    nll = [model.nll(ids[w * 16 + i], ids[w * 16 + i + 1]) for w in range(n_win) for i in range(15)]
    assert v["ppl"].n == n_win * 15 and v["ppl"].protocol == "gptq"
    assert math.isclose(v["ppl"].value, math.exp(np.mean(nll)), rel_tol=1e-6)


def test_lm_eval_by_hand(tmp_path, corpus):
    model, v = run(tmp_path, corpus, protocol="lm-eval", seq_len=8)
    # with a bigram model, rolling windows score (prefix -> t0) and every (t_i -> t_i+1) of a document
    doc_nll, words, nbytes, n = [], [], [], 0
    for doc in DOCS:
        ids = CharTokenizer(False)(doc)["input_ids"]
        doc_nll.append(model.nll(0, ids[0]) + sum(model.nll(a, b) for a, b in zip(ids, ids[1:])))
        words.append(len(re.split(r"\s+", doc)))
        nbytes.append(len(doc.encode()))
        n += len(ids)
    total = sum(doc_nll)
    assert v["ppl"].n == n and v["ppl"].protocol == "lm-eval"
    assert math.isclose(v["ppl"].value, math.exp(total / n), rel_tol=1e-6)
    assert math.isclose(v["word_perplexity"].value, math.exp(total / sum(words)), rel_tol=1e-6)
    assert math.isclose(v["byte_perplexity"].value, math.exp(total / sum(nbytes)), rel_tol=1e-6)
    assert math.isclose(v["bits_per_byte"].value, total / sum(nbytes) / math.log(2), rel_tol=1e-6)
    assert v["word_perplexity"].n == len(DOCS) and v["word_perplexity"].uncertainty > 0
    assert v["ppl"].params["windows"] > len(DOCS)  # the long document needed several windows


@pytest.mark.parametrize("add_bos", [False, True])
def test_llama_cpp_by_hand(tmp_path, corpus, add_bos):
    n_ctx = 16
    model, v = run(tmp_path, corpus, add_bos=add_bos, protocol="llama.cpp", seq_len=n_ctx)
    tokens = ([0] if add_bos else []) + stream_ids()
    expected = []
    for c in range(len(tokens) // n_ctx):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        if add_bos:
            chunk[0] = 0
        # perplexity.cpp: logits at positions n_ctx/2 .. n_ctx-2 predict the next token
        expected += [model.nll(chunk[i], chunk[i + 1]) for i in range(n_ctx // 2, n_ctx - 1)]
    assert v["ppl"].n == len(expected) == (len(tokens) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    assert math.isclose(v["ppl"].value, math.exp(np.mean(expected)), rel_tol=1e-6)
    assert v["ppl"].params["bos"] == (0 if add_bos else None)


def test_protocol_defaults_and_pairing(tmp_path, corpus):
    assert PerplexityParams(protocol="llama.cpp").resolved_seq_len() == 512
    assert PerplexityParams().resolved_seq_len() == 2048
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    _, ref = run(ref_dir, corpus, protocol="lm-eval", seq_len=8)
    assert len(list(ref_dir.glob("nll-lm-eval-file_*-8.npy"))) == 1  # named by protocol, no folders
    model = Bigram()
    model.table = model.table * 0.5  # a different model on the same tokens
    ctx = CellContext(qmodel=model, tokenizer=CharTokenizer(False), model_name="bigram", artifact_dir=tmp_path,
                      reference_dir=ref_dir)
    values = {v.metric: v for v in Perplexity().run(ctx, PerplexityParams(corpus=corpus, protocol="lm-eval", seq_len=8))}
    assert values["ppl_ratio"].protocol == "lm-eval" and values["ppl_ratio"].uncertainty > 0
    assert math.isclose(values["ppl_ratio"].value, values["ppl"].value / ref["ppl"].value, rel_tol=1e-9)
    # another protocol's tokens never pair with these
    values = {v.metric: v for v in Perplexity().run(ctx, PerplexityParams(corpus=corpus, protocol="gptq", seq_len=8))}
    assert "ppl_ratio" not in values
