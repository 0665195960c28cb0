"""Memory bandwidth ceiling: a large device-to-device copy (GPU) or memcpy (CPU), counting the
bytes read plus the bytes written. The buffer is far larger than the last-level cache and holds
random data (never zeros)."""

from __future__ import annotations

from harness.perf.probes import Ceiling
from harness.perf.timing import repeat


def _torch_copy(dst, src):
    dst.copy_(src)


def _copiers(cuda: bool) -> dict:
    """torch's copy_ everywhere; on CUDA also a streaming Triton copy (blocks of 8K / 16K int32)
    when Triton imports. Missing Triton is not an error: the probe then measures copy_ alone."""
    found = {"torch copy_": _torch_copy}
    if cuda:
        try:
            from harness.perf.probes import triton_copy
        except Exception:  # noqa: BLE001 - no Triton: torch's copy only
            return found
        for block, warps in ((8192, 8), (16384, 16)):
            found[f"triton streaming copy (block {block}, {warps} warps)"] = (
                lambda d, s, b=block, w=warps: triton_copy.copy(d, s, block=b, num_warps=w))
    return found


def _one(device: str, nbytes: int, warmup: int, repeats: int, copier=_torch_copy):
    import torch

    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    samples = repeat(lambda: copier(dst, src), device, warmup, repeats)
    if not torch.equal(dst, src):
        raise RuntimeError("copy probe: destination does not match source")
    return samples


def probe(device: str, quick: bool = False) -> list[Ceiling]:
    """The best median over a few buffer sizes (all far above the cache) and copy methods: an
    achievable ceiling. A method that fails is skipped (the note says which one won)."""
    import torch

    cuda = str(device).startswith("cuda")
    sizes = [256 << 20, 1 << 30, 4 << 30] if cuda else ([64 << 20] if quick else [128 << 20, 512 << 20])
    warmup, repeats = (3, 20) if cuda else (2, 4 if quick else 7)
    best, tried, failed = None, {}, []
    for method, copier in _copiers(cuda).items():
        for nbytes in sizes:
            try:
                samples = _one(device, nbytes, warmup, repeats, copier)
            except Exception as exc:  # noqa: BLE001 - a failing method only loses its own numbers
                failed.append(f"{method}: {type(exc).__name__}: {str(exc)[:120]}")
                break
            rate, spread = samples.rate_spread(2 * nbytes)
            tried[f"{method} @ {nbytes >> 20} MiB"] = rate
            if best is None or rate > best[0]:
                best = (rate, spread, nbytes, samples, method)
    rate, spread, nbytes, samples, method = best
    where = "device-to-device" if cuda else f"on CPU ({torch.get_num_threads()} threads)"
    others = "; ".join(f"{k} {v / 1e9:.0f} GB/s" for k, v in tried.items())
    return [Ceiling("memory_bandwidth", rate, "bytes/s", samples.n, spread,
                    f"{method} {where}, random int32, bytes read + written, best median over "
                    f"{len(tried)} (method, size) pairs (sizes {', '.join(f'{s >> 20} MiB' for s in sizes)}), "
                    f"warm-up {warmup}, median of {repeats} each; won: {method} @ {nbytes >> 20} MiB. All: {others}"
                    + (f". Failed: {'; '.join(failed)}" if failed else ""), samples.seconds)]
