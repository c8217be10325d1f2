"""Build a rank's model from a per-rank folder; the runtime reads nothing else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.arch import ARCHES, Arch, Dims, layer_name
from pipeline.plan import RankHeads
from pipeline.rankfolder import read_manifest, read_rank
from pipeline.runtime.comm import Comm
from pipeline.runtime.linear import GatheredLinear, SplitLinear, quant_linear, side_by_side
from pipeline.runtime.model import LinearFn, SplitFn, Transformer, fused_name
from pipeline.runtime.reshard import INDEX_PARTS, RankLayer, rank_layers

_LAYER_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias", "in_perm", *INDEX_PARTS)


def load_rank_model(folder: Path, comm: Comm, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", mode: str = "tpaware", kernel: bool = True) -> Transformer:
    """Rank `comm.rank`'s share of the model in `folder`, run as `mode` (see `pipeline.runtime.reshard`).

    Weights go to `dtype` on `device`; on CUDA the quantized matmuls use the W4A16 kernel, and RMSNorm, RoPE and
    SiLU-and-multiply the fused kernels, unless `kernel` is False.
    """
    manifest = read_manifest(folder)
    if manifest["tp"] != comm.world_size:
        raise ValueError(f"{folder} was converted for tp={manifest['tp']}, not {comm.world_size}")
    tensors = read_rank(folder, comm.rank)
    arch, dims = ARCHES[manifest["arch"]], Dims(**manifest["dims"])
    specs = rank_layers(folder, manifest, tensors, comm.rank, mode)
    linears = build_linears(specs, arch, dims, lambda spec: _linear(spec, comm, dtype, device, kernel))
    quant_names = quant_tensor_names(manifest)
    dense = {k: v.to(device, dtype) for k, v in tensors.items() if k not in quant_names}
    return Transformer(arch, dims, manifest["config"], RankHeads(**manifest["heads"][comm.rank]), dense, linears,
                       comm, masked_o_proj=manifest["attn_policy"] == "masked", kernels=kernel)


def build_linears(specs: dict[str, RankLayer], arch: Arch, dims: Dims, make: Callable[[RankLayer], LinearFn]
                  ) -> dict[str, LinearFn | SplitFn]:
    """Every layer's matmul made by `make`, the layers that read the same input (q/k/v, gate/up) fused into one where
    they can be: one launch and one input gather instead of three or two, and the small k/v shards ride along with q.
    Fused layers are stored under `fused_name` and return one output per member."""
    specs = dict(specs)
    linears: dict[str, LinearFn | SplitFn] = {}
    for group in _same_input_groups(arch, dims):
        members = [specs[name] for name in group]
        if _fusable(members):
            for name in group:
                del specs[name]
            fused = RankLayer(side_by_side([m.layer for m in members]), members[0].in_perm, members[0].gather)
            linears[fused_name(group)] = SplitLinear(make(fused), [m.layer.out_features for m in members])
    linears.update({name: make(spec) for name, spec in specs.items()})
    return linears


def _same_input_groups(arch: Arch, dims: Dims) -> list[tuple[str, ...]]:
    """The layers that read the same activation: q/k/v and gate/up of every decoder layer."""
    return [tuple(layer_name(arch, i, name) for name in names)
            for i in range(dims.layers) for names in (arch.qkv, arch.mlp_in) if len(names) > 1]


def _fusable(members: list[RankLayer]) -> bool:
    """Whether the layers can run as one: same input order (gather, permutation) and the same groups per row."""
    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

    first = members[0]
    return all(same(m.in_perm, first.in_perm) and same(m.gather, first.gather)
               and same(m.layer.g_idx, first.layer.g_idx) and m.layer.group_size == first.layer.group_size
               and (m.layer.bias is None) == (first.layer.bias is None) for m in members[1:])


def quant_tensor_names(manifest: dict) -> set[str]:
    """Every name a rank file may hold for its quantized layers; the rest are dense, replicated tensors."""
    return {f"{name}.{part}" for name in manifest["layers"] for part in _LAYER_PARTS}


def _linear(spec: RankLayer, comm: Comm, dtype: torch.dtype, device: torch.device | str, kernel: bool) -> LinearFn:
    linear = quant_linear(spec.layer, spec.in_perm, dtype, device, kernel)
    return linear if spec.gather is None else GatheredLinear(comm, spec.gather.to(device), linear)
