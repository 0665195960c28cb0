"""The report's frontier explorer: axis menu over every (quality metric, x axis) pair, Pareto front
in each axis's own direction (speed: higher is better)."""

from __future__ import annotations

import pandas as pd

from harness.results.records import Record
from harness.reports.section_frontier_explorer import build, explorer_figure


def _df() -> pd.DataFrame:
    rows = []
    for variant, ref, ppl, bits, tok_s in (("fp32", True, 10.0, 32, 10.0), ("int8", False, 10.05, 8.25, 20.0),
                                          ("int4", False, 11.2, 4.3, 30.0), ("bad", False, 12.0, 5.0, 15.0)):
        ident = dict(cell_id=variant, suite="s", model="m <b>", backend="rtn" if not ref else "fp", variant=variant,
                     device="cpu", is_reference=ref, run_id="r")
        rows += [Record(**ident, measurement="perplexity", metric="ppl", value=ppl, unit="ppl", uncertainty=0.05),
                 Record(**ident, measurement="perplexity", metric="nll", value=2.3, unit="nats/token"),
                 Record(**ident, measurement="footprint", metric="bits_per_weight", value=bits, unit="bits"),
                 Record(**ident, measurement="speed", metric="decode_tokens_s", value=tok_s, unit="tokens/s"),
                 Record(**ident, measurement="speed", metric="decode_tokens_s@b1", value=tok_s, unit="tokens/s")]
    return pd.DataFrame([r.model_dump() for r in rows])


def test_menu_offers_every_pair_and_front_follows_direction():
    fig = explorer_figure(_df(), "m <b>")
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["ppl vs bits/weight", "ppl vs decode tok/s"]  # no nll restatement, no speed as quality
    speed = fig.layout.updatemenus[0].buttons[1]
    visible = speed.args[0]["visible"]
    front = next(t for t, v in zip(fig.data, visible) if v and t.name == "Pareto front")
    assert sorted(front.x) == [10.0, 20.0, 30.0]  # 'bad' (15 tok/s, ppl 12) is dominated by int8 (faster, better)
    bits = fig.layout.updatemenus[0].buttons[0].args[0]["visible"]
    front_bits = next(t for t, v in zip(fig.data, bits) if v and t.name == "Pareto front")
    assert sorted(front_bits.x) == [4.3, 8.25, 32.0]
    assert "&lt;b&gt;" in fig.layout.title.text  # record text is escaped in the figure


def test_section_absent_without_two_pairs():
    df = _df()
    assert build(df[df["metric"] != "decode_tokens_s"], {}) is None  # ppl vs bits alone: the frontier above has it
    assert build(df, {}).title == "Frontier explorer"
