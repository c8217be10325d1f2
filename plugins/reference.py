"""fp64 reference and random test layers, shared by the tests and the benchmark's --check."""

from __future__ import annotations

import torch

from plugins.layout import dequantize, to_kernel_layout


def random_layer(
    k: int,
    n: int,
    group_size: int,
    *,
    generator: torch.Generator,
    act_order: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Random int4 layer in kernel layout, on the generator's device (never all zeros).

    Words are drawn directly, so every nibble is uniform on 0..15 without packing cost.  With
    `act_order`, also returns a shuffled `g_idx` (each group keeps group_size rows, as GPTQ's
    act-order produces), else None.  Scales are positive, about 1/64, like real GPTQ scales.
    """
    groups = k // group_size
    dev = generator.device

    def words(rows: int, cols: int) -> torch.Tensor:
        w = torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=generator, device=dev)
        return w.to(torch.int32)

    s = (torch.rand(groups, n, generator=generator, device=dev) + 0.5) / 64
    weights = to_kernel_layout(words(k // 8, n), words(groups, n // 8), s.to(torch.float16), group_size)
    if not act_order:
        return weights, None
    order = torch.randperm(k, generator=generator, device=dev)
    return weights, (torch.arange(k, device=dev) // group_size)[order].to(torch.int32)


def reference(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    group_size: int,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """X[:, in_perm] @ dequant(W) in float64 (the dequantized weights are exact in fp32)."""
    w = dequantize(weights, group_size, g_idx, dtype=torch.float64)
    if in_perm is not None:
        x = x[:, in_perm.to(device=x.device, dtype=torch.long)]
    return x.double() @ w


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; any non-finite output (e.g. an unwritten NaN-poisoned element) is inf."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
