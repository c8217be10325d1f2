"""What `tpaware inspect` reports: per quantized layer, its shape, groups, act order, and the TP degrees whose
MLP trick applies (pure: a checkpoint in, rows out)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.arch import arch_of, dims_of
from pipeline.gptq.checkpoint import Checkpoint
from pipeline.gptq.layer import act_order_perm, has_whole_groups
from pipeline.plan import tp_aware_infeasibility

TP_DEGREES = (1, 2, 3, 4, 8)


@dataclass(frozen=True)
class LayerReport:
    name: str
    in_features: int
    out_features: int
    groups: int
    act_order: bool  # g_idx is not the trivial k // group_size
    whole_groups: bool  # after sorting by g_idx, every group is exactly group_size contiguous rows
    mlp_trick_tp: tuple[int, ...]  # for MLP down layers: tp degrees where the TP-aware plan applies


def inspect_checkpoint(ckpt: Checkpoint) -> list[LayerReport]:
    arch = arch_of(ckpt.config)
    dims = dims_of(arch, ckpt.config)
    rows = []
    for name, layer in ckpt.layers.items():
        trick = ()
        if name.endswith("." + arch.mlp_out):
            trick = tuple(tp for tp in TP_DEGREES
                          if dims.intermediate % tp == 0
                          and tp_aware_infeasibility(layer.g_idx, layer.group_size, tp) is None)
        rows.append(LayerReport(
            name=name, in_features=layer.in_features, out_features=layer.out_features,
            groups=int(layer.scales.shape[0]),
            act_order=not has_whole_groups(layer.g_idx, layer.group_size),
            whole_groups=has_whole_groups(layer.g_idx[act_order_perm(layer.g_idx)], layer.group_size),
            mlp_trick_tp=trick,
        ))
    return rows
