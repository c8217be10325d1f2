"""The TP-aware plan: which original rows and columns of every quantized layer each rank keeps, and in what order.

Pure functions, no files. Convention (everywhere in tpaware): a permutation `perm` acts as `W_sorted = W[perm]` on
rows and `X_sorted = X[:, perm]` on inputs, so `X_sorted @ W_sorted == X @ W`.

Per rank r, a layer keeps `rows[r]` (original input rows, in stored order) and `cols[r]` (original output columns,
in stored order); it multiplies `X_local[:, in_perm[r]]`, where X_local is the input the rank holds for that layer.

- Column-parallel layers (q/k/v, gate/up, c_attn, c_fc) see the whole input, so their rows are sorted by their own
  act-order permutation `argsort(g_idx)`: groups become contiguous and the gather `X[:, perm]` is local.
- The MLP trick (Hoque et al. 2024): with `P2 = argsort(g_idx of down)`, gate/up keep columns `P2[chunk r]`, so
  rank r's slice of the intermediate is exactly the input of down's rows `P2[chunk r]`: whole groups, sharded
  scales, no gather, no AllGather. It needs whole groups and `(K_down / tp) % group_size == 0`.
- Otherwise a row-parallel layer is split in checkpoint order and each rank sorts its own rows ("local-sort"), keeping
  only the groups it touches; or, for o_proj with `attn_policy="masked"`, every rank holds the whole o_proj and
  multiplies a zero-filled full-width input ("masked", the authors' TGI approach).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.arch import Arch, Dims, layer_name
from pipeline.errors import InputError
from pipeline.gptq.layer import act_order_perm, has_whole_groups

ATTN_POLICIES = ("local", "masked")


@dataclass(frozen=True)
class LayerPlan:
    parallel: str  # "column" | "row"
    policy: str  # "sorted" (column) | "tpaware" | "local-sort" | "masked"
    reason: str
    rows: list[torch.Tensor]
    cols: list[torch.Tensor | None]  # None: all columns
    in_perm: list[torch.Tensor | None]
    keep_bias: list[bool]


@dataclass(frozen=True)
class RankHeads:
    """The attention heads a rank computes: q heads [q_start, q_start+q_count), kv heads likewise."""

    q_start: int
    q_count: int
    kv_start: int
    kv_count: int


@dataclass
class Plan:
    tp: int
    attn_policy: str
    heads: list[RankHeads]
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def rank_heads(dims: Dims, tp: int) -> list[RankHeads]:
    """Split q heads evenly; kv heads too, or replicate them when tp exceeds them (as vLLM does)."""
    if dims.heads % tp:
        raise InputError(f"tp={tp} does not divide num_attention_heads={dims.heads}")
    if dims.kv_heads % tp and tp % dims.kv_heads:
        raise InputError(f"tp={tp} neither divides nor is a multiple of num_key_value_heads={dims.kv_heads}")
    if dims.intermediate % tp:
        raise InputError(f"tp={tp} does not divide intermediate_size={dims.intermediate}")
    q_count = dims.heads // tp
    kv_count = max(dims.kv_heads // tp, 1)
    ranks_per_kv = max(tp // dims.kv_heads, 1)
    return [RankHeads(r * q_count, q_count, (r // ranks_per_kv) * kv_count, kv_count) for r in range(tp)]


def plan_model(arch: Arch, dims: Dims, g_idx: dict[str, torch.Tensor], group_sizes: dict[str, int], tp: int,
               attn_policy: str = "local") -> Plan:
    """Plan every quantized layer of every decoder layer from each layer's g_idx and group size, by layer name."""
    if tp < 1:
        raise InputError(f"tp={tp} must be at least 1")
    if attn_policy not in ATTN_POLICIES:
        raise InputError(f"attn_policy={attn_policy!r} must be one of {ATTN_POLICIES}")
    plan = Plan(tp=tp, attn_policy=attn_policy, heads=rank_heads(dims, tp))
    for i in range(dims.layers):
        def name(n: str) -> str:
            return layer_name(arch, i, n)
        for n in (*arch.qkv, arch.o_proj, *arch.mlp_in, arch.mlp_out):
            if name(n) not in g_idx:
                raise InputError("quantized layer missing from the checkpoint", tensor=f"{name(n)}.qweight")
        qkv_cols = _qkv_columns(arch, dims, plan.heads)
        for n, cols in zip(arch.qkv, qkv_cols):
            plan.layers[name(n)] = column_layer(g_idx[name(n)], cols)
        plan.layers[name(arch.o_proj)] = (
            masked_row_layer(g_idx[name(arch.o_proj)], tp) if attn_policy == "masked"
            else local_sort_row_layer(g_idx[name(arch.o_proj)], tp, "o_proj mixes heads: a global sort would cross ranks")
        )
        down, mlp_in = mlp_layers(g_idx[name(arch.mlp_out)], [g_idx[name(n)] for n in arch.mlp_in],
                                  group_sizes[name(arch.mlp_out)], tp)
        plan.layers[name(arch.mlp_out)] = down
        for n, layer_plan in zip(arch.mlp_in, mlp_in):
            plan.layers[name(n)] = layer_plan
        if down.policy != "tpaware":
            plan.warnings.append(f"{name(arch.mlp_out)}: {down.reason}")
    return plan


def column_layer(g_idx: torch.Tensor, cols: list[torch.Tensor]) -> LayerPlan:
    """A column-parallel layer: rank r keeps `cols[r]`, every rank sorts rows by act order and gathers its input."""
    perm = act_order_perm(g_idx)
    in_perm = None if _is_identity(perm) else perm
    tp = len(cols)
    return LayerPlan("column", "sorted", "rows sorted by g_idx; input gathered locally", [perm] * tp, cols,
                     [in_perm] * tp, [True] * tp)


def mlp_layers(down_g_idx: torch.Tensor, in_g_idx: list[torch.Tensor], group_size: int, tp: int
               ) -> tuple[LayerPlan, list[LayerPlan]]:
    """The down (c_proj) plan and the gate/up (c_fc) plans: TP-aware where feasible, local-sort otherwise."""
    p2 = act_order_perm(down_g_idx)
    reason = tp_aware_infeasibility(down_g_idx, group_size, tp)
    if reason is None:
        chunks = list(p2.chunk(tp))
        down = LayerPlan("row", "tpaware", "W1 columns permuted by P2: whole groups per rank, no AllGather",
                         chunks, [None] * tp, [None] * tp, [r == 0 for r in range(tp)])
        mlp_in = [column_layer(g, chunks) for g in in_g_idx]
        return down, mlp_in
    down = local_sort_row_layer(down_g_idx, tp, reason)
    mlp_in = [column_layer(g, list(torch.arange(down_g_idx.numel()).chunk(tp))) for g in in_g_idx]
    return down, mlp_in


def tp_aware_infeasibility(down_g_idx: torch.Tensor, group_size: int, tp: int) -> str | None:
    """Why the MLP trick cannot apply to this down layer at this tp, or None when it can."""
    k = down_g_idx.numel()
    if not has_whole_groups(down_g_idx[act_order_perm(down_g_idx)], group_size):
        return "groups are not all exactly group_size rows; falling back to local-sort"
    if (k // tp) % group_size:
        return f"K/tp = {k}/{tp} is not a multiple of group_size {group_size}; falling back to local-sort"
    return None


def local_sort_row_layer(g_idx: torch.Tensor, tp: int, reason: str) -> LayerPlan:
    """Row-parallel split in checkpoint order; each rank sorts its own rows and keeps only the groups it touches."""
    rows, in_perm = [], []
    for chunk in torch.arange(g_idx.numel()).chunk(tp):
        local = act_order_perm(g_idx[chunk])
        rows.append(chunk[local])
        in_perm.append(None if _is_identity(local) else local)
    return LayerPlan("row", "local-sort", reason, rows, [None] * tp, in_perm, [r == 0 for r in range(tp)])


def masked_row_layer(g_idx: torch.Tensor, tp: int) -> LayerPlan:
    """Every rank holds the whole layer, sorted; it multiplies a zero-filled full-width input holding its slice."""
    perm = act_order_perm(g_idx)
    in_perm = None if _is_identity(perm) else perm
    return LayerPlan("row", "masked", "--attn-policy masked: unsharded, zero-filled input", [perm] * tp,
                     [None] * tp, [in_perm] * tp, [r == 0 for r in range(tp)])


def _qkv_columns(arch: Arch, dims: Dims, heads: list[RankHeads]) -> list[list[torch.Tensor]]:
    """Per attention input layer, the output columns each rank keeps (q, k, v, or one fused c_attn)."""
    d = dims.head_dim

    def span(start: int, count: int, offset: int = 0) -> torch.Tensor:
        return torch.arange(offset + start * d, offset + (start + count) * d)

    q = [span(h.q_start, h.q_count) for h in heads]
    kv = [span(h.kv_start, h.kv_count) for h in heads]
    if len(arch.qkv) == 3:
        return [q, kv, kv]
    q_width, kv_width = dims.heads * d, dims.kv_heads * d
    return [[torch.cat([q[r], kv[r] + q_width, kv[r] + q_width + kv_width]) for r in range(len(heads))]]


def _is_identity(perm: torch.Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device)))
