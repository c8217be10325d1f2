"""Apply a plan to a checkpoint: the tensors each rank keeps, and the manifest that says why."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

import pipeline
from pipeline.arch import Dims, arch_of, dims_of
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import Checkpoint, pack_layer, read_checkpoint
from pipeline.gptq.layer import QuantLinear, has_whole_groups, select
from pipeline.plan import LayerPlan, Plan, plan_model
from pipeline.rankfolder import write_rank_folder


def plan_checkpoint(ckpt: Checkpoint, tp: int, attn_policy: str = "local") -> tuple[Dims, Plan]:
    """Plan `ckpt` for `tp` ranks; a config that cannot be split is reported against the checkpoint's config.json."""
    try:
        arch = arch_of(ckpt.config)
        dims = dims_of(arch, ckpt.config)
    except InputError as e:
        raise InputError(str(e), file=_config_path(ckpt)) from None
    g_idx = {name: layer.g_idx for name, layer in ckpt.layers.items()}
    group_sizes = {name: layer.group_size for name, layer in ckpt.layers.items()}
    try:
        return dims, plan_model(arch, dims, g_idx, group_sizes, tp, attn_policy)
    except InputError as e:
        raise InputError(str(e), file=_config_path(ckpt)) from None


def _config_path(ckpt: Checkpoint) -> Path | str:
    return ckpt.path / "config.json" if ckpt.path else "config.json"


def layer_shard(layer: QuantLinear, layer_plan: LayerPlan, r: int) -> QuantLinear:
    cols = layer_plan.cols[r]
    cols = torch.arange(layer.out_features) if cols is None else cols
    return select(layer, layer_plan.rows[r], cols, keep_bias=layer_plan.keep_bias[r])


def rank_tensors(ckpt: Checkpoint, plan: Plan, r: int) -> dict[str, torch.Tensor]:
    """Everything rank r needs: its quantized shards (reordered, v2 zeros) and the replicated dense tensors."""
    out = dict(ckpt.dense)
    for name, layer_plan in plan.layers.items():
        shard = layer_shard(ckpt.layers[name], layer_plan, r)
        packed = pack_layer(shard, "gptq_v2")
        if has_whole_groups(shard.g_idx, shard.group_size):
            del packed["g_idx"]
        out.update({f"{name}.{k}": v for k, v in packed.items()})
        if layer_plan.in_perm[r] is not None:
            out[f"{name}.in_perm"] = layer_plan.in_perm[r]
        out.update({f"{name}.{k}": v for k, v in shard_index(ckpt.layers[name], layer_plan, r).items()})
    return out


def shard_index(layer: QuantLinear, layer_plan: LayerPlan, r: int) -> dict[str, torch.Tensor]:
    """Where rank r's shard sits in the original layer: its input rows, output columns and groups (int64).

    With them every original layer is rebuilt bit-exactly from the rank files (`pipeline.runtime.reshard`), which
    validation and the baseline runtime modes need; nothing else reads the source checkpoint again.
    """
    rows = layer_plan.rows[r].long()
    cols = layer_plan.cols[r]
    return {
        "rows": rows,
        "cols": torch.arange(layer.out_features) if cols is None else cols.long(),
        "groups": torch.unique(layer.g_idx.long()[rows]),  # sorted: the order `select` numbers groups in
    }


def manifest(ckpt: Checkpoint, dims: Dims, plan: Plan) -> dict:
    layers = {}
    for name, lp in plan.layers.items():
        shards = [layer_shard(ckpt.layers[name], lp, r) for r in range(plan.tp)]
        layers[name] = {
            "parallel": lp.parallel, "policy": lp.policy, "reason": lp.reason,
            "group_size": ckpt.layers[name].group_size,
            "shape_per_rank": [[s.in_features, s.out_features] for s in shards],
            "groups_per_rank": [int(s.scales.shape[0]) for s in shards],
            "contiguous_groups": [has_whole_groups(s.g_idx, s.group_size) for s in shards],
            "gathers_input": [p is not None for p in lp.in_perm],
        }
    return {
        "tool": f"tpaware {pipeline.__version__}",
        "source": {"path": str(ckpt.path) if ckpt.path else None, "fingerprint": ckpt.fingerprint},
        "arch": ckpt.config["model_type"],
        "config": {k: v for k, v in ckpt.config.items() if k != "quantization_config"},
        "quant": ckpt.quant.to_json(),
        "dims": asdict(dims),
        "tp": plan.tp,
        "attn_policy": plan.attn_policy,
        "heads": [asdict(h) for h in plan.heads],
        "layers": layers,
        "warnings": plan.warnings,
    }


def convert(source: Path, tp: int, out: Path, attn_policy: str = "local",
            track: Callable[[Iterable], Iterable] = iter) -> dict:
    """Read a GPTQ checkpoint, plan it for `tp` ranks and write the per-rank folder `out`. Returns the manifest."""
    ckpt = read_checkpoint(source)
    dims, plan = plan_checkpoint(ckpt, tp, attn_policy)
    meta = manifest(ckpt, dims, plan)

    def ranks() -> Iterator[dict[str, torch.Tensor]]:
        for r in range(tp):
            yield rank_tensors(ckpt, plan, r)

    write_rank_folder(out, meta, ranks(), copy_from=ckpt.path, track=track)
    return meta
