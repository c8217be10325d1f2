"""Build a rank's model from a per-rank folder; the runtime reads nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.arch import ARCHES, Dims
from pipeline.plan import RankHeads
from pipeline.rankfolder import read_manifest, read_rank
from pipeline.runtime.comm import Comm
from pipeline.runtime.linear import Linear, shard_layer
from pipeline.runtime.model import Transformer

_LAYER_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias", "in_perm")


def load_rank_model(folder: Path, comm: Comm, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Transformer:
    """Rank `comm.rank`'s share of the model in `folder`, its weights dequantized to `dtype` on `device`."""
    manifest = read_manifest(folder)
    if manifest["tp"] != comm.world_size:
        raise ValueError(f"{folder} was converted for tp={manifest['tp']}, not {comm.world_size}")
    tensors = read_rank(folder, comm.rank)
    linears = {
        name: Linear.from_quant(shard_layer(tensors, name, info["group_size"]), tensors.get(f"{name}.in_perm"),
                                dtype, device)
        for name, info in manifest["layers"].items()
    }
    quant_names = {f"{name}.{part}" for name in manifest["layers"] for part in _LAYER_PARTS}
    dense = {k: v.to(device, dtype) for k, v in tensors.items() if k not in quant_names}
    return Transformer(ARCHES[manifest["arch"]], Dims(**manifest["dims"]), manifest["config"],
                       RankHeads(**manifest["heads"][comm.rank]), dense, linears, comm,
                       masked_o_proj=manifest["attn_policy"] == "masked")
