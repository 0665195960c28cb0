"""The adapter contract: one quantization backend behind one interface.

An adapter declares its variants as a pydantic model (the knobs users know from the library),
says whether it can run here (`availability`), rejects variants that cannot work on a model's
shapes before any work starts (`check`), and turns a float model into a `QuantizedModel`."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from harness.errors import HarnessError
from harness.models.encoders import pool, pooling_config
from harness.weights.footprint import linear_weight_stats, module_bytes


class VariantConfig(BaseModel):
    """Base of every adapter's variant schema; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def label(self) -> str:
        """Short human label, e.g. 'int4-g64-asym'."""
        return "-".join(f"{v}" for v in self.model_dump(exclude_none=True).values())


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = "available"

    @classmethod
    def missing(cls, package: str, extra: str | None = None) -> Availability:
        hint = f" (pip install 'qharness[{extra}]')" if extra else ""
        return cls(False, f"{package} is not installed{hint}")

    @classmethod
    def of_import(cls, module: str, package: str, extra: str | None = None) -> Availability:
        """Available if `module` imports; else 'not installed' or, for a broken install (e.g. a
        native library that fails to load), why, in one line."""
        import importlib

        try:
            importlib.import_module(module)
        except ImportError as exc:
            if getattr(exc, "name", None) and module.startswith(exc.name.split(".")[0]):
                return cls.missing(package, extra)
            return cls(False, f"{package} failed to import: {str(exc).splitlines()[0]}")
        except Exception as exc:  # noqa: BLE001
            return cls(False, f"{package} failed to import: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return cls(True)


def all_available(modules: tuple[tuple[str, str], ...], extra: str | None = None) -> Availability:
    """The first (module, package) that does not import, or available: for backends that need several."""
    for module, package in modules:
        found = Availability.of_import(module, package, extra)
        if not found.ok:
            return found
    return Availability(True)


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelShapes:
    """What `check` needs to know about a model without loading its weights."""

    linears: tuple[LinearShape, ...]
    hidden_size: int | None = None
    architecture: str | None = None
    source: Any = field(default=None, compare=False)  # harness.models.zoo.ModelSource: where weights come from
    task: str = "causal-lm"  # or "encoder": adapters and measurements declare which they handle

    def targets(self, skip: tuple[str, ...] = ("lm_head",)) -> list[LinearShape]:
        return [s for s in self.linears if s.name.split(".")[-1] not in skip]


def check_group_size(backend: str, group_size: int | None, shapes: ModelShapes) -> None:
    """One line naming the first target layer whose width `group_size` does not divide, with
    group sizes that would fit (e.g. SmolLM2's 576-wide layers refuse g128; g64 and g32 fit)."""
    if group_size is None:
        return

    targets = shapes.targets()
    for s in targets:
        if s.in_features % group_size:
            common = math.gcd(*(t.in_features for t in targets))
            fits = [g for g in (2**k for k in range(12, 2, -1)) if common % g == 0]
            options = ([g for g in fits if g < group_size] or fits)[:2]
            hint = f"try {' or '.join(map(str, options))}" if options else "no power-of-two group size >= 8 fits"
            raise HarnessError(f"{backend}: group_size {group_size} does not divide in_features "
                               f"{s.in_features} of {s.name} ({hint})")


@dataclass
class CalibrationSet:
    """Token windows a calibrated quantizer may use, drawn from a split evaluation never uses."""

    corpus: str
    n_samples: int
    seq_len: int
    seed: int
    input_ids: torch.Tensor  # (n_samples, seq_len) int64
    starts: list[int] | None = None  # each window's offset in the calibration stream, where known
    stream_tokens: int | None = None  # the calibration stream's length: windows overlap as they near it

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.corpus, "n_samples": self.n_samples, "seq_len": self.seq_len, "seed": self.seed}


@dataclass
class QuantizedModel:
    """A model ready for measurement. Weight bytes are counted from storage, not asked of the
    library; adapters whose storage hides outside parameters/buffers override the counts."""

    module: torch.nn.Module
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)
    # Extra keyword arguments for `module.generate` and cache construction wherever a measurement
    # decodes (drift, decode speed): e.g. a quantized KV cache is a setting of generation, not weights.
    generate_kwargs: dict[str, Any] = field(default_factory=dict)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """float32 logits of shape (batch, seq, vocab) for int64 token ids."""
        out = self.module(input_ids=input_ids.to(self.device), use_cache=False)
        return out.logits.float()

    @torch.inference_mode()
    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 sentence vectors (batch, dim) of a sentence encoder for a tokenized batch
        (harness.models.encoders.tokenize), pooled as the model's own pooling config says."""
        hidden = self.module(**{k: v.to(self.device) for k, v in batch.items()}).last_hidden_state
        return pool(hidden.float().cpu(), batch["attention_mask"], **pooling_config(self.module))

    def new_cache(self) -> Any:
        """The KV cache object `generate` should use, for adapters whose cache is their own (a quantized
        KV cache, adapters/kvcache.py); None: the measurement builds transformers' default."""
        return None

    def greedy_continuations(self, prompts: torch.Tensor, new_tokens: int, eos: int | None) -> list[list[int]] | None:
        """Greedy continuations of prompts (k, len), each cut after its first EOS, for models whose
        runtime decodes outside torch's `generate` (llama.cpp, with its own KV cache); None: use
        `module.generate` (harness.metrics.drift.greedy)."""
        return None

    def evaluating(self) -> contextlib.AbstractContextManager:
        """What a quality measurement's passes run under (the cell's Scorer: perplexity, divergence,
        drift's window, tasks; and drift's greedy continuations): an adapter may make them cheaper
        without changing a logit (rtn: each weight dequantized once per call instead of once per
        forward). Byte counts and speed measurements never run under it: they see the model as it
        is. Default: nothing."""
        return contextlib.nullcontext()

    def native_kv_cache_bytes(self, input_ids: torch.Tensor) -> int | None:
        """Bytes of the KV cache after prefilling `input_ids` (1, N), for models whose cache lives
        outside torch (llama.cpp); None: a transformers cache, measured by harness.metrics.kvcache."""
        return None

    def extra_tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """Tensors a library keeps outside a module's parameters and buffers (override)."""
        return []

    def weight_bytes(self) -> int:
        return module_bytes(self.module, self.extra_tensors)

    def linear_stats(self) -> tuple[int, int]:
        """(logical weights, stored bytes) of the linear layers quantizers target."""
        return linear_weight_stats(self.module, extra=self.extra_tensors)

    def bits_per_weight(self) -> float:
        n_weights, n_bytes = self.linear_stats()
        return 8.0 * n_bytes / n_weights if n_weights else float("nan")


class Adapter(ABC):
    """Subclasses set `name`, `Variant`, optionally `extra` (the pip extra that installs them)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    extra: ClassVar[str | None] = None
    Variant: ClassVar[type[VariantConfig]]
    needs_calibration: ClassVar[bool] = False
    packages: ClassVar[tuple[str, ...]] = ()  # distributions whose versions go into provenance
    tasks: ClassVar[tuple[str, ...]] = ("causal-lm",)  # model kinds it handles; others are refused at plan time

    def availability(self, device: str = "cpu") -> Availability:
        return Availability(True)

    def environment_notes(self, device: str) -> list[str]:
        """Lines `harness env` prints about how this backend runs here (e.g. a native runtime's
        choice of kernels on this CPU); only asked of available backends."""
        return []

    def variant_needs_calibration(self, variant: VariantConfig) -> bool:
        """Whether this variant uses calibration windows (quanto: only its activation variants)."""
        return self.needs_calibration

    def variant_availability(self, variant: VariantConfig, device: str) -> Availability:
        """Whether this variant can run on `device` (e.g. a CUDA-only scheme on a CPU machine).
        Unlike `check`, a 'no' here skips the cell with its reason instead of failing the suite:
        one suite can then hold GPU and CPU variants and run wherever it is."""
        return Availability(True)

    def versions(self) -> dict[str, str]:
        """Versions of torch and of `packages` (recorded with every result)."""
        from importlib import metadata

        out = {"torch": torch.__version__}
        for package in self.packages:
            try:
                out[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                out[package] = "not installed"
        return out

    def parse_variant(self, params: dict[str, Any]) -> VariantConfig:
        return self.Variant.model_validate(params)

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        """Raise HarnessError if `variant` cannot work on a model with these shapes."""

    @abstractmethod
    def quantize(
        self,
        model: torch.nn.Module,
        variant: VariantConfig,
        calibration: CalibrationSet | None,
        device: torch.device,
    ) -> QuantizedModel: ...
