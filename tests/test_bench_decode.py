"""The decode benchmark's pieces on CPU: the static KV cache that CUDA graphs need decodes exactly like the growing one,
and `tpaware bench decode --device cpu` runs every mode through it and checks them against each other (gloo)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runtime.comm import ThreadGroup
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import KVCache, StaticKVCache
from pipeline.shard import convert


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_static_cache_gives_the_growing_caches_logits(model_type, tiny_checkpoint, tmp_path):
    """fp64, prefill then steps of 1 and 2 tokens: equal up to fp64 rounding (the static cache sums over more, masked,
    slots); an off-by-one position, write slot or mask is off by O(1)."""
    convert(tiny_checkpoint(model_type), 1, tmp_path / "engine")
    model = load_rank_model(tmp_path / "engine", ThreadGroup(1).comm(0), torch.float64)
    gen = torch.Generator().manual_seed(0)
    vocab = model.lm_head.shape[0]
    chunks = [torch.randint(0, vocab, (2, t), generator=gen) for t in (5, 1, 2, 1, 1)]  # prefill, then steps
    growing = KVCache()
    static = StaticKVCache.for_model(model, batch=2, max_len=16, dtype=torch.float64)
    static.keys.normal_(generator=gen)  # slots not yet written hold garbage: only the mask may hide them
    static.values.normal_(generator=gen)
    for ids in chunks:
        torch.testing.assert_close(model(ids, static), model(ids, growing), rtol=1e-13, atol=1e-13)
    assert int(static.position) == growing.length == sum(c.shape[1] for c in chunks)


@pytest.mark.slow
def test_bench_decode_cpu_check_runs_every_mode_at_tp2(capfd):
    result = CliRunner().invoke(app, ["bench", "decode", "--device", "cpu", "--tp", "2", "--batch", "1,3",
                                      "--shape", "256,1024", "--heads", "4", "--kv-heads", "2", "--vocab", "96",
                                      "--group-size", "32", "--prompt", "5"])
    out = capfd.readouterr().out
    assert result.exit_code == 0, out + capfd.readouterr().err
    errors = re.findall(r"^tp=2 batch=(\d+) (\S+): static vs growing (\S+) vs tpaware (\S+)$", out, flags=re.M)
    assert {(b, mode) for b, mode, _, _ in errors} == {
        (b, mode) for b in ("1", "3") for mode in ("tpaware", "naive", "local-sort", "dense")}
    assert all(float(static) < 1e-5 and float(modes) < 1e-4 for _, _, static, modes in errors)


def test_the_benchmark_runs_q_k_v_and_gate_up_fused_as_the_runtime_does(tmp_path, monkeypatch):
    """It times what the loader builds: one matmul for q/k/v and one for gate/up in every layer, in every mode."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_decode

    args = argparse.Namespace(shape=[64, 128], layers=2, heads=4, kv_heads=2, vocab=32, group_size=32, seed=0,
                              dtype=torch.float32)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        models = bench_decode.build_models(args, bench_decode.DistComm(), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert set(models) == set(bench_decode.MODES)
    for mode, model in models.items():
        fused = sorted(name for name in model.linears if "+" in name)
        assert len(fused) == 2 * args.layers, (mode, fused)
