"""One GPTQ linear layer, unpacked, and the exact transforms the converter applies to it.

Everything here is a pure function of tensors. A layer computes `y = x @ W + bias` with
`W[k, n] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]`; K is the input dimension, N the output one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantLinear:
    """An unpacked 4-bit GPTQ layer. `zeros` holds the true zero point z, 0..15 (v2 semantics; the reader undoes
    GPTQ v1's stored z - 1)."""

    q: torch.Tensor  # uint8 [K, N], values 0..15
    zeros: torch.Tensor  # uint8 [G, N]
    scales: torch.Tensor  # float [G, N] (fp16 in checkpoints)
    g_idx: torch.Tensor  # int32 [K], group of each input row
    group_size: int  # rows per group in the original layer (K for group_size -1)
    bias: torch.Tensor | None = None  # [N]

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]


def dequantize(layer: QuantLinear, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The reference weight [K, N]: every row looks its group up through g_idx, wherever it is."""
    g = layer.g_idx.long()
    q = layer.q.to(dtype)
    return (q - layer.zeros[g].to(dtype)) * layer.scales[g].to(dtype)


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor:
    """`perm = argsort(g_idx, stable)`: `W[perm]` has each group's rows together, in their original relative order."""
    return torch.argsort(g_idx.long(), stable=True)


def has_whole_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when row k belongs to group k // group_size: groups are contiguous, in order, exactly `group_size` rows."""
    expected = torch.arange(g_idx.numel(), dtype=torch.long, device=g_idx.device) // group_size
    return bool(torch.equal(g_idx.long(), expected))


def select(layer: QuantLinear, rows: torch.Tensor, cols: torch.Tensor, keep_bias: bool = True) -> QuantLinear:
    """The sub-layer of original input rows `rows` (in that order) and output columns `cols`.

    Only the groups the rows touch keep their scales and zeros (sharded, not replicated), renumbered in order of first
    group id, and g_idx is remapped to them; `keep_bias=False` drops the bias (row-parallel shards but one).
    """
    rows, cols = rows.long(), cols.long()
    row_groups = layer.g_idx.long()[rows]
    groups = torch.unique(row_groups)  # sorted
    local_g_idx = torch.searchsorted(groups, row_groups).to(torch.int32)
    bias = layer.bias[cols] if (layer.bias is not None and keep_bias) else None
    return QuantLinear(
        q=layer.q[rows][:, cols].contiguous(),
        zeros=layer.zeros[groups][:, cols].contiguous(),
        scales=layer.scales[groups][:, cols].contiguous(),
        g_idx=local_g_idx,
        group_size=layer.group_size,
        bias=None if bias is None else bias.contiguous(),
    )


def pad_groups(layer: QuantLinear, in_perm: torch.Tensor | None, block: int) -> tuple[QuantLinear, torch.Tensor]:
    """`layer` with each group's rows padded to whole blocks of `block` rows, and the input column each row reads.

    A row-parallel shard split in checkpoint order (local-sort) holds part of nearly every group, so its groups are
    neither contiguous nor `group_size` rows; kernels and formats with uniform blocks take it once every group owns
    whole blocks. Stored row k reads input column `in_perm[k]` (or k); groups keep their order and their rows their
    stored order. A padding row holds its group's zero point in every column, so it dequantizes to exactly 0, and
    reads column `in_features` (past the input: the caller gathers a zero there, or any column). The result has whole
    groups of `block` rows; the second tensor (int64 [rows]) is the input column of each of its rows.
    """
    k, device = layer.in_features, layer.q.device
    source_col = torch.arange(k, device=device) if in_perm is None else in_perm.to(device, torch.long)
    g_idx = layer.g_idx.long()
    groups = layer.scales.shape[0]
    counts = torch.bincount(g_idx, minlength=groups)
    blocks_per_group = (counts + block - 1) // block
    slot_start = torch.cumsum(blocks_per_group * block, 0) - blocks_per_group * block
    row_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(g_idx, stable=True)
    g_sorted = g_idx[order]
    slot = slot_start[g_sorted] + torch.arange(k, device=device) - row_start[g_sorted]
    block_group = torch.repeat_interleave(torch.arange(groups, device=device), blocks_per_group)
    zeros = layer.zeros[block_group]
    q = zeros.repeat_interleave(block, dim=0)  # padding: the zero point
    q[slot] = layer.q[order]
    source = torch.full((q.shape[0],), k, dtype=torch.long, device=device)
    source[slot] = source_col[order]
    g_idx = (torch.arange(q.shape[0], device=device) // block).to(torch.int32)
    padded = QuantLinear(q=q, zeros=zeros, scales=layer.scales[block_group], g_idx=g_idx, group_size=block,
                         bias=layer.bias)
    return padded, source
