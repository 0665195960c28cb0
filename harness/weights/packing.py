"""Dense bit-packing of small integer codes into uint8 storage.

Quantized weights are only as small as the bytes that hold them: a 3-bit code kept in a uint8
would silently count as 8 bits. Codes are packed 8 at a time into `bits` bytes (little-endian:
code i of a group sits at bit `bits*i` of a 64-bit word), so any width 1..8 packs exactly, with at
most 7 padding codes at the end. Everything is vectorised; no Python loops over elements.
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes `pack_bits` produces for `numel` codes of `bits` bits (padded to 8 codes)."""
    return -(-numel // 8) * bits


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (each < 2**bits, any shape, flattened) into a fresh 1-D uint8 tensor of
    `packed_nbytes(values.numel(), bits)` bytes."""
    _check_bits(bits)
    if values.dtype != torch.uint8:
        raise TypeError(f"pack_bits expects uint8 codes, got {values.dtype}")
    flat = values.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2**{bits}, found {int(flat.max())}")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.clone()
    dev = flat.device
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, stay in uint8 (same layout as below)
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
        return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    codes = flat.view(-1, 8).to(torch.int64)
    words = (codes << (torch.arange(8, device=dev) * bits)).sum(dim=1)  # disjoint bits: sum == or
    byte_shifts = torch.arange(bits, device=dev) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"expected {packed_nbytes(numel, bits)} uint8 bytes for {numel} {bits}-bit codes, "
            f"got {packed.numel()} {packed.dtype}"
        )
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:numel]
    dev = flat.device
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
        return ((flat.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]
    groups = flat.view(-1, bits).to(torch.int64)
    words = (groups << (torch.arange(bits, device=dev) * 8)).sum(dim=1)
    codes = (words.unsqueeze(1) >> (torch.arange(8, device=dev) * bits)) & mask
    return codes.to(torch.uint8).reshape(-1)[:numel]
