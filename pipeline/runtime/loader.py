"""Build a rank's model from a per-rank folder; the runtime reads nothing else."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.arch import ARCHES, Dims
from pipeline.plan import RankHeads
from pipeline.rankfolder import read_manifest, read_rank
from pipeline.runtime.comm import Comm
from pipeline.runtime.linear import GatheredLinear, quant_linear
from pipeline.runtime.model import LinearFn, Transformer
from pipeline.runtime.reshard import INDEX_PARTS, RankLayer, rank_layers

_LAYER_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias", "in_perm", *INDEX_PARTS)


def load_rank_model(folder: Path, comm: Comm, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", mode: str = "tpaware", kernel: bool = True) -> Transformer:
    """Rank `comm.rank`'s share of the model in `folder`, run as `mode` (see `pipeline.runtime.reshard`).

    Weights go to `dtype` on `device`; on CUDA the quantized matmuls use the W4A16 kernel unless `kernel` is False.
    """
    manifest = read_manifest(folder)
    if manifest["tp"] != comm.world_size:
        raise ValueError(f"{folder} was converted for tp={manifest['tp']}, not {comm.world_size}")
    tensors = read_rank(folder, comm.rank)
    linears = {name: _linear(spec, comm, dtype, device, kernel)
               for name, spec in rank_layers(folder, manifest, tensors, comm.rank, mode).items()}
    quant_names = quant_tensor_names(manifest)
    dense = {k: v.to(device, dtype) for k, v in tensors.items() if k not in quant_names}
    return Transformer(ARCHES[manifest["arch"]], Dims(**manifest["dims"]), manifest["config"],
                       RankHeads(**manifest["heads"][comm.rank]), dense, linears, comm,
                       masked_o_proj=manifest["attn_policy"] == "masked")


def quant_tensor_names(manifest: dict) -> set[str]:
    """Every name a rank file may hold for its quantized layers; the rest are dense, replicated tensors."""
    return {f"{name}.{part}" for name in manifest["layers"] for part in _LAYER_PARTS}


def _linear(spec: RankLayer, comm: Comm, dtype: torch.dtype, device: torch.device | str, kernel: bool) -> LinearFn:
    linear = quant_linear(spec.layer, spec.in_perm, dtype, device, kernel)
    return linear if spec.gather is None else GatheredLinear(comm, spec.gather.to(device), linear)
