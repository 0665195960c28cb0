"""A measurement added the way a newcomer adds one: this file (the metric declared where it is
made) plus one registry line (here the suite names it by import path). tests/metrics/test_meaning.py
checks that it then shows in the cell table, the frontier explorer and the default regression
gate with no other file touched.

toy_score = the fraction of the first 64 boolq-wiki tokens the model predicts greedily, minus
$QHARNESS_TOY_PENALTY (a regression simulated without changing the cell's identity)."""

from __future__ import annotations

import math
import os

from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec, quality


class ToyParams(MeasurementParams):
    undeclared: bool = False  # also emit a metric that is not declared (the worker must refuse it)


class Toy(Measurement):
    name = "toy"
    Params = ToyParams
    metrics = (quality("toy_score", +1, headline="Toy score", samples="tokens"), MetricSpec("toy_note", 0, "diagnostic"))

    def run(self, ctx: CellContext, params: ToyParams) -> list[MetricValue]:
        from harness.models.corpora import eval_token_stream

        ids = eval_token_stream(ctx.tokenizer, "boolq-wiki", 65)[:65]
        scores = ctx.scorer.windows(ids[None], what="toy")[0]
        hit = float(scores.greedy.mean()) - float(os.environ.get("QHARNESS_TOY_PENALTY", "0"))
        n = int(scores.greedy.size)
        out = [MetricValue("toy_score", hit, "fraction", n=n, uncertainty=max(1e-3, math.sqrt(0.25 / n) / 100),
                           uncertainty_kind="stderr (toy)", protocol="toy"),
               MetricValue("toy_note", 1.0, "", protocol="toy")]
        if params.undeclared:
            out.append(MetricValue("mystery", 0.0, "", protocol="toy"))
        return out
