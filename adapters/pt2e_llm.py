"""PyTorch 2 export (pt2e) INT8 with `X86InductorQuantizer` on a causal LM (backend `pt2e-llm`).

The vision path (`adapters/pt2e.py`, backend `pt2e`) reads its images from the model's own
calibration split; this one reads the suite's `calibration:` token windows, so it is its own
backend (whether a cell gets calibration windows is decided by the variant, before any model is
loaded). Same quantizer, same recipe, same byte counting:

    decoder = model.model                                   # the transformer body; lm_head stays float
    exported = torch.export.export(Body(decoder), (ids,), dynamic_shapes=({0: batch, 1: seq},)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)            # observers on the linears' inputs and weights
    for windows in calibration batches: prepared(windows)   # the suite's calibration windows (token ids)
    converted = convert_pt2e(prepared)                      # int8 weight constants + q/dq around the activations

What is exported: the decoder body, `input_ids (batch, seq) -> last hidden state`, with batch
(1..4096) and sequence (1..max_position_embeddings) dynamic; no attention mask (the causal mask is
built inside the graph), no KV cache. The output head (lm_head, tied to the embedding in SmolLM2)
is kept in float32 outside the graph, as every LLM adapter here keeps it; the harness applies it
at the scored positions only (harness/metrics/scoring.py), exactly as for a transformers model:
the wrapper (`ExportedCausalLM`) offers `get_decoder()` / `get_output_embeddings()` and a forward
that returns `.logits`.

The recipe (`set_global`, the library's default): every linear gets int8 per-output-channel
symmetric weights (PerChannelMinMaxObserver) and uint8 per-tensor affine input activations
(HistogramObserver over the calibration windows; `activations: dynamic` uses
`get_default_x86_inductor_quantization_config(is_dynamic=True)`: a per-tensor scale computed
from every input at run time, no calibration); the recipe also quantizes both inputs of the
SwiGLU product (`aten.mul`). X86InductorQuantizer has no per-channel or per-token activation
option (its int8 kernels take one activation scale per tensor). `keep_float: [down_proj]` leaves
the named linears in float through `set_module_name_qconfig(name, None)`, the quantizer's own knob.

`lower: none` (default) runs the converted graph as it is: reference q/dq arithmetic in float32
(the numbers int8 kernels would give, not their speed). `lower: inductor` compiles it with
`torch.compile(dynamic=True)` and `freezing`, as the x86 tutorial does, so Inductor can fuse the
q/dq patterns into oneDNN int8 kernels; see docs/VISION.md for what it cost here.

Bytes are counted as for the vision path (adapters/pt2e.py `count_converted`): `weight_bytes`
is the tensors the converted graph reads through `get_attr` (int8 weights, their float32 scales
and int64 zero points as torchao stores them, the float embedding and norms) plus the float
lm_head, each storage once (SmolLM2's head is the embedding: counted once); the float weights the
graph still holds but never reads are reported as `unread_tensor_bytes` in the backend info.
`linear_stats` (bits per weight) follows every linear's weight input through its dequantize op to
the int8 constant and its scales and zero points; a linear kept float counts its float32 weight.

No KV cache: drift's greedy decoding falls back to the argmax of the full logits recomputed each
step (drift records that as its decoding), `kv-cache` and decode speed refuse in one line.

Measured on builtin:smollm2-135m (suites/llm-static-int8.yaml, gptq perplexity on 8 x 512 tokens;
docs/VISION.md, "pt2e on the LLM"): fp32 22.23, rtn int8 weight-only 22.23, torch dynamic int8 70.37;
pt2e static 91.61 (8.14 bits a weight, 221.4 MB), dynamic 38.67, with down_proj kept float 27.65
(static) and 24.18 (dynamic). One activation scale per tensor does not hold this LLM's activation
outliers, whether calibrated or computed per input: a finding, not a bug of the adapter."""

from __future__ import annotations

import importlib
import time
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from harness.adapters.base import (Adapter, Availability, CalibrationSet, ModelShapes, QuantizedModel, VariantConfig,
                                   all_available)
from harness.adapters.linears import linear_names
from harness.adapters.pt2e import PT2E_MODULE, QUANTIZER_MODULE, count_converted, distinct_bytes, graph_tensors
from harness.adapters.torch_static import calibrate
from harness.errors import HarnessError

MAX_BATCH = 4096
EXAMPLE_SHAPE = (2, 16)  # what torch.export traces with; batch and sequence are dynamic dimensions
NO_CACHE = ("pt2e-llm: the exported decoder takes no KV cache and has no generate() (it was exported "
            "as input_ids -> hidden states, the whole sequence each call)")


class PT2ELLMVariant(VariantConfig):
    activations: Literal["static", "dynamic"] = "static"  # static: calibrated scales; dynamic: per input, at run time
    lower: Literal["none", "inductor"] = "none"
    keep_float: tuple[str, ...] = ()  # linear names (last part, e.g. down_proj) left in float
    calibration_windows: int | None = Field(None, gt=0)  # first n of the suite's calibration windows; None: all
    calibration_batch: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _calibration_is_static(self) -> PT2ELLMVariant:
        if self.activations == "dynamic" and self.calibration_windows is not None:
            raise ValueError("calibration_windows only applies to activations: static (dynamic scales need no calibration)")
        return self

    def label(self) -> str:
        parts = [f"pt2e-x86-{self.activations}"]
        parts += [f"keep-{name}" for name in self.keep_float]
        if self.calibration_windows and self.activations == "static":
            parts.append(f"cal{self.calibration_windows}")
        if self.lower != "none":
            parts.append(self.lower)
        return "-".join(parts)


class _Body(torch.nn.Module):
    """What is exported: the decoder body with one tensor in and one out. Held as `model` so the
    graph's module names are the transformers model's own (`model.layers.0.mlp.down_proj`)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.model = decoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


class ExportedDecoder(torch.nn.Module):
    """The converted graph called as a transformers decoder is: decoder(input_ids=..., use_cache=False)
    -> an output with `last_hidden_state`. Refuses what the graph cannot do (a cache, padding)."""

    def __init__(self, graph: torch.fx.GraphModule, runner):
        super().__init__()
        self.graph = graph
        self.__dict__["runner"] = runner  # the compiled graph or the graph itself; not a second submodule

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool | None = False,
                past_key_values: Any = None, **kwargs: Any) -> SimpleNamespace:
        if use_cache or past_key_values is not None:
            raise HarnessError(NO_CACHE)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise HarnessError("pt2e-llm: the exported decoder has no attention-mask input (padding is not supported)")
        unknown = [k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "output_attentions",
                                                                               "output_hidden_states")]
        if unknown:
            raise HarnessError(f"pt2e-llm: the exported decoder takes input_ids only, not {', '.join(sorted(unknown))}")
        return SimpleNamespace(last_hidden_state=self.runner(input_ids.long()))


class ExportedCausalLM(torch.nn.Module):
    """A causal LM front over the exported decoder and the float output head: what the harness's
    measurements call (`forward(...).logits`, `get_decoder()`, `get_output_embeddings()`, `config`)."""

    def __init__(self, decoder: ExportedDecoder, lm_head: torch.nn.Module, config: Any, source: Any):
        super().__init__()
        self.model, self.lm_head, self.config = decoder, lm_head, config
        self.qharness_source = source

    def get_decoder(self) -> ExportedDecoder:
        return self.model

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(hidden))

    def __getattr__(self, name: str):
        if name == "generate":  # drift then takes the argmax of recomputed logits; decode speed fails with this line
            raise AttributeError(NO_CACHE)
        return super().__getattr__(name)


class PT2ELLMModel(QuantizedModel):
    """Bytes from what the converted graph reads (plus the float head), not from the module walk."""

    def __init__(self, module: ExportedCausalLM, counted: dict[str, Any], info: dict[str, Any]):
        super().__init__(module, torch.device("cpu"), info=info)
        self.counted = counted

    def weight_bytes(self) -> int:
        read = list(graph_tensors(self.module.model.graph).values())
        return distinct_bytes(read + list(self.module.lm_head.parameters()))

    def linear_stats(self) -> tuple[int, int]:
        return self.counted["weights"], self.counted["weight_bytes"]

    def native_kv_cache_bytes(self, input_ids: torch.Tensor) -> int | None:
        raise HarnessError(f"kv-cache: {NO_CACHE}")


def _longest(config: Any) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _dynamic_shapes(config: Any):
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH), 1: torch.export.Dim("seq", min=1, max=_longest(config))},)


def _op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Linears whose weight is an int8 constant / a float one; activation quantize points."""
    out = {"int8_linears": 0, "float_linears": 0, "activation_quantize_ops": 0}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        if "aten.linear" in target and len(node.args) > 1:
            w = node.args[1]
            dq = getattr(w, "op", None) == "call_function" and "dequantize_per_channel" in str(w.target)
            out["int8_linears" if dq else "float_linears"] += 1
        elif "quantize_per_tensor" in target and "dequantize" not in target:
            out["activation_quantize_ops"] += 1
    return out


class PT2ELLMAdapter(Adapter):
    name: ClassVar[str] = "pt2e-llm"
    description: ClassVar[str] = ("PyTorch 2 export INT8 on a causal LM (torchao X86InductorQuantizer, prepare/convert_pt2e "
                                  "on the exported decoder; lm_head float)")
    extra: ClassVar[str | None] = "torchao"
    Variant: ClassVar[type[VariantConfig]] = PT2ELLMVariant
    packages: ClassVar[tuple[str, ...]] = ("torchao", "transformers")
    needs_calibration: ClassVar[bool] = True

    def availability(self, device: str = "cpu") -> Availability:
        if torch.device(device).type != "cpu":
            return Availability(False, "X86InductorQuantizer targets x86 CPUs")
        return all_available(((PT2E_MODULE, "torchao"), (QUANTIZER_MODULE, "torchao")), self.extra)

    def variant_needs_calibration(self, variant: VariantConfig) -> bool:
        assert isinstance(variant, PT2ELLMVariant)
        return variant.activations == "static"

    def check(self, variant: VariantConfig, shapes: ModelShapes, device: str) -> None:
        assert isinstance(variant, PT2ELLMVariant)
        names = {s.name.rpartition(".")[2] for s in shapes.targets()}
        unknown = [n for n in variant.keep_float if n not in names]
        if unknown:
            raise HarnessError(f"pt2e-llm: keep_float {', '.join(unknown)} names no linear layer of this model "
                               f"(it has: {', '.join(sorted(names))})")

    def quantize(self, model: torch.nn.Module, variant: VariantConfig, calibration: CalibrationSet | None,
                 device: torch.device) -> QuantizedModel:
        assert isinstance(variant, PT2ELLMVariant)
        if torch.device(device).type != "cpu":
            raise HarnessError("pt2e-llm: X86InductorQuantizer targets x86 CPUs; use device: cpu")
        get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
        if not (callable(get_decoder) and callable(get_head)) or get_head() is None:
            raise HarnessError("pt2e-llm: needs a transformers causal LM (get_decoder / get_output_embeddings)")
        if variant.activations == "static" and calibration is None:
            raise HarnessError("pt2e-llm: static activations need calibration windows (the suite's calibration:)")
        pt2e, xiq = importlib.import_module(PT2E_MODULE), importlib.import_module(QUANTIZER_MODULE)
        model = model.float().eval()
        config = model.config
        seconds: dict[str, float] = {}

        t0 = time.perf_counter()
        example = torch.randint(0, int(config.vocab_size), EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
        try:
            exported = torch.export.export(_Body(get_decoder()), (example,), dynamic_shapes=_dynamic_shapes(config)).module()
        except Exception as exc:  # noqa: BLE001 - one line: which model, what torch.export said
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise HarnessError(f"pt2e-llm: torch.export of {type(model).__name__}'s decoder failed: "
                               f"{type(exc).__name__}: {first}") from None
        seconds["export_s"] = time.perf_counter() - t0

        qconfig = xiq.get_default_x86_inductor_quantization_config(is_dynamic=variant.activations == "dynamic")
        quantizer = xiq.X86InductorQuantizer().set_global(qconfig)
        kept = [n for n in linear_names(model) if n.rpartition(".")[2] in variant.keep_float]
        for name in kept:
            quantizer.set_module_name_qconfig(name, None)
        prepared = pt2e.prepare_pt2e(exported, quantizer)

        t0 = time.perf_counter()
        if variant.activations == "static":
            windows = calibration.input_ids[: variant.calibration_windows] if variant.calibration_windows else calibration.input_ids
            calibrate(prepared, windows.long(), variant.calibration_batch)
            used = {**calibration.describe(), "windows_used": int(windows.shape[0]), "tokens": int(windows.numel())}
        else:  # weights are observed by any forward; activation scales come from each input at run time
            calibrate(prepared, example, EXAMPLE_SHAPE[0])
            used = None
        seconds["calibrate_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        converted = pt2e.convert_pt2e(prepared)
        seconds["convert_s"] = time.perf_counter() - t0
        counted = {**count_converted(converted), **_op_counts(converted)}
        runner = converted
        if variant.lower == "inductor":
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
            runner = torch.compile(converted, dynamic=True)  # compiled on its first call (inside the measurements)

        head = get_head()
        info = _describe(variant, config, head, kept, used, counted, seconds)
        front = ExportedCausalLM(ExportedDecoder(converted, runner), head, config, getattr(model, "qharness_source", None))
        return PT2ELLMModel(front, counted, info)


def _describe(variant: PT2ELLMVariant, config, head, kept: list[str], used: dict | None, counted: dict,
              seconds: dict[str, float]) -> dict:
    """The quantized model's info: what ran (APIs, scope, lowering), what was exported, what the
    converted graph holds, and the seconds each step took."""
    lowered = variant.lower == "inductor"
    return {
        "kernel": "Inductor-compiled (oneDNN int8 where its patterns match)" if lowered
        else "converted q/dq graph, not lowered (reference arithmetic in float32)",
        "scheme": f"{variant.activations} INT8 (PTQ, pt2e): int8 per-channel symmetric weights, "
                  f"uint8 per-tensor activations ({'calibrated' if variant.activations == 'static' else 'per input'})",
        "runtime": "torch Inductor" if lowered else "torch (converted graph, not lowered)",
        "apis": {"prepare/convert": PT2E_MODULE, "quantizer": QUANTIZER_MODULE,
                 "config": f"get_default_x86_inductor_quantization_config(is_dynamic={variant.activations == 'dynamic'})",
                 "scope": "set_global" + (f" + set_module_name_qconfig(None) for {len(kept)} linears" if kept else "")},
        "exported": {"what": "decoder body: input_ids -> last hidden state (no attention mask, no KV cache)",
                     "dynamic": {"batch": [1, MAX_BATCH], "seq": [1, _longest(config)]}},
        "lm_head": f"{next(head.parameters()).dtype} outside the graph, like every LLM adapter here"
                   + (" (tied to the embedding: counted once)" if getattr(config, "tie_word_embeddings", False) else ""),
        "lower": variant.lower, "activations": variant.activations, "keep_float": list(variant.keep_float),
        "calibration": used,
        "int8_linears": counted["int8_linears"], "float_linears": counted["float_linears"],
        "activation_quantize_ops": counted["activation_quantize_ops"],
        "tensor_bytes_read_by_graph": counted["read"], "unread_tensor_bytes": counted["unread"],
        "bytes_by_dtype": counted["by_dtype"],
        "decoding": "no KV cache: drift decodes by the argmax of recomputed logits; kv-cache and decode speed refuse",
        **{k: round(v, 2) for k, v in seconds.items()},
    }
