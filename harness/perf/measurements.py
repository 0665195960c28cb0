"""Perf measurements: calibration ceilings, prefill/decode speed placed on the roofline, memory.

Conventions (the perf contract other tools read): every value has a unit, n = repeats,
uncertainty = IQR/2 of the per-repeat values (uncertainty_kind says so), a protocol string with
warm-up/repeats/mode, and raw per-repeat seconds in params["samples_s"]. The full grid goes in
'@' metrics (metric@mode-bB-cC, drawn by the roofline report section); the first grid point is
repeated without '@' as the cell table's headline. They need no trained weights, so they run on
`shape:` random-init models; quality measurements there are refused at plan time."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Literal

from pydantic import Field

from harness.metrics.base import CellContext, Measurement, MeasurementParams, MetricValue
from harness.metrics.meaning import MetricSpec
from harness.perf import decode as dec
from harness.perf.decode import DecodeTiming, static_cache_len
from harness.perf.kernels.lean_decode import LeanDecoder, check_against, lean_graph_decode
from harness.perf.probes import run_probes
from harness.perf.roofline import ModelDims, layer_costs, phase_roofline
from harness.perf.telemetry import EnergyMeter, MemoryTracker
from harness.perf.timing import UNCERTAINTY_KIND, half_iqr, percentile, repeat

CEILINGS_FILE = "ceilings-{device}.json"  # in the run's cells/ folder: measured once per run and device


def _device(ctx: CellContext) -> str:
    return str(ctx.qmodel.device)


def run_ceilings(ctx: CellContext, quick: bool = False) -> tuple[dict[str, dict], str]:
    """The run's measured ceilings (probes run by the first cell that needs them, then shared
    through the cells folder); returns (name -> Ceiling dict, where they were measured)."""
    device = _device(ctx)
    path = ctx.artifact_dir.parent / CEILINGS_FILE.format(device=device.replace(":", "-"))
    if path.exists():
        data = json.loads(path.read_text())
        return data["ceilings"], data["cell"]
    ceilings = {k: c.to_dict() for k, c in run_probes(device, quick=quick).items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cell": ctx.artifact_dir.name, "ceilings": ceilings}))
    tmp.replace(path)
    return ceilings, ctx.artifact_dir.name


def _datasheet(device: str) -> tuple[str, object]:
    # lazy: `import harness.perf.measurements` stays free of yaml
    from harness import hardware

    try:
        return hardware.current_profile(device)
    except Exception:  # noqa: BLE001 - a missing profile only loses the datasheet column
        return "unknown", None


class CeilingsParams(MeasurementParams):
    quick: bool = Field(False, description="smaller buffers and fewer repeats (CI)")


class Ceilings(Measurement):
    """Achievable ceilings on the cell's device (copy bandwidth, GEMM per dtype), with the
    hardware profile's datasheet value beside each."""
    timed = True

    name = "ceilings"
    metrics = (MetricSpec("memory_bandwidth", +1, "speed"), MetricSpec("gemm_*", +1, "speed"))
    Params = CeilingsParams
    needs_tokenizer = False
    needs_real_weights = False

    def run(self, ctx: CellContext, params: CeilingsParams) -> list[MetricValue]:
        ceilings, cell = run_ceilings(ctx, params.quick)
        profile_name, profile = _datasheet(_device(ctx))
        out = []
        for name, c in ceilings.items():
            sheet = None
            if profile is not None:
                sheet = profile.memory_bandwidth_bytes_s if name == "memory_bandwidth" else profile.peak_flops.get(name[5:])
            out.append(MetricValue(name, c["value"], c["unit"], n=c["n"] or None, uncertainty=c["spread"],
                                   uncertainty_kind=UNCERTAINTY_KIND if c["spread"] is not None else None,
                                   protocol=c["protocol"] or c["note"],
                                   params={"samples_s": c["samples_s"], "datasheet": sheet, "hardware_profile": profile_name,
                                           "measured_in_cell": cell, "note": c["note"]} if c["samples_s"] else
                                   {"datasheet": sheet, "hardware_profile": profile_name, "note": c["note"]}))
        return out


class SpeedParams(MeasurementParams):
    prompt_lengths: list[int] = Field(default_factory=lambda: [128], description="prefill prompt lengths (batch 1)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], description="decode batch sizes")
    contexts: list[int] = Field(default_factory=lambda: [128], description="decode context depths (tokens in cache)")
    new_tokens: int = Field(32, ge=2, description="decoded tokens per repeat")
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    modes: list[Literal["framework", "graph", "lean", "triton"]] = Field(
        default_factory=lambda: ["framework", "graph"],
        description="framework: plain generate; graph: the model's step with a static cache as one CUDA graph; lean: "
                    "harness.perf.kernels.lean_decode (Llama-family, fused float projections, the backend's modules otherwise), "
                    "torch.compile'd and captured; triton: the lean decoder's batch-1 step as five fused Triton kernels "
                    "a layer (harness.perf.kernels.triton_decode; float models only), captured (CUDA only)")
    graph_compile: bool = Field(False, description="torch.compile the decode step before capturing it")
    lean_inductor: dict = Field(default_factory=lambda: {"coordinate_descent_tuning": True},
                                description="inductor config for the lean mode's compile")
    quick_probes: bool = False


def _roofline(ctx: CellContext, ceilings: dict[str, dict]):
    """(ModelDims, kwargs for layer_costs, peak, bandwidth, description) for this cell's model."""
    import torch

    module = ctx.qmodel.module
    dims = ModelDims.from_config(module.config)
    act = module.get_input_embeddings().weight.dtype
    act_bytes = torch.empty((), dtype=act).element_size()
    dtype_key = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(act, "fp32")
    bits = ctx.qmodel.bits_per_weight()
    quantized = bits < 8 * act_bytes - 0.5
    peak = (ceilings.get(f"gemm_{dtype_key}") or {}).get("value") or (ceilings.get("gemm_fp32") or {}).get("value")
    bandwidth = ceilings["memory_bandwidth"]["value"]
    kw = {"bits_per_weight": bits if quantized else 8.0 * act_bytes, "act_bytes": act_bytes, "kv_bytes": act_bytes,
          "dequant_ops": 2.0 if quantized else 0.0, "head_bits": 8.0 * act_bytes}
    desc = {"activation_dtype": str(act).replace("torch.", ""), "bits_per_weight": bits, "peak_key": f"gemm_{dtype_key}",
            "peak_flops": peak, "bandwidth_bytes_s": bandwidth}
    return dims, kw, peak, bandwidth, desc


class Speed(Measurement):
    """Prefill tokens/s per prompt length; decode tokens/s, TTFT and TPOT (p50/p90/p99) per mode,
    batch and context; energy per token where NVML counts it; each point placed on the roofline
    of the measured ceilings (bandwidth utilisation = bytes that had to move / time / bandwidth)."""
    timed = True

    name = "speed"
    metrics = (MetricSpec("prefill_tokens_s*", +1, "speed"), MetricSpec("decode_tokens_s*", +1, "speed"),
               MetricSpec("tpot_s@*", -1, "speed"), MetricSpec("ttft_s@*", -1, "speed"),
               MetricSpec("bandwidth_utilisation*", +1, "speed"), MetricSpec("energy_j_per_token@*", -1, "cost"),
               MetricSpec("kv_cache_bytes@*", -1, "size", exact=True))
    Params = SpeedParams
    needs_tokenizer = False
    needs_real_weights = False

    def run(self, ctx: CellContext, params: SpeedParams) -> list[MetricValue]:
        device = _device(ctx)
        model = ctx.qmodel.module
        vocab = model.config.vocab_size
        ceilings, _ = run_ceilings(ctx, params.quick_probes)
        dims, kw, peak, bandwidth, roof_desc = _roofline(ctx, ceilings)
        out: list[MetricValue] = []
        total = len(params.prompt_lengths) + len(params.modes) * len(params.batch_sizes) * len(params.contexts)
        done = 0

        for length in params.prompt_lengths:
            ids = dec.random_prompt(vocab, 1, length, device)
            samples = repeat(lambda: dec.prefill(model, ids), device, params.warmup, params.repeats)
            rate, spread = samples.rate_spread(length)
            roof = phase_roofline(dims, "prefill", 1, length, peak, bandwidth, **kw)
            detail = {"phase": "prefill", "batch": 1, "prompt_length": length, "samples_s": samples.seconds,
                      **roof.placed(samples.median, bandwidth), "bytes": roof.bytes, "ops": roof.ops, **roof_desc}
            protocol = f"prefill forward, random ids, warm-up {params.warmup}, median of {params.repeats} ({'CUDA events' if 'cuda' in device else 'perf_counter'})"
            value = MetricValue(f"prefill_tokens_s@p{length}", rate, "tokens/s", n=samples.n, uncertainty=spread,
                                uncertainty_kind=UNCERTAINTY_KIND, protocol=protocol, params=detail)
            out.append(value)
            if length == params.prompt_lengths[0]:
                out.append(MetricValue("prefill_tokens_s", rate, "tokens/s", n=samples.n, uncertainty=spread,
                                       uncertainty_kind=UNCERTAINTY_KIND, protocol=protocol, params=detail))
            done += 1
            ctx.progress(done, total, "prefill speed")

        for mode in params.modes:
            if mode in ("graph", "lean", "triton") and not device.startswith("cuda"):
                done += len(params.batch_sizes) * len(params.contexts)
                continue  # CUDA graphs need a CUDA device: nothing to time here (the docs say so)
            for batch in params.batch_sizes:
                for context in params.contexts:
                    try:
                        out += self._decode(ctx, params, mode, batch, context, dims, kw, peak, bandwidth, roof_desc)
                    except Exception as exc:  # noqa: BLE001 - e.g. a backend's kernels refuse graph capture
                        if mode == "framework":
                            raise
                        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                        print(f"{mode} decode failed (b={batch}, c={context}): {reason}", file=sys.stderr)
                        out.append(MetricValue(f"decode_tokens_s@{mode}-b{batch}-c{context}", None, "tokens/s",
                                               protocol=f"decode mode {mode}: not measured (capture, replay or the "
                                                        "mode's own check failed, or the model is outside what it covers)",
                                               params={"mode": mode, "batch": batch, "context": context, "error": reason}))
                        if device.startswith("cuda"):
                            import torch

                            torch.cuda.synchronize()
                    done += 1
                    ctx.progress(done, total, f"decode speed ({mode})")
        return out

    def _decode(self, ctx, params, mode, batch, context, dims, kw, peak, bandwidth, roof_desc) -> list[MetricValue]:
        device = _device(ctx)
        model = ctx.qmodel.module
        ids = dec.random_prompt(model.config.vocab_size, batch, context, device, seed=batch * 7919 + context)
        n = params.new_tokens
        meter = EnergyMeter(device)
        runs, kv, protocol = DECODE_MODES[mode](ctx, model, ids, params, meter)
        per_repeat_s = [sum(r.tpot_s) for r in runs]
        tokens_per_repeat = batch * len(runs[0].tpot_s)
        rates = [tokens_per_repeat / s for s in per_repeat_s]
        tpot = [x for r in runs for x in r.tpot_s]
        ttft = [r.ttft_s for r in runs]
        step_s = statistics.median(tpot)
        mid_context = context + n // 2
        roof = phase_roofline(dims, "decode", batch, mid_context, peak, bandwidth, **kw)
        tag = f"{mode}-b{batch}-c{context}"
        detail = {"phase": "decode", "mode": mode, "batch": batch, "context": context, "new_tokens": n,
                  "samples_s": per_repeat_s, "tokens_per_repeat": tokens_per_repeat,
                  **roof.placed(step_s, bandwidth), "bytes": roof.bytes, "ops": roof.ops, "roofline_context": mid_context,
                  **roof_desc}
        unc = dict(uncertainty_kind=UNCERTAINTY_KIND, protocol=protocol)
        values = [
            MetricValue(f"decode_tokens_s@{tag}", statistics.median(rates), "tokens/s", n=len(rates),
                        uncertainty=half_iqr(rates), params=detail, **unc),
            MetricValue(f"tpot_s@{tag}", step_s, "s", n=len(tpot), uncertainty=half_iqr(tpot),
                        params={"p50": step_s, "p90": percentile(tpot, 90), "p99": percentile(tpot, 99), "mode": mode,
                                "batch": batch, "context": context}, **{**unc, "uncertainty_kind": "IQR/2 over decode steps"}),
            MetricValue(f"ttft_s@{tag}", statistics.median(ttft), "s", n=len(ttft), uncertainty=half_iqr(ttft),
                        params={"p50": statistics.median(ttft), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99),
                                "mode": mode, "batch": batch, "context": context, "samples_s": ttft}, **unc),
        ]
        if meter.result.joules is not None:
            produced = tokens_per_repeat * len(runs)
            values.append(MetricValue(f"energy_j_per_token@{tag}", meter.result.joules / produced, "J/token", n=produced,
                                      protocol=protocol + "; " + meter.result.note, params={"joules": meter.result.joules,
                                      "tokens": produced, "mode": mode, "batch": batch, "context": context}))
        if kv is not None:
            values.append(MetricValue(f"kv_cache_bytes@{tag}", float(kv), "bytes", protocol="static cache tensors allocated",
                                      params={"mode": mode, "batch": batch,
                                              "max_cache_len": dec.static_cache_len(context, n * params.repeats)}))
        first = (params.batch_sizes[0], params.contexts[0])
        if (batch, context) == first:  # the headline numbers for the cell table
            suffix = "" if mode == "framework" else f"_{mode}"
            layers = layer_table(dims, batch, mid_context, params.prompt_lengths[0] if params.prompt_lengths else context,
                                 peak, bandwidth, kw)
            values.append(MetricValue(f"decode_tokens_s{suffix}", statistics.median(rates), "tokens/s", n=len(rates),
                                      uncertainty=half_iqr(rates), params={**detail, "layers": layers}, **unc))
            values.append(MetricValue(f"bandwidth_utilisation{suffix}", detail["bandwidth_utilisation"], "fraction",
                                      n=len(tpot), protocol="bytes that had to move per decode step / median step time / "
                                      "measured copy bandwidth", params={"tag": tag}))
        return values


# -- decode modes: name -> timer(ctx, model, ids, params, meter) -> (per-repeat timings, static KV bytes
# or None, protocol text). A new mode is one function and one line in DECODE_MODES.
def _framework_mode(ctx, model, ids, params, meter):
    n, gen = params.new_tokens, dict(ctx.qmodel.generate_kwargs)
    for _ in range(params.warmup):
        dec.framework_decode(model, ids, min(4, n), gen)
    with meter:
        runs = [dec.framework_decode(model, ids, n, gen) for _ in range(params.repeats)]
    protocol = (f"decode mode framework: plain generate (greedy, {n} new tokens, random prompt of {ids.shape[1]}), "
                f"per-token timestamps from a logits processor, warm-up {params.warmup}, {params.repeats} repeats")
    return runs, None, protocol


def _blocks(timing, n: int, repeats: int, batch: int) -> list:
    """One long replay of n * repeats steps cut into `repeats` timings of n steps each."""
    return [DecodeTiming(ttft_s=timing.ttft_s, tpot_s=timing.tpot_s[i * n:(i + 1) * n], batch=batch) for i in range(repeats)]


def _lean_mode(kernels: str):
    def timer(ctx, model, ids, params, meter):
        n, mode = params.new_tokens, "triton" if kernels == "triton" else "lean"
        timing, check = _lean_timing(model, ids, n * params.repeats, params.lean_inductor, meter, kernels=kernels)
        protocol = (f"decode mode {mode}: {timing.note}; logits checked against the model first (max rel diff "
                    f"{check['max_rel_logit_diff']:.2g}, argmax agreement {check['argmax_agreement']:.0%} over "
                    f"{check['steps']} steps); {n * params.repeats} replays after a 3-step warm-up, CUDA events per "
                    f"replay, repeats = {params.repeats} blocks of {n}")
        return _blocks(timing, n, params.repeats, ids.shape[0]), timing.kv_cache_bytes, protocol
    return timer


def _graph_mode(ctx, model, ids, params, meter):
    n = params.new_tokens
    timing = dec.graph_decode(model, ids, n * params.repeats, compile=params.graph_compile, around_replays=meter)
    protocol = (f"decode mode graph: {timing.note}, static KV cache, {n * params.repeats} replays after a "
                f"3-step warm-up, CUDA events per replay, repeats = {params.repeats} blocks of {n}")
    return _blocks(timing, n, params.repeats, ids.shape[0]), timing.kv_cache_bytes, protocol


DECODE_MODES = {"framework": _framework_mode, "graph": _graph_mode, "lean": _lean_mode("torch"),
                "triton": _lean_mode("triton")}


def _lean_timing(model, ids, new_tokens: int, inductor: dict, meter, kernels: str = "torch"):
    """The lean decoder over this model, its logits checked against the model's before timing
    (a decoder that computes something else has no speed worth reporting). kernels="triton":
    its fused Triton step, already one kernel per stage, so not torch.compile'd."""
    batch, context = ids.shape
    lean = LeanDecoder(model, batch, static_cache_len(context, new_tokens), kernels=kernels)
    check = check_against(model, lean, ids[:, :min(context, 16)], steps=4)
    if check["argmax_agreement"] < 0.75 or check["max_rel_logit_diff"] > 0.05:
        raise RuntimeError(f"lean decoder disagrees with the model ({check}): not timed")
    timing, _ = lean_graph_decode(model, ids, new_tokens, compile=kernels == "torch", inductor=inductor,
                                  around_replays=meter, lean=lean)
    return timing, check


def layer_table(dims, batch: int, context: int, prompt: int, peak: float, bandwidth: float, kw: dict) -> list[dict]:
    """Per layer: ops/byte in decode and prefill, and its share of the decode floor (the report's
    per-layer roofline table)."""
    dec = layer_costs(dims, "decode", batch, context, **kw)
    pre = {c.name: c for c in layer_costs(dims, "prefill", 1, prompt, **kw)}
    floor = sum(c.time_floor(peak, bandwidth) * c.count for c in dec)
    return [{"layer": c.name, "count": c.count, "decode_intensity": c.intensity, "prefill_intensity": pre[c.name].intensity,
             "decode_bytes": c.bytes * c.count, "decode_floor_share": c.time_floor(peak, bandwidth) * c.count / floor,
             "decode_bound": "compute" if c.ops / peak > c.bytes / bandwidth else "memory"} for c in dec]


class MemoryParams(MeasurementParams):
    batch: int = Field(1, ge=1)
    context: int = Field(128, ge=1)
    new_tokens: int = Field(8, ge=1)


class Memory(Measurement):
    """True weight bytes (storage walk), allocator peak and process memory over one generate,
    and KV-cache bytes per token (from the config) and for this generate."""

    name = "memory"
    metrics = (MetricSpec("weight_bytes_true", -1, "size", exact=True), MetricSpec("kv_cache_bytes*", -1, "size", exact=True),
               MetricSpec("peak_allocated_bytes", -1, "cost", exact=True), MetricSpec("process_memory_bytes", -1, "cost"))
    Params = MemoryParams
    needs_tokenizer = False
    needs_real_weights = False

    def run(self, ctx: CellContext, params: MemoryParams) -> list[MetricValue]:
        import torch

        device = _device(ctx)
        model = ctx.qmodel.module
        ids = dec.random_prompt(model.config.vocab_size, params.batch, params.context, device)
        with MemoryTracker(device) as mem:
            dec.framework_decode(model, ids, params.new_tokens, dict(ctx.qmodel.generate_kwargs))
        dims = ModelDims.from_config(model.config)
        kv_elem = model.get_input_embeddings().weight.dtype
        per_token = dims.kv_bytes_per_token(torch.empty((), dtype=kv_elem).element_size())
        tokens = params.batch * (params.context + params.new_tokens)
        protocol = f"one generate of {params.new_tokens} tokens after a random prompt of {params.context}, batch {params.batch}"
        detail = params.model_dump()
        out = [
            MetricValue("weight_bytes_true", float(ctx.qmodel.weight_bytes()), "bytes",
                        protocol="storage walk: every parameter/buffer storage once, tensor subclasses opened"),
            MetricValue("kv_cache_bytes_per_token", per_token, "bytes/token",
                        protocol=f"2 x layers x kv_heads x head_dim x {kv_elem} bytes (from the config)"),
            MetricValue("kv_cache_bytes", per_token * tokens, "bytes", protocol=protocol + "; per-token bytes x tokens",
                        params=detail),
        ]
        if mem.peak_allocated_bytes is not None:
            out.append(MetricValue("peak_allocated_bytes", float(mem.peak_allocated_bytes), "bytes",
                                   protocol=protocol + "; torch.cuda.max_memory_allocated", params=detail))
        if mem.process_bytes is not None:
            out.append(MetricValue("process_memory_bytes", float(mem.process_bytes), "bytes",
                                   protocol=protocol + "; " + mem.note, params=detail))
        return out
