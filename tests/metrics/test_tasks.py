"""Downstream task scoring against hand computations (bigram fake model, character tokenizer),
the task files' prompt formats, and paired % recovery. Scores are taken in float32 on the model's
device (harness/metrics/scoring.py): hand computations in float64 agree to 1e-6 relative."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from harness.errors import HarnessError
from harness.metrics import tasks as T
from harness.metrics.base import CellContext
from harness.metrics.task_data import TASKS, Item, TaskSpec, parse_task, subset

V = 40


class CharTokenizer:
    bos_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % (V - 1) for c in text]}


class Bigram:
    def __init__(self, scale=2.0):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(1)) * scale

    def logits(self, ids):
        return self.table[ids]

    def logp(self, prev, tok):
        return float(torch.log_softmax(self.table[prev].double(), -1)[tok])


def ctx_for(tmp_path, model=None, reference_dir=None):
    return CellContext(qmodel=model or Bigram(), tokenizer=CharTokenizer(), model_name="bigram",
                       artifact_dir=tmp_path, reference_dir=reference_dir)


def test_encode_pair_moves_trailing_space():
    tok = CharTokenizer()
    c, t = T.encode_pair(tok, "Answer: ", "yes")
    assert c == tok("Answer:")["input_ids"] and t == tok(" yes")["input_ids"]


def test_score_requests_by_hand(tmp_path):
    model, tok = Bigram(), CharTokenizer()
    requests = [T.encode_pair(tok, ctx, cont) for ctx, cont in
                [("Question: a\nAnswer:", " a long answer"), ("Q", " b"), ("Some longer context here", " c d")]]
    # a tiny token budget forces batches of one; a large one pads three lengths into one batch
    for budget in (1, 10_000):
        scores = T.score_requests(ctx_for(tmp_path, model), requests, max_length=2048, batch_tokens=budget, what="t")
        for (c, t), (ll, greedy) in zip(requests, scores):
            seq = c + t
            expected = sum(model.logp(seq[i - 1], seq[i]) for i in range(len(c), len(seq)))
            assert math.isclose(ll, expected, rel_tol=1e-6)
            argmax = [int(model.table[seq[i - 1]].argmax()) for i in range(len(c), len(seq))]
            assert greedy == (argmax == t)
    # left truncation keeps the last max_length tokens of context + continuation
    ll, _ = T.score_requests(ctx_for(tmp_path, model), [requests[2]], max_length=5, batch_tokens=64, what="t")[0]
    c, t = requests[2]
    seq = (c + t)[-6:]
    assert math.isclose(ll, sum(model.logp(seq[i - 1], seq[i]) for i in range(6 - len(t), 6)), rel_tol=1e-6)
    with pytest.raises(HarnessError, match="longer than max_length"):
        T.score_requests(ctx_for(tmp_path, model), [requests[2]], max_length=3, batch_tokens=64, what="t")


def test_acc_and_acc_norm_by_hand():
    item = Item("x", (("q", " a much longer one"), ("q", " b")), gold=0)
    # choice 1 has the higher total log-likelihood, choice 0 the higher per-character one
    res = T.item_outcomes([item], [(-4.0, False), (-3.0, False)], greedy=False)
    assert res == {"acc": [0], "acc_norm": [1], "gold_ll": [-4.0]}
    cloze = Item("y", (("q", " w"),), gold=0)
    assert T.item_outcomes([cloze], [(-1.0, True)], greedy=True)["acc"] == [1]


def test_paired_recovery_by_hand():
    q = np.array([1, 1, 0, 1, 0, 1], dtype=float)
    r = np.array([1, 1, 1, 1, 0, 0], dtype=float)
    value, se = T.paired_recovery(q, r)
    mq, mr, n = q.mean(), r.mean(), q.size
    assert math.isclose(value, 100 * mq / mr)
    vq, vr = q.var(ddof=1) / n, r.var(ddof=1) / n
    c = ((q - mq) * (r - mr)).sum() / (n - 1) / n
    assert math.isclose(se, 100 * math.sqrt(vq / mr**2 + mq**2 * vr / mr**4 - 2 * mq * c / mr**3))
    # identical outcomes: 100% with no uncertainty at all (the pairing removes item noise)
    value, se = T.paired_recovery(r, r)
    assert value == pytest.approx(100.0) and se == pytest.approx(0.0, abs=1e-9)


@pytest.fixture
def toy_task(monkeypatch):
    items = [Item(str(i), (("Question: %d\nAnswer:" % i, " yes"), ("Question: %d\nAnswer:" % i, " no way")), gold=i % 2)
             for i in range(12)]
    monkeypatch.setitem(TASKS, "toy", TaskSpec(lambda k: items, norm=True, source="test"))
    return items


def test_tasks_measurement_and_recovery(tmp_path, toy_task):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    params = T.TasksParams(tasks=("toy",), limit=10)
    ref = {v.metric: v for v in T.Tasks().run(ctx_for(ref_dir), params)}
    saved = json.loads((ref_dir / "task-toy-0shot.json").read_text())
    assert len(saved["items"]) == 10 and saved["items"] == [it.id for it in subset("toy", toy_task, 10)]
    assert ref["acc@toy"].n == 10 and math.isclose(ref["acc@toy"].value, np.mean(saved["acc"]))
    assert math.isclose(ref["acc@toy"].uncertainty, np.std(saved["acc"], ddof=1) / math.sqrt(10))
    assert "recovery@toy" not in ref
    cand = {v.metric: v for v in T.Tasks().run(ctx_for(tmp_path, Bigram(0.5), ref_dir), params)}
    mine = json.loads((tmp_path / "task-toy-0shot.json").read_text())
    expected = T.paired_recovery(np.array(mine["acc_norm"], float), np.array(saved["acc_norm"], float))
    if expected is not None:
        assert cand["recovery@toy"].value == pytest.approx(expected[0]) and cand["recovery@toy"].params["of"] == "acc_norm"
        r, c = np.array(saved["acc_norm"], bool), np.array(mine["acc_norm"], bool)
        flip = cand["flip_rate@toy"]
        assert flip.params["correct_to_wrong"] == int((r & ~c).sum()) and flip.params["wrong_to_correct"] == int((~r & c).sum())
        assert flip.value == pytest.approx((r != c).mean()) and 0 <= flip.params["mcnemar_p"] <= 1
        assert cand["recovery@toy"].params["mde"] >= 100 * (6 / 10) / r.mean() - 1e-9  # 10 items: McNemar's floor
    # other items: no pairing
    other = {v.metric for v in T.Tasks().run(ctx_for(tmp_path, reference_dir=ref_dir), T.TasksParams(tasks=("toy",), limit=5))}
    assert "recovery@toy" not in other


def test_task_names_are_checked():
    assert parse_task("mmlu:5") == ("mmlu", 5)
    with pytest.raises(ValidationError, match="did you mean 'hellaswag'"):
        T.TasksParams(tasks=("helaswag",))
    with pytest.raises(ValidationError, match="no few-shot split"):
        T.TasksParams(tasks=("piqa:5",))


def test_subset_is_deterministic_and_spread():
    items = [Item(str(i), (("c", " x"),), 0) for i in range(1000)]
    a, b = subset("t", items, 50), subset("t", list(reversed(items)), 50)
    assert [i.id for i in a] == [i.id for i in b]
    assert max(int(i.id) for i in a) > 500  # not just the first 50


def test_task_files_and_prompt_formats():
    pytest.importorskip("pyarrow")
    first = {name: spec.load(0)[0] for name, spec in TASKS.items() if name != "mmlu"}
    assert first["hellaswag"].choices[0][0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert first["piqa"].choices[0][0].startswith("Question: ") and first["piqa"].choices[0][0].endswith("\nAnswer:")
    assert [c for _, c in first["boolq"].choices] == [" no", " yes"]
    assert first["winogrande"].choices[1] == ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")
    assert first["lambada"].choices[0][1] == " signs"
    for item in first.values():
        assert 0 <= item.gold < len(item.choices)
    shots = TASKS["mmlu"].load(2)
    assert len(shots) > 10_000
    prompt = shots[0].choices[0][0]
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert prompt.count("\nAnswer:") == 3 and [c for _, c in shots[0].choices] == [" A", " B", " C", " D"]


def test_report_section_renders_task_table():
    import pandas as pd

    from harness.results.records import Record
    from harness.reports.section_tasks import build

    ident = dict(suite="s", model="m", device="cpu", run_id="r", measurement="tasks", protocol=T.PROTOCOL)
    params = {"task": "piqa", "num_fewshot": 0, "limit": 30}
    recs = [Record(cell_id="fp", backend="fp", variant="float32", metric="acc@piqa", value=0.6, unit="fraction", n=30,
                   uncertainty=0.09, params=params, **ident),
            Record(cell_id="rtn", backend="rtn", variant="int4", metric="acc@piqa", value=0.5, unit="fraction", n=30,
                   uncertainty=0.09, params=params, **ident),
            Record(cell_id="rtn", backend="rtn", variant="int4", metric="recovery@piqa", value=83.3, unit="%", n=30,
                   uncertainty=7.0, params={**params, "mde": 4.0}, **ident)]
    df = pd.DataFrame([r.model_dump() for r in recs])
    section = build(df, {})
    table = section.tables[0]
    assert table.headers[5] == "acc ± se" and len(table.rows) == 2
    rtn = next(r for r in table.rows if r[1][0] == "rtn:int4")
    assert rtn[2][0] == "piqa" and rtn[5][0].startswith("0.5 ± ") and rtn[8][0].startswith("83.3 ± ")
    assert len(section.figures) == 1 and rtn[9][0] == "4"  # could see a 5-point drop: drawn
    weak = build(df.assign(params=[{**params, "mde": 40.0}] * len(df)), {})
    assert weak.figures == [] and "underpowered" in weak.notes[0] and "40 (underpowered)" in weak.tables[0].rows[1][9][0]
    assert build(df[df["measurement"] == "nothing"], {}) is None


def test_single_token_choices_share_one_forward(tmp_path):
    class Counting(Bigram):
        rows = 0

        def logits(self, ids):
            Counting.rows += ids.shape[0]
            return super().logits(ids)

    model, tok = Counting(), CharTokenizer()
    requests = [T.encode_pair(tok, "Answer:", f" {x}") for x in "ABCD"]  # " A" is two characters: 2 tokens here
    requests = [(c + t[:1], t[1:]) for c, t in requests]  # same context, one-token continuations
    scores = T.score_requests(ctx_for(tmp_path, model), requests, max_length=64, batch_tokens=1, what="t")
    assert Counting.rows == 1
    for (c, t), (ll, _) in zip(requests, scores):
        assert math.isclose(ll, model.logp(c[-1], t[0]), rel_tol=1e-6)


def test_suite_run_pairs_recovery_with_the_reference(tmp_path, harness_env):
    """Through the runner: the reference cell runs first, the other cell finds its per-item file."""
    from conftest import write_suite

    from harness.run.runner import run_suite
    from harness.results.run_dir import load_records
    from harness.run.suite import load_suite

    suite = write_suite(tmp_path / "s.yaml", """
        name: tiny-tasks
        models: [tiny:llama]
        device: cpu
        reference: fp:fp32
        backends:
          - name: fp
            variants: [{dtype: float32}]
          - name: rtn
            variants: [{bits: 2, group_size: 32}]
        measurements:
          - {name: tasks, tasks: [piqa, lambada], limit: 12, max_length: 256}
        """)
    run_suite(load_suite(str(suite)), out=tmp_path / "run")
    df = load_records(tmp_path / "run")
    assert (df[df.metric == "acc@piqa"].n == 12).all() and len(df[df.metric == "ppl@lambada"]) == 2
    rec = df[df.metric.str.startswith("recovery@")]
    assert (rec.variant != "fp32").all() and rec.params.map(lambda p: p["reference_cell"]).nunique() == 1
    # a recovery wherever the reference got any item right (random tiny weights: piqa yes, lambada likely not)
    ref_acc = df[(df.variant == "fp32") & df.metric.str.startswith("acc@")].set_index("metric").value
    expected = sorted(f"recovery@{m.split('@')[1]}" for m, v in ref_acc.items() if v > 0 and not m.startswith("acc_norm"))
    assert sorted(rec.metric) == expected and "recovery@piqa" in expected


def test_lm_eval_results_become_metric_values():
    from harness.metrics.lm_eval_bridge import LmEvalParams, local_rolling_task, to_values

    results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.05,
                                        "acc_norm,none": 0.55, "acc_norm_stderr,none": "N/A"}},
               "n-samples": {"arc_easy": {"original": 570, "effective": 100}}, "lm_eval_version": "0.4.13"}
    values = {v.metric: v for v in to_values(results, LmEvalParams(tasks=("arc_easy",), limit=100))}
    assert set(values) == {"lmeval_arc_easy_acc", "lmeval_arc_easy_acc_norm"}
    acc = values["lmeval_arc_easy_acc"]
    assert (acc.value, acc.uncertainty, acc.n, acc.protocol) == (0.5, 0.05, 100, "lm-eval 0.4.13")
    assert values["lmeval_arc_easy_acc_norm"].uncertainty is None
    assert "output_type: loglikelihood_rolling" in local_rolling_task("t", "/x/docs.jsonl")
