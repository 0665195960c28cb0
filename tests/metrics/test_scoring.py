"""The device scorer (harness/metrics/scoring.py) against the plain float64 definitions on the host:
NLL, KLD, top-1 and delta-p; the same results at every batch size; one forward for rows that
read the same tokens; the output head only at scored positions; out-of-memory back-off; the
reference store records only what comparing cells will read."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.adapters import get_adapter
from harness.adapters.base import QuantizedModel
from harness.errors import HarnessError
from harness.metrics.divergence import token_divergence
from harness.metrics.perplexity import token_nll
from harness.metrics.scoring import GPU_HEAD_BYTES, HEAD_BYTES, ReferenceStore, Row, Scorer, row_key, window_row

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fp32 QuantizedModel, int4 QuantizedModel, windows (6, 48)) of the random tiny Llama."""
    import os

    os.environ["QHARNESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from harness.models.zoo import load_model, resolve_model

    source = resolve_model("tiny:llama")
    fp = get_adapter("fp")
    ref = fp.quantize(load_model(source)[0], fp.parse_variant({"dtype": "float32"}), None, CPU)
    rtn = get_adapter("rtn")
    q = rtn.quantize(load_model(source)[0], rtn.parse_variant({"bits": 3, "group_size": 32}), None, CPU)
    torch.manual_seed(0)
    return ref, q, torch.randint(1, 256, (6, 48))


def _host_nll(model: QuantizedModel, windows: torch.Tensor) -> np.ndarray:
    return token_nll(model.logits(windows), windows).numpy()


def test_nll_equals_the_float64_host_path(tiny) -> None:
    ref, _, windows = tiny
    scores = Scorer(ref).windows(windows)
    nll = np.stack([s.nll for s in scores])
    host = _host_nll(ref, windows)
    assert nll.dtype == np.float64 and nll.shape == host.shape
    np.testing.assert_allclose(nll, host, rtol=1e-5, atol=1e-6)
    assert math.isclose(math.exp(nll.mean()), math.exp(host.mean()), rel_tol=1e-6)
    greedy = np.stack([s.greedy for s in scores])
    assert (greedy == (ref.logits(windows)[:, :-1].argmax(-1) == windows[:, 1:]).numpy()).all()


def test_the_head_runs_only_where_scored_and_is_checked(tiny) -> None:
    ref, _, windows = tiny
    scorer = Scorer(ref)
    assert scorer.head.split is not None  # a transformers causal LM: decoder + lm_head, checked on 8 tokens
    calls = []
    head = scorer.head.split[1]
    handle = head.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        scorer.windows(windows, first_scored=40)  # llama.cpp-style: only the last 7 positions scored
    finally:
        handle.remove()
    assert sum(calls) == windows.shape[0] * 7


class _OwnLogits(QuantizedModel):
    """An adapter model with its own logits (like llama.cpp): the scorer must use them whole."""

    def logits(self, input_ids):
        return super().logits(input_ids) * 1.0


def test_models_with_their_own_logits_are_scored_through_them(tiny) -> None:
    ref, _, windows = tiny
    own = _OwnLogits(ref.module, CPU)
    scorer = Scorer(own)
    assert scorer.head.split is None
    nll = np.stack([s.nll for s in scorer.windows(windows)])
    np.testing.assert_allclose(nll, _host_nll(ref, windows), rtol=1e-5, atol=1e-6)


def test_results_do_not_move_with_batch_size(tiny) -> None:
    ref, q, windows = tiny
    store = ReferenceStore(_tmp())
    Scorer(ref, record=store, record_keys={row_key(window_row(w)) for w in windows}).windows(windows)
    rows = [Row.of(w[: 10 + 5 * i], w[10 + 5 * i - 3: 10 + 5 * i]) for i, w in enumerate(windows)]  # ragged rows
    one = Scorer(q, reference=store)
    many = Scorer(q, reference=store)
    a = one.windows(windows, batch_tokens=47, need_reference=True) + one.rows(rows, batch_tokens=1)
    b = many.windows(windows, batch_tokens=4096, need_reference=True) + many.rows(rows, batch_tokens=4096)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.nll, y.nll, rtol=1e-6, atol=1e-6)
        assert (x.greedy == y.greedy).all()
    for x, y in zip(a[:6], b[:6]):
        np.testing.assert_allclose(x.kld, y.kld, rtol=1e-5, atol=1e-7)
        assert (x.top1 == y.top1).all()
        np.testing.assert_allclose(x.delta_p, y.delta_p, atol=1e-7)


def test_stored_reference_divergence_equals_the_live_float64_one(tiny) -> None:
    ref, q, windows = tiny
    store = ReferenceStore(_tmp())
    keys = {row_key(window_row(w)) for w in windows[:4]}
    Scorer(ref, record=store, record_keys=keys).windows(windows)  # all six scored, four recorded
    assert sorted(p.stem for p in store.folder.glob("*.npz")) == sorted(keys)
    scores = Scorer(q, reference=store).windows(windows[:4], need_reference=True)
    kld, agree, dp = (t.numpy() for t in token_divergence(ref.logits(windows[:4]), q.logits(windows[:4]), windows[:4]))
    ours = np.concatenate([s.kld for s in scores])
    np.testing.assert_allclose(ours, kld, rtol=2e-3, atol=2e-5)
    assert math.isclose(ours.mean(), kld.mean(), rel_tol=1e-3)
    assert (np.concatenate([s.top1 for s in scores]) == agree).all()
    np.testing.assert_allclose(np.concatenate([s.delta_p for s in scores]), dp, atol=1e-6)
    with pytest.raises(HarnessError, match="the reference stored no log-probabilities for 2 of 6 rows"):
        Scorer(q, reference=store).windows(windows, what="divergence windows", need_reference=True)


def test_head_chunks_that_cross_rows_read_the_right_stored_positions(tiny, monkeypatch) -> None:
    """The stored reference is cut per head chunk without stacking the batch's rows first: chunks
    of 13 positions straddle rows of 47, and rows without a stored reference sit between rows with
    one; every position's divergence still equals the one-chunk-per-batch result."""
    from harness.metrics import scoring

    ref, q, windows = tiny
    store = ReferenceStore(_tmp())
    keys = {row_key(window_row(w)) for w in windows[[0, 2, 3, 5]]}
    Scorer(ref, record=store, record_keys=keys).windows(windows)
    whole = Scorer(q, reference=store).windows(windows)
    monkeypatch.setattr(scoring, "HEAD_BYTES", 13 * 4 * 256)  # the tiny model's vocabulary: 256
    cut = Scorer(q, reference=store).windows(windows)
    for a, b, w in zip(whole, cut, windows):
        assert (a.kld is None) == (b.kld is None) == (row_key(window_row(w)) not in keys)
        if a.kld is not None:
            np.testing.assert_allclose(b.kld, a.kld, rtol=1e-5, atol=1e-7)
            assert (a.top1 == b.top1).all()
            np.testing.assert_allclose(b.delta_p, a.delta_p, atol=1e-7)
        np.testing.assert_allclose(b.nll, a.nll, rtol=1e-6, atol=1e-7)


def test_one_pass_per_window_across_measurements(tiny) -> None:
    ref, q, windows = tiny
    store = ReferenceStore(_tmp())
    Scorer(ref, record=store, record_keys={row_key(window_row(w)) for w in windows[:2]}).windows(windows[:2])
    scorer = Scorer(q, reference=store)
    scorer.windows(windows)  # perplexity: six windows, two with a stored reference -> KLD computed on the way
    read = scorer.stats.forward_tokens
    again = scorer.windows(windows[:2], need_reference=True)  # divergence: nothing left to run
    assert scorer.stats.forward_tokens == read and scorer.stats.cached_rows == 2
    assert all(s.kld is not None for s in again)


def test_rows_that_read_the_same_tokens_share_a_forward(tiny) -> None:
    ref, _, windows = tiny
    ctx = windows[0, :20]
    rows = [Row.of(ctx, [int(t)]) for t in (3, 7, 11, 250)]  # four single-token answers of one question
    scorer = Scorer(ref)
    scores = scorer.rows(rows)
    assert scorer.stats.forward_tokens == 20 and scorer.stats.scored == 4
    lp = torch.log_softmax(ref.logits(ctx[None])[0, -1].double(), -1)
    assert np.allclose([s.nll[0] for s in scores], [-lp[t].item() for t in (3, 7, 11, 250)], atol=1e-5)


def test_out_of_memory_halves_the_batch_and_keeps_results(tiny, monkeypatch) -> None:
    ref, _, windows = tiny
    scorer = Scorer(ref)
    real = scorer.head.features
    sizes = []

    def tight(ids):
        sizes.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(ids)

    monkeypatch.setattr(scorer.head, "features", tight)
    nll = np.stack([s.nll for s in scorer.windows(windows, batch_tokens=47 * 6)])
    assert sizes[:2] == [6, 3] and max(sizes[2:]) <= 2
    np.testing.assert_allclose(nll, _host_nll(ref, windows), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(scorer.head, "features", lambda ids: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    with pytest.raises(HarnessError, match="out of device memory scoring one row of 47 tokens"):
        Scorer.__dict__["rows"](scorer, [window_row(windows[0] + 1)])


def test_head_chunks_are_bounded() -> None:
    # a 128k vocabulary: 128 positions a chunk = 64 MB of float32 logits (CPU), 512 = 256 MB (GPU)
    assert max(1, HEAD_BYTES // (4 * 131072)) == 128
    assert max(1, GPU_HEAD_BYTES // (4 * 131072)) == 512


@pytest.mark.slow
def test_smollm2_perplexity_and_divergence_equal_the_host_path(tmp_path) -> None:
    """On the embedded model (49,152-token vocabulary): ppl within 1e-6 relative of the float64
    host path; KLD from the stored 16-bit reference within 0.1% of the live float64 KLD."""
    from conftest import smollm2_eval_windows

    model, _, windows = smollm2_eval_windows(3, 256)
    fp32 = QuantizedModel(model, CPU)
    ref_logits = fp32.logits(windows)
    host = token_nll(ref_logits, windows).numpy()
    store = ReferenceStore(tmp_path)
    scores = Scorer(fp32, record=store, record_keys={row_key(window_row(w)) for w in windows}).windows(windows)
    nll = np.concatenate([s.nll for s in scores])
    assert abs(math.exp(nll.mean()) / math.exp(host.mean()) - 1) < 1e-6
    np.testing.assert_allclose(nll, host.reshape(-1), rtol=1e-4, atol=2e-5)
    rtn = get_adapter("rtn")
    q = rtn.quantize(model, rtn.parse_variant({"bits": 4, "group_size": 64}), None, CPU)  # in place
    kld_live = token_divergence(ref_logits, q.logits(windows), windows)[0].numpy()
    kld = np.concatenate([s.kld for s in Scorer(q, reference=store).windows(windows, need_reference=True)])
    assert abs(kld.mean() / kld_live.mean() - 1) < 1e-3, (kld.mean(), kld_live.mean())


def _tmp():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="qh-store-"))


def test_measurements_do_not_move_with_batch_size(tmp_path) -> None:
    """Perplexity, divergence and tasks through their measurements, at a batch of one window (or
    one task request) and at a batch of everything: equal to 1e-6 relative on CPU fp32."""
    import os

    from harness.metrics.base import CellContext
    from harness.metrics.divergence import Divergence, DivergenceParams
    from harness.metrics.perplexity import Perplexity, PerplexityParams
    from harness.metrics.scoring import cell_scorer, declare_reference_windows
    from harness.metrics.tasks import Tasks, TasksParams
    from harness.models.zoo import load_model, resolve_model

    os.environ.setdefault("QHARNESS_CACHE", str(tmp_path / "cache"))
    source = resolve_model("tiny:llama")
    fp, rtn = get_adapter("fp"), get_adapter("rtn")
    model, tok = load_model(source)
    ref = fp.quantize(model, fp.parse_variant({"dtype": "float32"}), None, CPU)
    q = rtn.quantize(load_model(source)[0], rtn.parse_variant({"bits": 3, "group_size": 32}), None, CPU)

    def measure(batch_tokens, folder):
        ref_dir, cell_dir = folder / "ref", folder / "q"
        ref_dir.mkdir(parents=True)
        cell_dir.mkdir()
        ppl = (Perplexity(), PerplexityParams(protocol="gptq", seq_len=32, max_windows=4, batch_tokens=batch_tokens))
        div = (Divergence(), DivergenceParams(seq_len=32, max_windows=3, batch_tokens=batch_tokens))
        tasks = (Tasks(), TasksParams(tasks=("piqa",), limit=6, batch_tokens=batch_tokens))
        out = {}
        for qmodel, folder_, is_ref in ((ref, ref_dir, True), (q, cell_dir, False)):
            ctx = CellContext(qmodel=qmodel, tokenizer=tok, model_name="tiny:llama", artifact_dir=folder_,
                              reference_dir=None if is_ref else ref_dir, is_reference=is_ref,
                              scorer=cell_scorer(qmodel, folder_, None if is_ref else ref_dir, is_ref))
            declare_reference_windows(ctx, [ppl, div, tasks])
            for m, p in (ppl, div, tasks):
                out |= {(is_ref, v.metric): v.value for v in m.run(ctx, p)}
        return out

    one, many = measure(1, tmp_path / "one"), measure(1 << 16, tmp_path / "many")
    assert one.keys() == many.keys() and (False, "kld_mean") in one and (False, "acc@piqa") in one
    for key in one:
        assert one[key] == pytest.approx(many[key], rel=1e-6, abs=1e-9), key


def test_warm_up_is_gpu_only_and_a_model_that_cannot_score_does_not_fail_it(tiny) -> None:
    ref, _, _ = tiny
    assert Scorer(ref).warm_up() == 0.0  # CPU: nothing to warm

    class ImageModel:  # on "cuda", but it takes no token rows
        device = "cuda"

        def logits(self, ids):
            raise TypeError("expects images")

    scorer = Scorer(ImageModel())
    assert scorer.warm_up() >= 0.0 and scorer.stats.forward_tokens == 0 and scorer.stats.scored == 0
