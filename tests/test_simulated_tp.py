"""Whole models: every rank run from its per-rank file (threads, one process) equals the unpermuted fp64 reference,
with two all_reduces per layer and no activation gather."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.gptq.checkpoint import read_checkpoint
from pipeline.reference import reference_model, simulate_tp
from pipeline.shard import convert


def _check(src, folder, tp, ids):
    logits, counts = simulate_tp(folder, ids)
    expected = reference_model(read_checkpoint(src))(ids)
    layers = json.loads((folder / "manifest.json").read_text())["dims"]["layers"]
    for rank_logits, rank_counts in zip(logits, counts):
        assert torch.allclose(rank_logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
        assert rank_counts == {"all_reduce": 2 * layers}  # no all_gather
    assert torch.equal(logits[0].argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("policy", ["local", "masked"])
def test_whole_model_matches_reference(tiny_checkpoint, tmp_path, model_type, tp, policy):
    src = tiny_checkpoint(model_type)
    manifest = convert(src, tp, tmp_path / "tp", attn_policy=policy)
    assert {info["policy"] for info in manifest["layers"].values()} == {
        "sorted", "tpaware", "masked" if policy == "masked" else "local-sort"}
    _check(src, tmp_path / "tp", tp, torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(tp)))


@pytest.mark.parametrize("options, down_policy", [
    ({"group_size": 128}, "local-sort"),  # K_down / tp = 64 rows at tp 4: MLP trick infeasible, local-sort fallback
    ({"group_size": -1, "desc_act": False}, "local-sort"),
    ({"group_size": 64, "desc_act": False, "sym": True, "checkpoint_format": "gptq_v2"}, "tpaware"),
    ({"group_size": 32, "shared_act_order": False}, "tpaware"),  # q/k/v and gate/up each with their own act order
])
def test_other_group_layouts(tiny_checkpoint, tmp_path, options, down_policy):
    src = tiny_checkpoint("llama", **options)
    manifest = convert(src, 4, tmp_path / "tp")
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["policy"] == down_policy
    assert bool(manifest["warnings"]) == (down_policy == "local-sort")
    _check(src, tmp_path / "tp", 4, torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(1)))
