"""References every transform is proven against.

`reference_model` runs the *unpermuted* checkpoint (each layer dequantized with its g_idx, fp64 by default) on one
rank. `simulate_tp` runs every rank of a per-rank folder as threads of one process, through the same model code and a
counting communicator, so a test sees both the logits and every collective.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline.arch import arch_of, dims_of
from pipeline.gptq.checkpoint import Checkpoint
from pipeline.gptq.layer import dequantize
from pipeline.plan import rank_heads
from pipeline.rankfolder import read_manifest
from pipeline.runtime.comm import Comm, ThreadGroup
from pipeline.runtime.linear import Linear
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import Transformer


def reference_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float64) -> Transformer:
    arch = arch_of(ckpt.config)
    dims = dims_of(arch, ckpt.config)
    linears = {name: Linear(dequantize(layer, dtype), None if layer.bias is None else layer.bias.to(dtype))
               for name, layer in ckpt.layers.items()}
    dense = {k: v.to(dtype) for k, v in ckpt.dense.items()}
    return Transformer(arch, dims, ckpt.config, rank_heads(dims, 1)[0], dense, linears, Comm(0, 1))


def simulate_tp(folder: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float64
                ) -> tuple[list[torch.Tensor], list[Counter]]:
    """Logits of every rank and each rank's collective counts, for one forward of `ids`."""
    tp = read_manifest(folder)["tp"]
    group = ThreadGroup(tp)

    def run(rank: int) -> tuple[torch.Tensor, Counter]:
        comm = group.comm(rank)
        model = load_rank_model(folder, comm, dtype)
        return model(ids), comm.counts

    with ThreadPoolExecutor(max_workers=tp) as pool:
        results = list(pool.map(run, range(tp)))
    return [r[0] for r in results], [r[1] for r in results]
