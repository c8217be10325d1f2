"""Time per generated token of a Llama-70B-shaped model cut to a few layers, one process per GPU (NCCL), decode step
captured in a CUDA graph: tpaware vs naive vs local-sort (W4A16 kernel) vs dense fp16 (cuBLAS).

    python scripts/bench_decode.py --tp 1,2 --batch 1,2,4,8,16 --out benchmarks/decode

Each rank draws the same random act-order layers on its own GPU (nothing is read from disk: the machines that have
the GPUs cannot receive 70B-shaped files), plans them with the converter's own `plan_model` and cuts its shards with
`layer_shard`, then builds one `Transformer` per mode:

- `tpaware`: the converter's plan, as `tpaware convert` writes it.
- `naive` / `local-sort`: gate/up and down re-sharded as `pipeline.runtime.reshard` derives them at load time.
- `dense`: the tpaware shards dequantized to fp16, input permutations folded into the weights, `torch.matmul`.

Per batch size and mode: prefill a prompt into a `StaticKVCache`, check one eager decode step against the growing
`KVCache`, capture that step (collectives inside) in a CUDA graph, check a replay against the eager step and every mode
against tpaware, then time `--reps` replays. The slowest rank's median is reported. Every replay decodes the next
position, so the cache holds the prompt plus every timed token and attention spans all of it. Writes `<out>.json`
and `<out>.md`. `--device cpu` runs the checks on gloo (fp32, exact path, no graphs, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_mlp import ALL_REDUCE_TEXT, environment, init_rank, median_us, random_layer, run_per_tp  # noqa: E402
from bench_mlp import slowest  # noqa: E402
from pipeline.arch import LLAMA, Dims, layer_name  # noqa: E402
from pipeline.gptq.layer import QuantLinear, dequantize  # noqa: E402
from pipeline.plan import Plan, column_layer, local_sort_row_layer, plan_model  # noqa: E402
from pipeline.runtime.comm import DistComm, one_shot_all_reduce_allowed  # noqa: E402
from pipeline.runtime.generate import DecodeGraph, warm_up  # noqa: E402
from pipeline.runtime.linear import GatheredLinear, Linear, quant_linear  # noqa: E402
from pipeline.runtime.loader import build_linears  # noqa: E402
from pipeline.runtime.model import KVCache, LinearFn, StaticKVCache, Transformer  # noqa: E402
from pipeline.runtime.reshard import RankLayer  # noqa: E402
from pipeline.shard import layer_shard  # noqa: E402
from pipeline.synth import act_order_g_idx, hf_config  # noqa: E402

MODES = ("tpaware", "naive", "local-sort", "dense")
WARMUP_STEPS = 3
SETTINGS = ("layers", "shape", "heads", "kv_heads", "vocab", "prompt", "group_size", "reps", "seed")  # in the results


def random_llama(dims: Dims, group_size: int, seed: int, device: torch.device
                 ) -> tuple[dict[str, QuantLinear], dict[str, torch.Tensor]]:
    """Random act-order layers (q/k/v share one act order, gate/up another, as GPTQ's Hessian order does) and dense
    tensors, the same on every rank for the same seed."""
    gen_cpu = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    d = dims.head_dim
    layers = {}
    for i in range(dims.layers):
        attn_in, mlp_in, o_in, down_in = (act_order_g_idx(k, group_size, gen_cpu)
                                          for k in (dims.hidden, dims.hidden, dims.heads * d, dims.intermediate))
        shapes = {"self_attn.q_proj": (dims.hidden, dims.heads * d, attn_in),
                  "self_attn.k_proj": (dims.hidden, dims.kv_heads * d, attn_in),
                  "self_attn.v_proj": (dims.hidden, dims.kv_heads * d, attn_in),
                  "self_attn.o_proj": (dims.heads * d, dims.hidden, o_in),
                  "mlp.gate_proj": (dims.hidden, dims.intermediate, mlp_in),
                  "mlp.up_proj": (dims.hidden, dims.intermediate, mlp_in),
                  "mlp.down_proj": (dims.intermediate, dims.hidden, down_in)}
        for name, (k, n, g_idx) in shapes.items():
            layers[layer_name(LLAMA, i, name)] = random_layer(k, n, group_size, g_idx, gen, device)

    def norm() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(dims.hidden, generator=gen, device=device)).half()

    dense = {f"{layer_name(LLAMA, i, n)}.weight": norm() for i in range(dims.layers) for n in LLAMA.norms}
    dense[f"{LLAMA.final_norm}.weight"] = norm()
    dense[f"{LLAMA.embed}.weight"] = torch.randn(dims.vocab, dims.hidden, generator=gen, device=device).half()
    dense[f"{LLAMA.lm_head}.weight"] = (torch.randn(dims.vocab, dims.hidden, generator=gen, device=device)
                                        * dims.hidden**-0.5).half()
    return layers, dense


def rank_specs(full: dict[str, QuantLinear], plan: Plan, dims: Dims, rank: int, mode: str) -> dict[str, RankLayer]:
    """Every quantized layer as rank `rank` runs it in `mode` (dense: the tpaware layout), from the original layers
    in memory: the converter's plan, and for the baselines the same re-sharding as `reshard.rank_layers`. Plans live
    on the CPU, layers on the device."""
    specs = {name: RankLayer(layer_shard(full[name], lp, rank), lp.in_perm[rank]) for name, lp in plan.layers.items()}
    if mode in ("tpaware", "dense"):
        return specs
    chunks = list(torch.arange(dims.intermediate).chunk(plan.tp))
    for i in range(dims.layers):
        for name in (layer_name(LLAMA, i, n) for n in LLAMA.mlp_in):
            lp = column_layer(full[name].g_idx.cpu(), chunks)
            specs[name] = RankLayer(layer_shard(full[name], lp, rank), lp.in_perm[rank])
        down = layer_name(LLAMA, i, LLAMA.mlp_out)
        if mode == "naive":  # the stored down shard, its input AllGathered and indexed by its original rows
            specs[down] = RankLayer(specs[down].layer, gather=plan.layers[down].rows[rank])
        else:
            lp = local_sort_row_layer(full[down].g_idx.cpu(), plan.tp, "local-sort mode")
            specs[down] = RankLayer(layer_shard(full[down], lp, rank), lp.in_perm[rank])
    return specs


def to_linear(spec: RankLayer, mode: str, comm: DistComm, dtype: torch.dtype, device: torch.device) -> LinearFn:
    if mode == "dense":  # x[:, P] @ W[P] == x @ W: fold the permutation into the weight, no gather
        weight = dequantize(spec.layer, dtype)
        weight = weight if spec.in_perm is None else weight[torch.argsort(spec.in_perm.to(device))]
        return Linear(weight.contiguous(), None if spec.layer.bias is None else spec.layer.bias.to(dtype))
    linear = quant_linear(spec.layer, spec.in_perm, dtype, device)
    return linear if spec.gather is None else GatheredLinear(comm, spec.gather.to(device), linear)


def build_models(args: argparse.Namespace, comm: DistComm, device: torch.device) -> dict[str, Transformer]:
    """This rank's model in every mode, over the same random layers and dense tensors."""
    dims = Dims(*args.shape, args.layers, args.heads, args.kv_heads, args.vocab)
    full, dense = random_llama(dims, args.group_size, args.seed, device)
    plan = plan_model(LLAMA, dims, {n: layer.g_idx.cpu() for n, layer in full.items()},
                      {n: args.group_size for n in full}, comm.world_size)
    dense = {k: v.to(args.dtype) for k, v in dense.items()}
    models = {}
    for mode in MODES:  # q/k/v and gate/up fused as the runtime's loader fuses them
        linears = build_linears(rank_specs(full, plan, dims, comm.rank, mode), LLAMA, dims,
                                lambda spec, mode=mode: to_linear(spec, mode, comm, args.dtype, device))
        models[mode] = Transformer(LLAMA, dims, hf_config("llama", dims), plan.heads[comm.rank], dense, linears, comm)
    return models


def rel_err(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    """||a - b|| / ||b||, the largest over ranks."""
    return slowest(((a.double() - b.double()).norm() / b.double().norm()).item(), device)


def decode_row(model: Transformer, mode: str, batch: int, args: argparse.Namespace, device: torch.device
               ) -> tuple[dict, torch.Tensor]:
    """Checks, then the graph's median µs per token for one mode and batch size; and the eager decode logits."""
    gen = torch.Generator().manual_seed(args.seed + batch)  # the same tokens on every rank and in every mode
    prompt = torch.randint(args.vocab, (batch, args.prompt), generator=gen).to(device)
    token = torch.randint(args.vocab, (batch, 1), generator=gen).to(device)
    growing = KVCache()
    model(prompt, growing)
    reference = model(token, growing)
    cache = StaticKVCache.for_model(model, batch, args.prompt + WARMUP_STEPS + args.reps + 1, args.dtype, device)
    model(prompt, cache)
    start = cache.position.clone()
    cuda = device.type == "cuda"
    if cuda:  # compile and tune every kernel, and set the collectives up outside the capture, off the capture stream
        for _ in range(WARMUP_STEPS):
            warm_up(model, token, cache)
        cache.position.copy_(start)
    eager = model(token, cache)
    row = {"mode": mode, "batch": batch, "static_vs_growing_rel_err": rel_err(eager, reference, device)}
    assert row["static_vs_growing_rel_err"] < args.same_tolerance, row
    if not cuda:
        return row, eager
    cache.position.copy_(start)
    graph = DecodeGraph(model, cache, token)
    replayed = graph(token)
    row["graph_vs_eager_rel_err"] = rel_err(replayed, eager, device)
    row["graph_bitwise_equal"] = bool(slowest(float(not torch.equal(replayed, eager)), device) == 0)
    assert row["graph_vs_eager_rel_err"] < args.same_tolerance, row
    torch.cuda.synchronize()
    row["graph_us"] = slowest(median_us(lambda i: graph.graph.replay(), args.reps), device)
    return row, eager


def worker(rank: int, tp: int, args: argparse.Namespace, port: int, results: str) -> None:
    device = init_rank(rank, tp, args.device, port)
    models = build_models(args, DistComm(), device)
    rows = []
    with torch.inference_mode():
        for batch in args.batch:
            logits = {}
            for mode, model in models.items():
                row, logits[mode] = decode_row(model, mode, batch, args, device)
                row.update(tp=tp, vs_tpaware_rel_err=rel_err(logits[mode], logits["tpaware"], device))
                assert row["vs_tpaware_rel_err"] < args.tolerance, row
                rows.append(row)
                if rank == 0:
                    print(f"tp={tp} batch={batch:2d} {mode:10s} " + " ".join(
                        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                        if k not in ("tp", "batch", "mode")), flush=True)
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    dist.destroy_process_group()


def markdown(env: dict, rows: list[dict]) -> str:
    a = env["args"]
    lines = [f"# Decode time per token under TP ({env['card']})", "",
             f"card {env['card']} x{env['gpus']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton']}, NCCL {env['nccl']}, {env['date']}", "", f"command: `{env['command']}`"
             + (f" with TPAWARE_AUTOTUNE={env['autotune']}" if env["autotune"] is not None else ""), "",
             *kernel_note(env),
             f"Llama-70B shapes (hidden {a['shape'][0]}, intermediate {a['shape'][1]}, {a['heads']} heads, "
             f"{a['kv_heads']} kv heads) cut to {a['layers']} layers, vocab {a['vocab']}, group {a['group_size']}, "
             f"fp16; prompt {a['prompt']} tokens, then one decode step captured in a CUDA graph (collectives inside; "
             f"all-reduce: {env.get('all_reduce', 'NCCL')}) and replayed {a['reps']} times, each at the next position "
             f"(static KV cache of "
             f"{a['prompt'] + WARMUP_STEPS + a['reps'] + 1} slots, attention over all of them).", "",
             "Slowest rank's median µs per decode step (one token for each of the batch's sequences); the ratios are "
             "each mode's time over tpaware's (above 1: tpaware is faster).", "",
             "| tp | batch | tpaware | naive | local-sort | dense fp16 | naive/tpaware | local-sort/tpaware | "
             "dense/tpaware |", "|---|---|---|---|---|---|---|---|---|"]
    for tp in sorted({r["tp"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows if r["tp"] == tp}):
            by = {r["mode"]: r["graph_us"] for r in rows if (r["tp"], r["batch"]) == (tp, batch)}
            lines.append(f"| {tp} | {batch} | " + " | ".join(f"{by[m]:.1f}" for m in MODES) + " | "
                         + " | ".join(f"{by[m] / by['tpaware']:.2f}x" for m in MODES[1:]) + " |")
    worst = {k: max(r[k] for r in rows) for k in ("static_vs_growing_rel_err", "graph_vs_eager_rel_err",
                                                  "vs_tpaware_rel_err")}
    bitwise = sum(r["graph_bitwise_equal"] for r in rows)
    lines += ["", f"Checks before timing (relative error of the decode logits, largest over ranks, "
              f"{len(rows)} tp/batch/mode cases): static vs growing KV cache (eager) max "
              f"{worst['static_vs_growing_rel_err']:.2e}; graph replay vs eager max "
              f"{worst['graph_vs_eager_rel_err']:.2e}"
              f" (bitwise equal in {bitwise} of {len(rows)}); each mode vs tpaware max "
              f"{worst['vs_tpaware_rel_err']:.2e}.", ""]
    return "\n".join(lines)


def kernel_note(env: dict) -> list[str]:
    """What the W4A16 kernel ran with: under TPAWARE_AUTOTUNE=0 (short GPU leases) nothing is tuned, so only the
    choices shipped for this card apply, and a card with none runs the untuned default everywhere."""
    if env["autotune"] != "0":
        return []
    shipped = Path(__file__).resolve().parents[1] / "plugins" / "tuned_configs.json"
    if env["card"] in {key.split("|")[0] for key in json.loads(shipped.read_text())}:
        return ["The W4A16 kernel was not tuned in this run: it used the choices shipped in plugins/tuned_configs.json "
                "for this card where they cover the shape (the MLP's), its default choice elsewhere.", ""]
    return [f"The W4A16 kernel was not tuned in this run and plugins/tuned_configs.json has no choices for "
            f"{env['card']}: every quantized matmul ran the kernel's untuned default. The three quantized modes share "
            "that handicap; dense fp16 (cuBLAS) does not, so read dense vs quantized with it in mind.", ""]


def write_results(out: Path, env: dict, rows: list[dict]) -> None:
    Path(f"{out}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    Path(f"{out}.md").write_text(markdown(env, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--tp", default="1,2,4,8", type=ints,
                        help="TP degrees; on GPUs those above the GPU count are skipped")
    parser.add_argument("--batch", default="1,2,4,8,16", type=ints)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shape", default="8192,28672", type=ints, help="hidden,intermediate")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens prefilled before the decode step")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/decode"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: check every mode with gloo (fp32, no graphs, no timing), e.g. on a small --shape")
    args = parser.parse_args()
    # fp16 on GPUs; fp32 on CPU, where the modes agree up to fp32 rounding
    args.dtype, args.tolerance, args.same_tolerance = (
        (torch.float16, 2e-2, 1e-2) if args.device == "cuda" else (torch.float32, 1e-4, 1e-5))
    def save(rows: list[dict]) -> None:
        env = {**environment(), "autotune": os.environ.get("TPAWARE_AUTOTUNE"),
               "all_reduce": ALL_REDUCE_TEXT["peer" if one_shot_all_reduce_allowed() else "nccl"],
               "args": {k: getattr(args, k) for k in SETTINGS}}
        write_results(args.out, env, rows)

    rows = run_per_tp(worker, args, 29600, save)
    if args.device == "cpu":
        print("\n".join(f"tp={r['tp']} batch={r['batch']} {r['mode']}: static vs growing "
                        f"{r['static_vs_growing_rel_err']:.2e} vs tpaware {r['vs_tpaware_rel_err']:.2e}" for r in rows))
        return
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
