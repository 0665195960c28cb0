"""Same model + same text + same protocol = the reference tool's number (within 0.1%), on the
embedded model: lm-eval's own HFLM on a local-file loglikelihood_rolling task, and llama.cpp's
perplexity procedure (tools/perplexity/perplexity.cpp) driven through llama-cpp-python with
llama.cpp's own tokenizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from harness.metrics.base import CellContext
from harness.metrics.perplexity import Perplexity, PerplexityParams

pytestmark = pytest.mark.slow
REL = 1e-3  # 0.1%


def _docs(n_chars: int) -> list[str]:
    from harness.models.corpora import load_texts

    out, total = [], 0
    for doc in load_texts("boolq-wiki", "eval"):
        out.append(doc.strip())
        total += len(doc)
        if total >= n_chars:
            return out
    return out


@pytest.fixture(scope="module")
def smollm2():
    from harness.adapters.base import QuantizedModel
    from harness.models.zoo import load_model, resolve_model

    source = resolve_model("builtin:smollm2-135m")
    model, tokenizer = load_model(source)
    return source, QuantizedModel(model, torch.device("cpu")), tokenizer


def test_lm_eval_protocol_equals_lm_eval(tmp_path, smollm2):
    pytest.importorskip("lm_eval")
    from harness.metrics.lm_eval_bridge import LmEval, LmEvalParams, local_rolling_task

    _, qmodel, tokenizer = smollm2
    docs = _docs(2500)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(docs))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "qh_local.yaml").write_text(local_rolling_task("qh_local", jsonl))

    seq_len = 128  # small, so documents span several rolling windows
    ctx = CellContext(qmodel=qmodel, tokenizer=tokenizer, model_name="smollm2", artifact_dir=tmp_path)
    ours = {v.metric: v for v in Perplexity().run(ctx, PerplexityParams(protocol="lm-eval", corpus=f"file:{corpus}",
                                                                        seq_len=seq_len))}
    assert ours["ppl"].params["windows"] > len(docs)
    theirs = {v.metric: v for v in LmEval().run(ctx, LmEvalParams(tasks=("qh_local",), include_path=str(tmp_path / "tasks"),
                                                                   max_length=seq_len))}
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        a, b = ours[metric].value, theirs[f"lmeval_qh_local_{metric}"].value
        assert math.isclose(a, b, rel_tol=REL), (metric, a, b)


def llama_cpp_perplexity(gguf: str, text: str, n_ctx: int) -> tuple[float, int, list[int]]:
    """perplexity.cpp's perplexity(), step for step, through llama-cpp-python."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    first, nll = n_ctx // 2, []
    for c in range(len(tokens) // n_ctx):
        chunk = list(tokens[c * n_ctx : (c + 1) * n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(np.array(llm.scores[first : n_ctx - 1], dtype=np.float64))
        logp = torch.log_softmax(logits, -1)
        nll += (-logp.gather(-1, torch.tensor(chunk[first + 1 :])[:, None]).squeeze(-1)).tolist()
    return math.exp(float(np.mean(nll))), len(nll), list(tokens)


def test_llama_cpp_protocol_equals_llama_cpp(tmp_path, smollm2):
    pytest.importorskip("llama_cpp")
    from harness.adapters.llamacpp import LlamaCppAdapter

    _, fp_model, tokenizer = smollm2
    adapter = LlamaCppAdapter()  # the shipped GGUF itself: no conversion, no quantization
    qmodel = adapter.quantize(fp_model.module, adapter.parse_variant({"qtype": "original"}), None, torch.device("cpu"))
    n_ctx = 512
    docs = _docs(5000)  # ~1200 tokens: 2 chunks
    text = "\n\n".join(docs)
    corpus = tmp_path / "docs.txt"
    corpus.write_text(text)
    ctx = CellContext(qmodel=qmodel, tokenizer=tokenizer, model_name="smollm2", artifact_dir=tmp_path)
    ours = {v.metric: v for v in Perplexity().run(ctx, PerplexityParams(protocol="llama.cpp", corpus=f"file:{corpus}",
                                                                        seq_len=n_ctx))}
    ppl, n, llama_tokens = llama_cpp_perplexity(qmodel.info["gguf_file"], text, n_ctx)
    assert n >= 2 * (n_ctx - 1 - n_ctx // 2) and ours["ppl"].n == n
    assert math.isclose(ours["ppl"].value, ppl, rel_tol=REL), (ours["ppl"].value, ppl)
