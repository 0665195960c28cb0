"""Scoring token sequences where the model runs: per-token NLL, greedy match and, against a stored
reference, KL divergence, top-1 agreement and delta-p, computed on the model's device in float32;
only per-token vectors come back to the host.

A `Row` is what the model reads (`ids`) and what its last len(targets) positions predict. A
perplexity window w is Row(w[:-1], w[1:]) (a llama.cpp chunk scores only its second half); a
continuation c of a context x is Row((x + c)[:-1], c). Rows are sorted by length and packed into
batches of at most `batch_tokens` padded tokens, closed early before padding passes 10% of a
batch (right padding: a causal model's real positions never see it). Only the scored positions go through the output head, in chunks of at most
`HEAD_BYTES` (64 MB) of float32 logits on a CPU, `GPU_HEAD_BYTES` (256 MB) on a GPU, so scoring
needs at most ~256 MB (CPU) / ~1 GB (GPU) beside the model's own activations whatever the
vocabulary and context (a 128k vocabulary at 8k context would be 4 GB of float32 logits taken
whole). The per-position results of a batch stay on the device until the batch is done and
cross to the host in one transfer: a host copy per chunk stalled the GPU at every chunk (on the
H200 the plain loop scored 31.8k tok/s with one transfer per batch; benchmarks/results/
packing-probe-h200/), and that transfer is read only after the next batch has been launched, so the
GPU never idles while the host builds a batch or unpacks results. On CUDA the scorer also runs
Llama-family RMSNorm and rotary embeddings as fewer kernels (harness/metrics/lean_ops.py). Only the reference cell's 16-bit log-probability codes (V entries a
position) come back chunk by chunk, so they never pile up on the device. Where the head cannot be split off
the model (a runtime without modules, like llama.cpp, or a head with extra arithmetic), the full
logits are taken and the same chunking applies to them.

The reference cell records, for every window it scores, its log-probabilities over the whole
vocabulary, quantized per position to 16 bits between that position's minimum and maximum
(llama.cpp's --kl-divergence-base format: about 2 bytes a vocabulary entry, so 98 KB a position
at SmolLM2's 49,152 tokens), plus its exact log-probability of the target and its argmax.
Comparing cells read them instead of running the reference model again: KL(P_ref || P_q) over the
full vocabulary, top-1 agreement and delta-p. A top-k store would be 100-200x smaller but on the
embedded model the top 64 entries leave 12% of the reference's probability outside, and the
one-bucket tail term then underestimates mean KLD by 14-20% (benchmarks/results/reference-store/
measures both); the 16-bit store is within 0.1% of the live float64 KLD there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from harness.errors import HarnessError
from harness.metrics.lean_ops import lean_patches, patched

HEAD_BYTES = 64 * 2**20  # float32 logits per head chunk on CPU (a chunk holds up to 4 such temporaries)
GPU_HEAD_BYTES = 256 * 2**20  # on a GPU: fewer, larger output-layer GEMMs (341 positions a chunk at a 49k vocabulary was too few)
CPU_BATCH_TOKENS = 1024  # 'auto' on CPU: on 2 cores 1,024 scored 64 BoolQ documents in 21 s, 4,096 in 30 s
MAX_PADDING = 0.10  # a batch closes before padding would exceed this fraction of its tokens
MAX_BATCH_TOKENS = 16384  # 'auto' on a GPU: at most this many padded tokens a batch (H200, 7B fp16: 16,384-token batches scored 31.8k tok/s, 65,536 27.2k: benchmarks/results/packing-probe-h200/)
REFERENCE_FOLDER = "reference-logprobs"
WARM_UP_TOKENS = 64  # the GPU warm-up row (Scorer.warm_up)
BatchTokens = int | Literal["auto"]


@dataclass(frozen=True)
class Row:
    ids: torch.Tensor  # (L,) int64: what the model reads
    targets: torch.Tensor  # (m,) int64, m <= L: the tokens its last m positions predict

    @staticmethod
    def of(ids: Sequence[int] | torch.Tensor, targets: Sequence[int] | torch.Tensor) -> Row:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        if not 0 < targets.numel() <= ids.numel():
            raise HarnessError(f"a scored row needs 1..{ids.numel()} targets, got {targets.numel()}")
        return Row(ids, targets)


def window_row(window: torch.Tensor, first_scored: int = 0) -> Row:
    """The row that scores window[first_scored + 1:] from the window's own tokens."""
    return Row.of(window[:-1], window[first_scored + 1:])


def row_key(row: Row) -> str:
    """Identity of a row: its tokens and which of them are scored."""
    h = hashlib.sha1(row.ids.numpy().astype(np.int64).tobytes())
    h.update(row.targets.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


@dataclass
class RowScores:
    """Per scored position of one row."""

    nll: np.ndarray  # float64: -log p(target)
    greedy: np.ndarray  # bool: the model's argmax is the target
    kld: np.ndarray | None = None  # float64, vs the stored reference (see the module docstring)
    top1: np.ndarray | None = None  # bool: argmax equals the reference's
    delta_p: np.ndarray | None = None  # float64: p(target) - p_ref(target)


@dataclass
class ReferenceRow:
    """The reference's distribution at each scored position of a row: log p = lo + codes * step."""

    codes: np.ndarray  # (m, V) uint16
    lo: np.ndarray  # (m,) float32: the smallest log-probability of the position
    step: np.ndarray  # (m,) float32: (largest - smallest) / 65535
    target_logp: np.ndarray  # (m,) float32, exact
    argmax: np.ndarray  # (m,) int64, exact


class ReferenceStore:
    """The reference cell's log-probabilities per scored row, one small .npz each, in
    `<cell folder>/reference-logprobs/` (keyed by row_key); comparing cells read them."""

    def __init__(self, cell_dir: Path):
        self.folder = Path(cell_dir) / REFERENCE_FOLDER

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.npz").is_file()

    def get(self, key: str) -> ReferenceRow | None:
        path = self.folder / f"{key}.npz"
        if not path.is_file():
            return None
        with np.load(path) as z:
            return ReferenceRow(z["codes"], z["lo"], z["step"], z["target_logp"], z["argmax"])

    def put(self, key: str, ref: ReferenceRow) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{key}.tmp.npz"
        np.savez(tmp, codes=ref.codes, lo=ref.lo, step=ref.step, target_logp=ref.target_logp, argmax=ref.argmax)
        tmp.replace(self.folder / f"{key}.npz")
        meta = self.folder / "README.json"
        if not meta.exists():
            meta.write_text(json.dumps({"format": "per scored row (harness/metrics/scoring.py): log p over the vocabulary "
                                                  "= lo + codes * step (uint16 codes per position), exact target "
                                                  "log-probability and argmax", "vocabulary": int(ref.codes.shape[1])}))

    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npz")) if self.folder.is_dir() else 0


# -- where the logits come from ------------------------------------------------------------------------------

class Head:
    """Forward to features, then logits only where scored. `split`: features are the final hidden
    states and `head` the output layer (checked once against the model's own logits); otherwise
    features are the model's logits and `head` is the identity."""

    def __init__(self, qmodel):
        self.qmodel = qmodel
        self.split = _split_head(qmodel)
        self.lean = _lean_patches(qmodel)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        with shape_stable_attention(getattr(self.qmodel, "device", "cpu")), patched(self.lean):
            if self.split is None:
                return self.qmodel.logits(ids)
            decoder, _ = self.split
            out = decoder(input_ids=_to_device(ids, torch.device(self.qmodel.device)), use_cache=False)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return (features if self.split is None else self.split[1](features)).float()


def shape_stable_attention(device):
    """On CUDA, scaled-dot-product attention without the cuDNN backend, which builds a graph for
    every new (batch, length) shape: a scoring pass meets a new shape at nearly every batch, and on
    the H200 that cost a 7B ~50 ms a batch, 10% of a 16k-token batch (flash and memory-efficient
    attention have no per-shape cost: benchmarks/results/cold-shapes-h200/). Elsewhere a no-op."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _lean_patches(qmodel) -> list:
    """On CUDA, the rewrites of harness/metrics/lean_ops.py that apply to this transformers model
    (fewer element-wise kernels, same arithmetic); none elsewhere."""
    module = getattr(qmodel, "module", None)
    if torch.device(getattr(qmodel, "device", "cpu")).type != "cuda" or not isinstance(module, torch.nn.Module):
        return []
    return lean_patches(module)


def _split_head(qmodel) -> tuple[Callable, Callable] | None:
    """(decoder, output layer) of a transformers causal LM whose logits are exactly
    output_layer(decoder(ids)) (checked on 8 tokens), else None."""
    module = getattr(qmodel, "module", None)
    get_decoder = getattr(module, "get_decoder", None)
    get_head = getattr(module, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)) or type(qmodel).logits is not _base_logits():
        return None
    try:
        decoder, head = get_decoder(), get_head()
        if decoder is None or head is None:
            return None
        vocab = head.weight.shape[0] if hasattr(head, "weight") and head.weight.dim() == 2 else 8
        probe = (torch.arange(8) * 7 % max(vocab - 1, 1) + 1)[None].to(qmodel.device)
        with torch.no_grad():  # not inference_mode: quanto's packed weights refuse its tensors later
            whole = module(input_ids=probe, use_cache=False).logits.float()
            out = decoder(input_ids=probe, use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            parts = head(hidden).float()
        tol = 1e-4 if next(module.parameters()).dtype == torch.float32 else 2e-2  # else half-precision rounding
        if parts.shape != whole.shape or not torch.allclose(parts, whole, rtol=tol, atol=tol * whole.abs().max().item()):
            return None
        return decoder, head
    except Exception:  # noqa: BLE001 - any doubt: take the model's own logits
        return None


def _base_logits():
    # lazy: `import harness.metrics.scoring` stays free of pydantic
    from harness.adapters.base import QuantizedModel

    return QuantizedModel.logits


# -- the scorer ------------------------------------------------------------------------------------------------

@dataclass
class ScoreStats:
    """What a scorer did, summed over its calls (the worker reads it per measurement)."""

    rows: int = 0
    forward_tokens: int = 0  # padded tokens the model read
    scored: int = 0  # positions scored
    cached_rows: int = 0  # rows answered from an earlier measurement's pass
    seconds: float = 0.0

    def since(self, before: ScoreStats) -> ScoreStats:
        return ScoreStats(*(getattr(self, f) - getattr(before, f) for f in ("rows", "forward_tokens", "scored",
                                                                              "cached_rows", "seconds")))


class Scorer:
    """One per cell, shared by its measurements: scores rows on the cell's model; remembers the
    windows it scored (a window two measurements use is read once); in the reference cell records
    the reference log-probabilities of the windows in `record_keys`; in the others compares every
    row the reference stored against it, whichever measurement scores it first."""

    def __init__(self, qmodel, progress: Callable[[int, int, str], None] = lambda d, t, w: None,
                 record: ReferenceStore | None = None, reference: ReferenceStore | None = None,
                 record_keys: set[str] | None = None):
        self.qmodel = qmodel
        self.progress = progress
        self.record = record
        self.record_keys = record_keys if record_keys is not None else set()
        self.reference = reference
        self.stats = ScoreStats()
        self._head: Head | None = None
        self._cache: dict[str, RowScores] = {}

    @property
    def head(self) -> Head:
        if self._head is None:
            self._head = Head(self.qmodel)
        return self._head

    def windows(self, windows: torch.Tensor, first_scored: int = 0, batch_tokens: BatchTokens = "auto",
                what: str = "windows", need_reference: bool = False) -> list[RowScores]:
        """Scores of each window (n, S): tokens first_scored+1 .. S-1, cached by content. With
        need_reference, every window must have stored reference log-probabilities (KLD etc.)."""
        return self.rows([window_row(w, first_scored) for w in windows], batch_tokens, what, need_reference)

    def rows(self, rows: list[Row], batch_tokens: BatchTokens = "auto", what: str = "rows",
             need_reference: bool = False) -> list[RowScores]:
        """Scores of each row, in order (cached by content, so asking again costs nothing)."""
        keys = [row_key(r) for r in rows]
        has_ref = [self.reference is not None and self.reference.has(k) for k in keys]
        if need_reference and not all(has_ref):
            where = self.reference.folder if self.reference else "no reference cell"
            raise HarnessError(f"{what}: the reference stored no log-probabilities for {has_ref.count(False)} of "
                               f"{len(rows)} rows ({where}); the reference cell records them (did it run, on these "
                               "windows? with --reference-from: the same corpus and windows)")
        out: list[RowScores | None] = [None] * len(rows)
        todo = []
        for i, key in enumerate(keys):
            hit = self._cache.get(key)
            if hit is not None and (not has_ref[i] or hit.kld is not None):
                out[i] = hit
                self.stats.cached_rows += 1
            else:
                todo.append(i)
        t0 = time.perf_counter()
        with _evaluating(self.qmodel):
            for done, (i, scores) in enumerate(self._score(rows, todo, keys, has_ref, batch_tokens), 1):
                out[i] = self._cache[keys[i]] = scores
                self.progress(done, len(todo), what)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.rows += len(rows)
        return out  # type: ignore[return-value]

    # -- batching -------------------------------------------------------------------------------------
    def budget(self, batch_tokens: BatchTokens) -> int:
        """Padded tokens a batch may hold: as asked, or 'auto' (CPU: CPU_BATCH_TOKENS; GPU: half the
        free memory over a per-token activation estimate, at most MAX_BATCH_TOKENS)."""
        if batch_tokens != "auto":
            return int(batch_tokens)
        device = torch.device(getattr(self.qmodel, "device", "cpu"))
        if device.type != "cuda":
            return CPU_BATCH_TOKENS
        free, _ = torch.cuda.mem_get_info(device)
        per_token = _bytes_per_token(self.qmodel)
        if self.head.split is None:  # the model's whole float32 logits come out of its forward
            per_token += 4 * (getattr(getattr(self.qmodel.module, "config", None), "vocab_size", None) or 131072)
        return int(max(512, min(MAX_BATCH_TOKENS, free * 0.5 / per_token)))

    def _score(self, rows: list[Row], todo: list[int], keys: list[str], has_ref: list[bool], batch_tokens: BatchTokens):
        """Yields (row index, RowScores) for the rows in `todo`. Rows that read the same tokens
        (single-token answers of one question) share one sequence of the batch; sequences go
        longest first, packed by the budget; on a device out-of-memory the budget halves and the
        batch is tried again. A batch's results are read back only after the next batch has been
        launched, so the device never waits for the host between batches."""
        budget = self.budget(batch_tokens)
        inputs: dict[bytes, list[int]] = {}
        for i in todo:
            inputs.setdefault(rows[i].ids.numpy().tobytes(), []).append(i)
        order = sorted(inputs.values(), key=lambda users: -rows[users[0]].ids.numel())
        lengths = [rows[users[0]].ids.numel() for users in order]
        start, pending = 0, None
        while start < len(order):
            batch = order[start:_batch_end(lengths, start, budget)]
            try:
                launched = self._launch(rows, batch, keys, has_ref)
            except torch.cuda.OutOfMemoryError:
                if len(batch) == 1:
                    raise HarnessError(f"out of device memory scoring one row of {lengths[start]} tokens") from None
                budget = max(lengths[start], budget // 2)
                _free_device_memory(getattr(self.qmodel, "device", "cpu"))
                continue
            if pending is not None:
                yield from self._finish(pending, keys)
            pending = launched
            start += len(batch)
        if pending is not None:
            yield from self._finish(pending, keys)

    @torch.no_grad()  # not inference_mode: on CUDA, quanto's int4 weights failed under it ("Cannot set version_counter for inference tensor")
    def _launch(self, rows: list[Row], batch: list[list[int]], keys: list[str], has_ref: list[bool]) -> _Launched:
        """Queues one batch's forward and per-position statistics on the device and their copy to
        the host (pinned memory, asynchronous on a GPU)."""
        width = rows[batch[0][0]].ids.numel()
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        users, flat_pos, targets = [], [], []
        for b, sharing in enumerate(batch):
            n = rows[sharing[0]].ids.numel()
            ids[b, :n] = rows[sharing[0]].ids
            for i in sharing:
                m = rows[i].targets.numel()
                users.append(i)
                flat_pos.append(torch.arange(n - m, n) + b * width)
                targets.append(rows[i].targets)
        spans = [rows[i].targets.numel() for i in users]
        refs = [self.reference.get(keys[i]) if has_ref[i] else None for i in users]
        record = self.record is not None and any(keys[i] in self.record_keys for i in users)
        features = self.head.features(ids)
        device = features.device
        flat = features.reshape(len(batch) * width, -1)
        pos = _to_device(torch.cat(flat_pos), device)
        tgt = _to_device(torch.cat(targets), device)
        ref = _stack_reference(refs, spans)
        vocab = flat.shape[1] if self.head.split is None else _vocab(self.head)
        chunk = max(1, (GPU_HEAD_BYTES if device.type == "cuda" else HEAD_BYTES) // (4 * max(vocab, 1)))
        parts: dict[str, list[torch.Tensor]] = {}
        for lo in range(0, pos.numel(), chunk):
            hi = min(lo + chunk, pos.numel())
            logits = self.head.logits(flat.index_select(0, pos[lo:hi]))
            ref_chunk = None if ref is None else {k: _to_device(torch.from_numpy(v), device) for k, v in ref.chunk(lo, hi).items()}
            for name, value in _position_stats(logits, tgt[lo:hi], record, ref_chunk).items():
                # per-position vectors wait on the device (one transfer per batch); V-wide codes do not
                parts.setdefault(name, []).append(value.cpu() if name == "codes" else value)
        self.stats.forward_tokens += len(batch) * width
        self.stats.scored += int(pos.numel())
        return _Launched(users, spans, refs, record, *_to_host({name: torch.cat(v) for name, v in parts.items()}))

    def _finish(self, launched: _Launched, keys: list[str]):
        """Waits for a launched batch's results and yields (row index, RowScores) per row
        (recording the reference's log-probabilities where asked)."""
        host = launched.host()
        lo = 0
        for i, m, r in zip(launched.users, launched.spans, launched.refs):
            sl = slice(lo, lo + m)
            lo += m
            scores = RowScores(host["nll"][sl].double().numpy(), host["greedy"][sl].numpy())
            if r is not None:
                scores.kld, scores.top1 = host["kld"][sl].numpy(), host["top1"][sl].numpy()
                scores.delta_p = host["delta_p"][sl].numpy()
            if launched.record and keys[i] in self.record_keys:
                self.record.put(keys[i], ReferenceRow(host["codes"][sl].numpy(), host["lo"][sl].float().numpy(),
                                                      host["step"][sl].float().numpy(), (-host["nll"][sl]).float().numpy(),
                                                      host["argmax"][sl].numpy()))
            yield i, scores

    def warm_up(self) -> float:
        """On a GPU, one short forward through the head before anything is timed: CUDA's lazy
        kernel loading, cuBLAS's start-up and the head check (0.5-1.3 s on the H200 with a 7B,
        benchmarks/results/cold-shapes-h200/) then land in the cell's `warmup_s` phase instead of
        in the first measurement. Returns the seconds it took (0 elsewhere: nothing to warm). A
        model that cannot score token rows (a vision model) is left to its measurements, which
        record their own errors."""
        device = torch.device(getattr(self.qmodel, "device", "cpu"))
        if device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        before = replace(self.stats)
        try:
            vocab = _vocab(self.head) if self.head.split is not None else 2
            ids = torch.arange(WARM_UP_TOKENS) * 7 % max(vocab - 1, 1) + 1
            self._launch([Row.of(ids, ids[1:])], [[0]], ["warm-up"], [False]).host()
        except Exception:  # noqa: BLE001 - warming is optional; the measurements report real failures
            pass
        self.stats = before  # not a measurement's work
        return time.perf_counter() - t0


@dataclass
class _Launched:
    """A batch queued on the device: which rows it scores and its per-position results on their
    way to the host (`host()` waits for them)."""

    users: list[int]
    spans: list[int]
    refs: list
    record: bool
    values: dict[str, torch.Tensor]  # host tensors, complete once `done` has passed
    done: torch.cuda.Event | None

    def host(self) -> dict[str, torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.values


def _batch_end(lengths: list[int], start: int, budget: int) -> int:
    """End of the batch that starts at `start` (rows sorted longest first): as many rows as the
    budget of padded tokens holds, closed before padding passes MAX_PADDING."""
    width = lengths[start]
    end, real = start + 1, width
    while end < len(lengths) and (end - start + 1) * width <= budget and \
            (end - start + 1) * width - (real + lengths[end]) <= MAX_PADDING * (end - start + 1) * width:
        real += lengths[end]
        end += 1
    return end


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device; to a GPU through pinned memory without waiting for the copy."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _to_host(values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Device tensors copied to the host: into pinned buffers behind an event on a GPU (read them
    after the event), directly elsewhere."""
    if not any(v.is_cuda for v in values.values()):
        return {k: v.cpu() for k, v in values.items()}, None
    host = {}
    for name, value in values.items():
        if value.is_cuda:
            host[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[name].copy_(value, non_blocking=True)
        else:
            host[name] = value
    done = torch.cuda.Event()
    done.record()
    return host, done


def _evaluating(qmodel) -> contextlib.AbstractContextManager:
    """The model's own scope for quality passes (`QuantizedModel.evaluating`: rtn dequantizes each
    weight once per call), or nothing for a model object without one."""
    scope = getattr(qmodel, "evaluating", None)
    return scope() if callable(scope) else contextlib.nullcontext()


def cell_scorer(qmodel, cell_dir: Path, reference_dir: Path | None, is_reference: bool,
                progress: Callable[[int, int, str], None] = lambda d, t, w: None) -> Scorer:
    """The scorer of one cell: the reference cell records into its own folder, the others read
    the reference cell's folder."""
    return Scorer(qmodel, progress, record=ReferenceStore(cell_dir) if is_reference else None,
                  reference=ReferenceStore(reference_dir) if reference_dir is not None else None)


def declare_reference_windows(ctx, measurements) -> None:
    """In the reference cell: the windows its measurements say comparing cells will read
    (`Measurement.reference_windows`), recorded by whichever pass scores them first."""
    if ctx.scorer.record is None:
        return
    for measurement, params in measurements:
        windows = measurement.reference_windows(ctx, params)
        ctx.scorer.record_keys |= {row_key(window_row(w)) for w in (windows if windows is not None else [])}


def _position_stats(logits: torch.Tensor, targets: torch.Tensor, record: bool, ref: dict | None) -> dict[str, torch.Tensor]:
    """Per position, from float32 logits (N, V): nll, greedy, the reference entries to record
    (reference cell), or the divergence from the stored reference."""
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, targets[:, None]).squeeze(-1)
    nll = lse - target_logit
    argmax = logits.argmax(-1)
    out = {"nll": nll, "greedy": argmax == targets, "argmax": argmax}
    if record:
        logp = logits - lse[:, None]
        lo = logp.amin(-1)
        step = ((logp.amax(-1) - lo) / 65535.0).clamp_min(1e-12)
        out["codes"] = ((logp - lo[:, None]) / step[:, None]).round_().clamp_(0, 65535).to(torch.int32).to(torch.uint16)
        out["lo"], out["step"] = lo, step
    if ref is not None:
        out["kld"] = _kl_from_codes(ref, logits, lse).double().clamp_min(0.0)
        out["top1"] = argmax == ref["argmax"]
        out["delta_p"] = (-nll.double()).exp() - ref["target_logp"].double().exp()
    return out


def _kl_from_codes(ref: dict, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_q) per position from the stored 16-bit codes (renormalized after rounding)
    and the model's float32 logits, in place on one V-wide buffer: with u = lo + codes * step
    shifted so its largest entry is 0, e = exp(u), d = u - logits shifted by its value at that
    entry, KL = <e, d> / sum(e) + shift + lse - log sum(e). The same quantity as
    sum(p * (log p - log q)) taken term by term, with two V-wide temporaries instead of seven
    (2.4x faster on 2 CPU cores; against float64, max error 9e-7 a position, as before)."""
    u = ref["codes"].to(torch.float32)
    u.mul_(ref["step"][:, None]).add_(ref["lo"][:, None])
    top, at = u.max(-1, keepdim=True)
    u.sub_(top)
    e = u.exp()
    total = e.sum(-1)
    u.sub_(logits)
    shift = u.gather(-1, at)
    u.sub_(shift)
    return torch.linalg.vecdot(e, u) / total + shift.squeeze(-1) + lse - total.log()


class _BatchReference:
    """The stored rows of a batch over all its scored positions, in order, cut into the head's
    chunks without first copying the whole batch's V-wide codes into one array (a chunk that lies
    inside one row is a view; 0.6 s of a 2-core cell's perplexity went to that copy). Rows without
    a reference get a uniform filler whose divergence is computed and dropped."""

    NAMES = ("codes", "lo", "step", "target_logp", "argmax")

    def __init__(self, refs: list[ReferenceRow | None], spans: list[int]):
        vocab = next(r for r in refs if r is not None).codes.shape[1]
        filler = lambda m: ReferenceRow(np.zeros((m, vocab), np.uint16), np.zeros(m, np.float32),  # noqa: E731
                                        np.ones(m, np.float32), np.zeros(m, np.float32), np.zeros(m, np.int64))
        self.rows = [r if r is not None else filler(m) for r, m in zip(refs, spans)]
        for r, m in zip(self.rows, spans):
            if r.target_logp.shape[0] != m:
                raise HarnessError(f"a stored reference row has {r.target_logp.shape[0]} positions, the row {m}")
        self.starts = np.cumsum([0, *spans]).tolist()

    def chunk(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Positions lo..hi-1 of the batch, per stored field."""
        pieces = [(r, max(lo - s, 0), min(hi - s, e - s)) for r, s, e in zip(self.rows, self.starts, self.starts[1:])
                  if s < hi and e > lo]
        if len(pieces) == 1:
            r, a, b = pieces[0]
            return {name: getattr(r, name)[a:b] for name in self.NAMES}
        return {name: np.concatenate([getattr(r, name)[a:b] for r, a, b in pieces]) for name in self.NAMES}


def _stack_reference(refs: list[ReferenceRow | None], spans: list[int]) -> _BatchReference | None:
    """The batch's stored reference rows (None: no row of the batch has one)."""
    return None if all(r is None for r in refs) else _BatchReference(refs, spans)


def _vocab(head: Head) -> int:
    layer = head.split[1] if head.split else None
    weight = getattr(layer, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 131072


def _bytes_per_token(qmodel) -> float:
    """A generous estimate of activation memory per token in one forward (hidden states and MLP
    intermediates of a layer in the model's dtype, a few times over): sizes 'auto' batches."""
    config = getattr(qmodel.module, "config", None)
    hidden = getattr(config, "hidden_size", 4096) or 4096
    inter = getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden
    return float(4 * (8 * hidden + 4 * inter))


def _free_device_memory(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
