"""Packing of 4-bit values into int32 words, the GPTQ way.

GPTQ packs eight 4-bit values per int32, low nibble first: nibble i of `qweight[r, n]` is row k = 8r + i, and nibble j
of `qzeros[g, c]` is column n = 8c + j. Every transform in this project works on unpacked uint8 tensors and packs
only at the edges, so these four functions are the only place the bit layout is written down.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K/8, N] -> uint8 [K, N]: the k-th row is nibble k % 8 of packed row k // 8."""
    rows, cols = packed.shape
    nibbles = (packed.to(torch.int32).unsqueeze(1) >> _SHIFTS.to(packed.device).view(1, 8, 1)) & 0xF
    return nibbles.reshape(rows * 8, cols).to(torch.uint8)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """uint8 [K, N] (0..15, K % 8 == 0) -> int32 [K/8, N]; the inverse of `unpack_rows`."""
    k, n = values.shape
    grouped = values.to(torch.int64).reshape(k // 8, 8, n) << _SHIFTS.to(values.device, torch.int64).view(1, 8, 1)
    return _to_int32(grouped.sum(dim=1))


def unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [G, N/8] -> uint8 [G, N]: column n is nibble n % 8 of packed column n // 8."""
    rows, cols = packed.shape
    nibbles = (packed.to(torch.int32).unsqueeze(2) >> _SHIFTS.to(packed.device).view(1, 1, 8)) & 0xF
    return nibbles.reshape(rows, cols * 8).to(torch.uint8)


def pack_cols(values: torch.Tensor) -> torch.Tensor:
    """uint8 [G, N] (0..15, N % 8 == 0) -> int32 [G, N/8]; the inverse of `unpack_cols`."""
    g, n = values.shape
    grouped = values.to(torch.int64).reshape(g, n // 8, 8) << _SHIFTS.to(values.device, torch.int64).view(1, 1, 8)
    return _to_int32(grouped.sum(dim=2))


# GPTQ v1 files store every zero point minus one, subtracted from the packed int32 word as a whole (as GPTQModel and
# AutoGPTQ write them): a zero point of 0 borrows from its neighbour, so the offset is undone per word, not per nibble.
_V1_ZERO_OFFSET = 0x11111111


def v1_to_v2_zeros(packed: torch.Tensor) -> torch.Tensor:
    """Packed GPTQ v1 qzeros (stored z - 1) -> packed v2 qzeros (stored z)."""
    return _to_int32((packed.to(torch.int64) + _V1_ZERO_OFFSET) & 0xFFFFFFFF)


def v2_to_v1_zeros(packed: torch.Tensor) -> torch.Tensor:
    """Packed v2 qzeros -> packed v1 qzeros; the inverse of `v1_to_v2_zeros` for every word."""
    return _to_int32((packed.to(torch.int64) - _V1_ZERO_OFFSET) & 0xFFFFFFFF)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit sums (held in int64) as int32, wrapping the sign bit like C does."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
