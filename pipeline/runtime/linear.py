"""Quantized linears as the runtime calls them: gather the input where the plan says, then multiply."""

from __future__ import annotations

import torch

from pipeline.gptq.int4 import unpack_cols, unpack_rows
from pipeline.gptq.layer import QuantLinear, dequantize


def shard_layer(tensors: dict[str, torch.Tensor], name: str, group_size: int) -> QuantLinear:
    """The QuantLinear a rank file stores under `name` (v2 zeros; g_idx is implicit when groups are contiguous)."""
    q = unpack_rows(tensors[f"{name}.qweight"])
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is None:
        g_idx = (torch.arange(q.shape[0]) // group_size).to(torch.int32)
    return QuantLinear(q=q, zeros=unpack_cols(tensors[f"{name}.qzeros"]), scales=tensors[f"{name}.scales"],
                       g_idx=g_idx, group_size=group_size, bias=tensors.get(f"{name}.bias"))


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
