"""Rebuild original layers from every rank's shard, and the layers each runtime mode runs, all from the same files.

Every rank file records where its shard of layer `<L>` sits in the original layer (`<L>.rows`, `<L>.cols`,
`<L>.groups`, written by `pipeline.shard.shard_index`). `unshard` inverts `pipeline.gptq.layer.select` with them, so
the original layer, g_idx included, comes back bit-exactly: validation builds its reference from it, and the
baseline modes re-shard from it.

The three modes run the *same* per-rank folder:

- `tpaware` (default): the files as converted. Gate/up (c_fc) keep columns `P2[chunk r]`, down (c_proj) rows
  `P2[chunk r]`: rank r's intermediate is exactly its down shard's input; no gather of activations.
- `naive` (the paper's baseline): gate/up split in checkpoint order (columns `chunk r`), so the intermediate slices are
  in checkpoint order; down's input is AllGathered, reordered by the down shard's rows (`P2[chunk r]`, one
  full-width index) and multiplied by the down shard as stored: one AllGather per layer more.
- `local-sort` (what vLLM/TGI do): gate/up as in `naive`; down rows split in checkpoint order, each rank sorting its
  own rows by g_idx and keeping the scales and zeros of every group its rows touch (with act order, nearly all).

The baseline layouts are derived at load time (each rank reads the MLP shards of every rank file and re-shards with the
planner's own functions) rather than stored by `convert`: the folder stays one layout, and the cost, reading the MLP
weights tp times, is paid once at load by the modes that exist to be compared against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.arch import ARCHES, layer_name
from pipeline.errors import InputError
from pipeline.gptq.layer import QuantLinear
from pipeline.plan import column_layer, local_sort_row_layer
from pipeline.rankfolder import rank_file, read_rank
from pipeline.runtime.linear import shard_layer
from pipeline.shard import layer_shard

MODES = ("tpaware", "naive", "local-sort")
INDEX_PARTS = ("rows", "cols", "groups")


@dataclass(frozen=True)
class PlacedShard:
    """One rank's shard of a layer and where it sits in the original: rows, columns, groups (int64)."""

    layer: QuantLinear
    rows: torch.Tensor
    cols: torch.Tensor
    groups: torch.Tensor


@dataclass(frozen=True)
class RankLayer:
    """A quantized layer as one rank runs it: `layer` on `x[..., in_perm]`, or on `all_gather(x)[..., gather]`."""

    layer: QuantLinear
    in_perm: torch.Tensor | None = None
    gather: torch.Tensor | None = None


def placed_shard(tensors: dict[str, torch.Tensor], name: str, group_size: int, file: Path | str) -> PlacedShard:
    missing = [part for part in INDEX_PARTS if f"{name}.{part}" not in tensors]
    if missing:
        raise InputError(f"no {'/'.join(missing)} index: converted by an older tpaware; re-convert",
                         file=file, tensor=f"{name}.{missing[0]}")
    return PlacedShard(shard_layer(tensors, name, group_size),
                       *(tensors[f"{name}.{part}"].long() for part in INDEX_PARTS))


def unshard(shards: list[PlacedShard], name: str = "") -> QuantLinear:
    """The original layer `name` from shards that together cover it (overlaps, e.g. shared groups, hold equal
    values): the inverse of `select` over all ranks."""
    first = shards[0].layer
    k = 1 + max(int(s.rows.max()) for s in shards)
    n = 1 + max(int(s.cols.max()) for s in shards)
    g = 1 + max(int(s.groups.max()) for s in shards)
    q = torch.zeros(k, n, dtype=torch.uint8)
    covered = torch.zeros(k, n, dtype=torch.bool)
    zeros = torch.zeros(g, n, dtype=torch.uint8)
    scales = torch.zeros(g, n, dtype=first.scales.dtype)
    g_idx = torch.zeros(k, dtype=torch.int32)
    bias = None
    for s in shards:
        rows, cols = s.rows[:, None], s.cols[None, :]
        q[rows, cols] = s.layer.q
        covered[rows, cols] = True
        zeros[s.groups[:, None], cols] = s.layer.zeros
        scales[s.groups[:, None], cols] = s.layer.scales
        g_idx[s.rows] = s.groups[s.layer.g_idx.long()].to(torch.int32)
        if s.layer.bias is not None:
            bias = torch.zeros(n, dtype=s.layer.bias.dtype) if bias is None else bias
            bias[s.cols] = s.layer.bias
    if not covered.all():
        raise InputError(f"the rank files cover {int(covered.sum())} of its {k * n} weights", tensor=name)
    return QuantLinear(q=q, zeros=zeros, scales=scales, g_idx=g_idx, group_size=first.group_size, bias=bias)


def original_layers(folder: Path, manifest: dict, names: list[str]) -> dict[str, QuantLinear]:
    """The original (unpermuted, unsharded) layers `names`, rebuilt from every rank file of `folder`."""
    wanted = {f"{name}." for name in names}
    placed: dict[str, list[PlacedShard]] = {name: [] for name in names}
    for r in range(manifest["tp"]):
        tensors = read_rank(folder, r, wanted=lambda t: t[: t.rfind(".") + 1] in wanted)
        for name in names:
            placed[name].append(placed_shard(tensors, name, manifest["layers"][name]["group_size"],
                                             Path(folder) / rank_file(r)))
    return {name: unshard(shards, name) for name, shards in placed.items()}


def rank_layers(folder: Path, manifest: dict, tensors: dict[str, torch.Tensor], rank: int,
                mode: str = "tpaware") -> dict[str, RankLayer]:
    """Every quantized layer of rank `rank` as `mode` runs it; `tensors` is that rank's file."""
    if mode not in MODES:
        raise InputError(f"mode {mode!r} must be one of {', '.join(MODES)}")
    layers = {name: RankLayer(shard_layer(tensors, name, info["group_size"]), tensors.get(f"{name}.in_perm"))
              for name, info in manifest["layers"].items()}
    if mode == "tpaware":
        return layers
    arch, tp = ARCHES[manifest["arch"]], manifest["tp"]
    blocks = range(manifest["dims"]["layers"])
    mlp_in = [layer_name(arch, i, n) for i in blocks for n in arch.mlp_in]
    downs = [layer_name(arch, i, arch.mlp_out) for i in blocks]
    full = original_layers(folder, manifest, mlp_in + (downs if mode == "local-sort" else []))
    chunks = list(torch.arange(manifest["dims"]["intermediate"]).chunk(tp))
    for name in mlp_in:
        plan = column_layer(full[name].g_idx, chunks)
        layers[name] = RankLayer(layer_shard(full[name], plan, rank), plan.in_perm[rank])
    for name in downs:
        if mode == "naive":
            stored = placed_shard(tensors, name, manifest["layers"][name]["group_size"], rank_file(rank))
            layers[name] = RankLayer(stored.layer, gather=stored.rows)
        else:
            plan = local_sort_row_layer(full[name].g_idx, tp, "local-sort mode")
            layers[name] = RankLayer(layer_shard(full[name], plan, rank), plan.in_perm[rank])
    return layers
