"""Real processes: the TP-aware MLP from per-rank files over torch.distributed (gloo) needs one all_reduce and no
all_gather, and its output equals the unpermuted reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.gptq.checkpoint import read_checkpoint
from pipeline.reference import reference_model
from pipeline.runtime.comm import DistComm
from pipeline.runtime.loader import load_rank_model
from pipeline.shard import convert


def _worker(rank: int, tp: int, folder: str, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    try:
        comm = DistComm()
        model = load_rank_model(Path(folder), comm, torch.float64)
        h = torch.randn(2, 3, model.dims.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        y = comm.all_reduce(model.mlp(0, h))
        torch.save({"y": y, "counts": dict(comm.counts)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_tp_aware_mlp_over_gloo(tiny_checkpoint, tmp_path, tp, model_type):
    src = tiny_checkpoint(model_type)
    folder = tmp_path / "engine"
    manifest = convert(src, tp, folder)
    down = next(info for name, info in manifest["layers"].items() if name.startswith(("model.layers.0.mlp.down",
                                                                                      "transformer.h.0.mlp.c_proj")))
    assert down["policy"] == "tpaware" and not any(down["gathers_input"])
    mp.spawn(_worker, args=(tp, str(folder), str(tmp_path / "init"), str(tmp_path / "out")), nprocs=tp, join=True)

    ref = reference_model(read_checkpoint(src))
    h = torch.randn(2, 3, ref.dims.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = ref.mlp(0, h)
    for r in range(tp):
        result = torch.load(tmp_path / f"out.{r}")
        assert result["counts"] == {"all_reduce": 1}, json.dumps(result["counts"])
        assert torch.allclose(result["y"], expected, rtol=1e-6, atol=1e-9 * expected.abs().max().item())
