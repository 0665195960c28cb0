"""A streaming Triton copy for the bandwidth probe: wide blocks, evict-first loads and streaming
stores (the copied data is never re-read, so it should not displace L2). Imported only on CUDA
machines with Triton; the probe keeps whichever copy (torch's or this) moves more bytes."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask, eviction_policy="evict_first"), mask=mask,
             cache_modifier=".cs")


def copy(dst, src, block: int = 8192, num_warps: int = 8) -> None:
    n = src.numel()
    _copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block, num_warps=num_warps)
