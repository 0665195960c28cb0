"""Memory bandwidth ceiling: a large device-to-device copy (GPU) or memcpy (CPU), counting the
bytes read plus the bytes written. The buffer is far larger than the last-level cache and holds
random data (never zeros)."""

from __future__ import annotations

from harness.perf.probes import Ceiling
from harness.perf.timing import repeat


def _one(device: str, nbytes: int, warmup: int, repeats: int):
    import torch

    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    samples = repeat(lambda: dst.copy_(src), device, warmup, repeats)
    if not torch.equal(dst[-1024:], src[-1024:]):
        raise RuntimeError("copy probe: destination does not match source")
    return samples


def probe(device: str, quick: bool = False) -> list[Ceiling]:
    """The best median over a few buffer sizes (all far above the cache): an achievable ceiling."""
    import torch

    cuda = str(device).startswith("cuda")
    sizes = [256 << 20, 1 << 30, 4 << 30] if cuda else ([64 << 20] if quick else [128 << 20, 512 << 20])
    warmup, repeats = (3, 20) if cuda else (2, 4 if quick else 7)
    best = None
    for nbytes in sizes:
        samples = _one(device, nbytes, warmup, repeats)
        rate, spread = samples.rate_spread(2 * nbytes)
        if best is None or rate > best[0]:
            best = (rate, spread, nbytes, samples)
    rate, spread, nbytes, samples = best
    what = "torch copy_ device-to-device" if cuda else f"torch copy_ on CPU ({torch.get_num_threads()} threads)"
    return [Ceiling("memory_bandwidth", rate, "bytes/s", samples.n, spread,
                    f"{what}, random int32, bytes read + written, best median of {len(sizes)} sizes "
                    f"({', '.join(f'{s >> 20} MiB' for s in sizes)}; best {nbytes >> 20} MiB), "
                    f"warm-up {warmup}, median of {repeats} each", samples.seconds)]
