"""What the stored reference costs in KLD accuracy: the 16-bit full-vocabulary store the
harness uses (harness/metrics/scoring.py) and, for the record, top-k stores with the rest of the
vocabulary as one bucket (the compact alternative the engine issue allowed), against the exact
float64 KLD of the old live path.

On the embedded SmolLM2-135M (fp32 reference) and the llm-int4 suite's divergence windows
(boolq-wiki eval split, 4 x 512 tokens), for several quantized variants: the exact mean KLD over
the whole 49,152-token vocabulary, each store's estimate, the relative difference, the largest
per-token difference, the mean probability mass outside the reference's top k, and bytes stored
per position. Top-1 agreement and delta-p of the store are checked equal to the live ones.

    python benchmarks/reference_store.py [--windows 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness.adapters import get_adapter
from harness.models.corpora import eval_token_stream
from harness.metrics.divergence import token_divergence
from harness.metrics.scoring import ReferenceStore, Scorer, row_key, window_row
from harness.models.zoo import load_model, resolve_model
from harness.results.provenance import collect

VARIANTS = [("rtn", {"bits": 8, "sym": True}), ("hqq", {"bits": 4, "group_size": 64}), ("rtn", {"bits": 4, "group_size": 64}),
            ("rtn", {"bits": 4}), ("rtn", {"bits": 3, "group_size": 64})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    prov = collect("cpu")
    print(f"# {prov['git_sha']} {prov['cpu']} torch {prov['versions'].get('torch')}")
    source = resolve_model("builtin:smollm2-135m")
    fp32 = get_adapter("fp").quantize(load_model(source)[0], get_adapter("fp").parse_variant({"dtype": "float32"}), None,
                                      torch.device("cpu"))
    _, tok = load_model(source)
    stream = eval_token_stream(tok, "boolq-wiki", args.windows * args.seq_len)
    windows = stream.view(args.windows, args.seq_len)
    ref_logits = torch.cat([fp32.logits(w[None]) for w in windows])
    print(f"windows {args.windows} x {args.seq_len} (boolq-wiki eval), vocabulary {ref_logits.shape[-1]}")
    ref_logp = torch.log_softmax(ref_logits[:, :-1].double(), -1)
    with tempfile.TemporaryDirectory() as tmp:
        store = ReferenceStore(Path(tmp))
        Scorer(fp32, record=store, record_keys={row_key(window_row(w)) for w in windows}).windows(windows)
        n_tok = args.windows * (args.seq_len - 1)
        print(f"{'variant':24s} {'store':>10s} {'exact KLD':>11s} {'stored KLD':>11s} {'rel. diff':>10s} "
              f"{'max |d|/tok':>11s} {'tail mass':>9s} {'bytes/tok':>9s}")
        for backend, params in VARIANTS:
            adapter = get_adapter(backend)
            variant = adapter.parse_variant(params)
            q = adapter.quantize(load_model(source)[0], variant, None, torch.device("cpu"))
            q_logits = torch.cat([q.logits(w[None]) for w in windows])
            exact, agree, dp = (t.numpy() for t in token_divergence(ref_logits, q_logits, windows))
            scores = Scorer(q, reference=store).windows(windows, need_reference=True)
            kld = np.concatenate([s.kld for s in scores])
            assert (np.concatenate([s.top1 for s in scores]) == agree).mean() > 0.999
            assert np.abs(np.concatenate([s.delta_p for s in scores]) - dp).max() < 1e-5
            rows = [(f"{backend}:{variant.label()}", "16-bit", kld, 0.0, store.bytes() / n_tok)]
            q_logp = torch.log_softmax(q_logits[:, :-1].double(), -1)
            for k in (64, 256):  # top-k + one-bucket tail, computed here from the live distributions
                top_lp, top_ids = ref_logp.topk(k, -1)
                q_top = q_logp.gather(-1, top_ids)
                p_tail = (1 - top_lp.exp().sum(-1)).clamp_min(0)
                q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-30)
                est = (top_lp.exp() * (top_lp - q_top)).sum(-1) + p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log())
                rows.append((f"{backend}:{variant.label()}", f"top-{k}", est.flatten().numpy(), float(p_tail.mean()),
                             k * 8 + 8))
            for name, store_name, est, tail, per_tok in rows:
                print(f"{name:24s} {store_name:>10s} {exact.mean():11.6f} {est.mean():11.6f} "
                      f"{(est.mean() - exact.mean()) / exact.mean():+10.3%} {np.abs(est - exact).max():11.2e} "
                      f"{tail:9.4f} {per_tok:9.0f}")

if __name__ == "__main__":
    main()
