"""Quantized linears as the runtime calls them: gather the input where the plan says, then multiply.

`quant_linear` is the one place a quantized matmul is chosen: on CUDA, the W4A16 kernel op of `plugins.ops` when it
imports and accepts the layer; everywhere else (and as the reference) the exact path, `Linear`, which dequantizes
once into the compute dtype. Both read the same v2 tensors the rank file stores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.gptq.checkpoint import pack_layer
from pipeline.gptq.int4 import unpack_cols, unpack_rows
from pipeline.gptq.layer import QuantLinear, dequantize, has_whole_groups, pad_groups
from pipeline.runtime.comm import Comm
from pipeline.runtime.model import LinearFn


def shard_layer(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> QuantLinear:
    """The QuantLinear a rank file stores under `name` (v2 zeros; g_idx is implicit when groups are contiguous)."""
    q = unpack_rows(tensors[f"{name}.qweight"])
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is None:
        g_idx = (torch.arange(q.shape[0]) // group_size).to(torch.int32)
    return QuantLinear(q=q, zeros=unpack_cols(tensors[f"{name}.qzeros"]), scales=tensors[f"{name}.scales"],
                       g_idx=g_idx, group_size=group_size, bias=tensors.get(f"{name}.bias"))


def side_by_side(layers: list[QuantLinear]) -> QuantLinear:
    """One layer computing `layers` side by side, for layers that read the same input through the same groups (q/k/v,
    gate/up): one matmul (one kernel launch, one input gather) instead of several."""
    first = layers[0]
    return QuantLinear(q=torch.cat([lay.q for lay in layers], 1), zeros=torch.cat([lay.zeros for lay in layers], 1),
                       scales=torch.cat([lay.scales for lay in layers], 1), g_idx=first.g_idx,
                       group_size=first.group_size,
                       bias=None if first.bias is None else torch.cat([lay.bias for lay in layers]))


class SplitLinear:
    """A `side_by_side` layer whose output is split back into its members' outputs."""

    def __init__(self, inner: LinearFn, sizes: list[int]):
        self.inner, self.sizes = inner, sizes

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.inner(x).split(self.sizes, dim=-1)


class Linear:
    """`y = x[..., in_perm] @ W + bias` with W dequantized once, in the compute dtype.

    This is the exact path (CPU, and the reference): the weight is dequantized with its own g_idx, so it is right for
    contiguous and general groups alike.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, in_perm: torch.Tensor | None = None):
        self.weight, self.bias, self.in_perm = weight, bias, in_perm

    @classmethod
    def from_quant(cls, layer: QuantLinear, in_perm: torch.Tensor | None, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> Linear:
        bias = None if layer.bias is None else layer.bias.to(device, dtype)
        perm = None if in_perm is None else in_perm.to(device)
        return cls(dequantize(layer, dtype).to(device), bias, perm)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_perm is not None:
            x = x[..., self.in_perm]
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class KernelLinear:
    """The same layer through `plugins.ops.w4a16_linear`: packed weights stay packed, the kernel gathers `in_perm`."""

    def __init__(self, op: Callable, weights: dict[str, torch.Tensor], group_size: int,
                 in_perm: torch.Tensor | None, bias: torch.Tensor | None):
        self.op, self.weights, self.group_size = op, weights, group_size
        self.in_perm, self.bias = in_perm, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weights, self.group_size, self.in_perm, bias=self.bias)


class GatheredLinear:
    """The naive baseline's row-parallel input: AllGather every rank's slice, reorder the full width, keep ours.

    `index` holds the original input rows of this rank's shard, so `all_gather(x)[..., index]` is the paper's
    "reorder by P2, take the local chunk" in one full-width index: the AllGather and that index are what the TP-aware
    layout removes.
    """

    def __init__(self, comm: Comm, index: torch.Tensor, inner: LinearFn):
        self.comm, self.index, self.inner = comm, index, inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.comm.all_gather(x)[..., self.index])


def quant_linear(layer: QuantLinear, in_perm: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: bool = True) -> LinearFn:
    """The layer as the runtime multiplies it: the W4A16 kernel on CUDA when available, else the exact `Linear`."""
    op = kernel_op() if kernel and torch.device(device).type == "cuda" else None
    linear = None if op is None else kernel_linear(op, layer, in_perm, dtype, device)
    return linear or Linear.from_quant(layer, in_perm, dtype, device)


def kernel_linear(op: Callable, layer: QuantLinear, in_perm: torch.Tensor | None, dtype: torch.dtype,
                  device: torch.device | str) -> KernelLinear | None:
    """`layer` for `op` (`plugins.ops.w4a16_linear`), or None when the kernel does not take its layout.

    A shard whose groups are cut (local-sort: o_proj at tp > 1, a down projection the MLP trick cannot take) is padded
    to whole groups first (`kernel_groups`): the kernel's contiguous path with its fused gather then runs it, 3.9-4.8x
    faster than the general g_idx path, which looks scales and zeros up per row (plugins/NOTES.md "Session 13").
    """
    from plugins.layout import to_kernel_layout

    layer, in_perm = kernel_groups(layer, in_perm)
    packed = pack_layer(layer, "gptq_v2")
    try:
        weights = to_kernel_layout(packed["qweight"], packed["qzeros"], packed["scales"], layer.group_size)
    except (TypeError, ValueError):  # e.g. bf16 scales or group_size -1
        return None
    bias = None if layer.bias is None else layer.bias.to(device, dtype)
    return KernelLinear(op, {k: v.to(device) for k, v in weights.items()}, layer.group_size,
                        None if in_perm is None else in_perm.to(device), bias)


def kernel_groups(layer: QuantLinear, in_perm: torch.Tensor | None
                  ) -> tuple[QuantLinear, torch.Tensor | None]:
    """`layer` with whole groups, as the kernel takes it, and its input gather: as it is where its groups are whole,
    else padded to whole groups of the kernel's group size that takes the least time.

    Each group's rows are padded to whole blocks (`pad_groups`); a padding row is a zero weight, so it may read any
    input column (column 0). The time is the padded bytes over the kernel's speed at that group size: at tp=2 a
    local-sort shard holds about half of each 128-row group, and blocks of 64 (1.5x its rows) beat blocks of 32 (1.25x,
    slower K steps) and of 128 (2x).
    """
    from plugins.layout import GROUP_SPEED

    if has_whole_groups(layer.g_idx, layer.group_size):
        return layer, in_perm
    counts = torch.bincount(layer.g_idx.long())

    def cost(block: int) -> float:  # bytes per output column (int4 rows, fp16 scales and int4 zeros) over speed
        rows = int(((counts + block - 1) // block * block).sum())
        return (rows / 2 + rows / block * 2.5) / GROUP_SPEED[block]

    padded, source = pad_groups(layer, in_perm, min(GROUP_SPEED, key=cost))
    return padded, torch.where(source < layer.in_features, source, 0)


def kernel_op() -> Callable | None:
    """`plugins.ops.w4a16_linear`, or None where the plugin package is absent."""
    try:
        from plugins.ops import w4a16_linear
    except ImportError:
        return None
    return w4a16_linear
