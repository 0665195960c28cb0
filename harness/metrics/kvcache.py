"""KV-cache bytes at a given context: prefill N tokens into the cache the model decodes with and
count the bytes the cache object holds.

transformers: the cache `QuantizedModel.generate_kwargs` selects (a `QuantizedCache` for
cache_implementation="quantized", else a `DynamicCache`), filled by one forward of N tokens; its
tensors (quantized store with scales/zeros, float residual) counted by the storage walk, each
storage once. llama.cpp: `llama_state_seq_get_size` of sequence 0 after evaluating N tokens, i.e.
the serialized cells of that sequence in the cache's own types (plus a header of a few KB).

Per context one `kv_cache_bytes@ctx` value (params: context); the largest context also as
`kv_cache_bytes` and `kv_cache_bytes_per_token` for the cell table."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from harness.errors import HarnessError
from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.models.corpora import eval_token_stream
from harness.weights.footprint import tensor_bytes


class KVCacheParams(MeasurementParams):
    contexts: list[int] = Field(default_factory=lambda: [1024], min_length=1)
    corpus: str = "boolq-wiki"


def _tensors(x: Any):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def hf_cache(qmodel):
    """The cache object `generate` would build for this model (see module docstring)."""
    own = qmodel.new_cache()  # a declared capability of QuantizedModel: None unless the adapter builds its own
    if own is not None:
        return own
    from transformers.cache_utils import DynamicCache, QuantizedCache

    kw = qmodel.generate_kwargs
    if kw.get("cache_implementation") == "quantized":
        return QuantizedCache(config=qmodel.module.config, **kw.get("cache_config", {}))
    return DynamicCache(config=qmodel.module.config)


def cache_object_bytes(cache) -> int:
    tensors = []
    for layer in cache.layers:
        for attr in ("_quantized_keys", "_quantized_values", "keys", "values"):
            tensors += list(_tensors(getattr(layer, attr, None)))
    return tensor_bytes(tensors)


@torch.inference_mode()
def kv_cache_bytes(qmodel, ids: torch.Tensor) -> int:
    """Bytes of the KV cache after prefilling `ids` (1, N)."""
    native = qmodel.native_kv_cache_bytes(ids)  # a runtime outside torch (llama.cpp) counts its own
    if native is not None:
        return native
    if not hasattr(qmodel.module, "config"):
        raise HarnessError("kv-cache: this model has no transformers cache to measure")
    cache = hf_cache(qmodel)
    qmodel.module(input_ids=ids.to(qmodel.device), past_key_values=cache, use_cache=True)
    return cache_object_bytes(cache)


class KVCache(Measurement):
    name = "kv-cache"
    metrics = (MetricSpec("kv_cache_bytes*", -1, "size", exact=True),)
    Params = KVCacheParams

    def run(self, ctx: CellContext, params: MeasurementParams) -> list[MetricValue]:
        assert isinstance(params, KVCacheParams)
        longest = max(params.contexts)
        stream = eval_token_stream(ctx.tokenizer, params.corpus, longest)
        if stream.numel() < longest:
            raise HarnessError(f"kv-cache: corpus '{params.corpus}' has {stream.numel()} tokens, fewer than context {longest}")
        kv = (ctx.qmodel.info or {}).get("kv_cache") or {"kind": "default (float DynamicCache / llama.cpp f16)"}
        proto = "kv-cache: bytes held by the cache after prefilling N tokens (one sequence)"
        out = []
        for i, n in enumerate(sorted(set(params.contexts))):
            ctx.progress(i, len(params.contexts), f"kv-cache {n} tokens")
            nbytes = kv_cache_bytes(ctx.qmodel, stream[:n].view(1, n))
            out.append(MetricValue("kv_cache_bytes@ctx", float(nbytes), "bytes", n=1, protocol=proto,
                                   params={"context": n, "corpus": params.corpus, "kv_cache": kv}))
        last = out[-1]
        out += [MetricValue("kv_cache_bytes", last.value, "bytes", n=1, protocol=proto, params=last.params),
                MetricValue("kv_cache_bytes_per_token", last.value / longest, "bytes/token", n=1, protocol=proto,
                            params=last.params)]
        return out
