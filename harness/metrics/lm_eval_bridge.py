"""Any lm-evaluation-harness task on a cell's quantized model (the `lm-eval` measurement).

lm-eval is optional and imported only here, when the measurement runs: `pip install lm-eval`
(in the `test` extra). The quantized torch module is wrapped in lm-eval's own HFLM, so lm-eval's
prompts, tokenization, batching and metrics apply unchanged; its task data must be present
(downloaded or in the Hugging Face cache; offline runs need local-file tasks, see
`local_rolling_task`). Every number lm-eval reports for a task becomes a MetricValue named
`lmeval_<task>_<metric>` with lm-eval's stderr and sample count. Backends without a torch module
(llama.cpp) are refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import quality


class LmEvalParams(MeasurementParams):
    tasks: tuple[str, ...] = Field(min_length=1)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="documents per task (lm-eval's first `limit`)")
    include_path: str | None = Field(None, description="folder of extra task YAMLs (e.g. local-file tasks)")
    max_length: int | None = Field(None, gt=1, description="HFLM max_length (None: lm-eval's default for the model)")
    batch_size: int = Field(1, gt=0)


def local_rolling_task(name: str, jsonl: str | Path) -> str:
    """The YAML of a `loglikelihood_rolling` task over a local JSONL file with a `text` field
    (word/byte perplexity and bits-per-byte, as lm-eval's wikitext task)."""
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {Path(jsonl).resolve()}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("the lm-eval measurement needs lm-eval: pip install lm-eval") from None
    return lm_eval, HFLM, TaskManager


def to_values(results: dict, params: LmEvalParams) -> list[MetricValue]:
    """lm-eval's results dict -> one MetricValue per (task, metric)."""
    out = []
    for task, metrics in results.get("results", {}).items():
        n = (results.get("n-samples", {}).get(task) or {}).get("effective")
        for key, value in metrics.items():
            metric, _, flt = key.partition(",")
            if metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr,{flt}")
            se = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
            better = (results.get("higher_is_better", {}).get(task) or {}).get(metric)
            out.append(MetricValue(f"lmeval_{task}_{metric}", float(value), metric, n=n, uncertainty=se,
                                   direction=None if better is None else (1 if better else -1),
                                   uncertainty_kind="stderr (lm-eval)" if se is not None else None,
                                   protocol=f"lm-eval {results.get('lm_eval_version', '')}".strip(),
                                   params={**params.model_dump(), "task": task, "filter": flt}))
    return out


class LmEval(Measurement):
    name = "lm-eval"
    # lm-eval says per metric whether higher is better (MetricValue.direction, from its results)
    metrics = (quality("lmeval_*", 0),)
    Params = LmEvalParams

    def run(self, ctx: CellContext, params: LmEvalParams) -> list[MetricValue]:
        lm_eval, HFLM, TaskManager = _lm_eval()
        module = ctx.qmodel.module
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            raise HarnessError("the lm-eval measurement needs a torch model; this backend runs outside torch "
                               "(e.g. llamacpp): use the perplexity/tasks measurements instead")
        kwargs = {"max_length": params.max_length} if params.max_length else {}
        lm = HFLM(pretrained=module, tokenizer=ctx.tokenizer, backend="causal", batch_size=params.batch_size,
                  device=str(ctx.qmodel.device), **kwargs)
        manager = TaskManager(include_path=params.include_path) if params.include_path else TaskManager()
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=list(params.tasks), num_fewshot=params.num_fewshot,
                                              limit=params.limit, task_manager=manager, log_samples=False)
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise HarnessError(f"lm-eval could not run {list(params.tasks)}: {type(exc).__name__}: {exc}") from None
        results = {**results, "lm_eval_version": _version()}
        return to_values(results, params)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return ""
