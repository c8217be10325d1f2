"""MLP latency under tensor parallelism: naive vs local-sort vs TP-aware vs dense fp16, one process per GPU (NCCL).

    python scripts/bench_mlp.py --tp 1,2 --m 1,2,4,8,16 --out benchmarks/mlp

Each rank builds its shards of a synthetic act-order GPTQ MLP on its own GPU (random int4 weights, zeros and scales,
a random act order shared by gate and up, as GPTQ's Hessian order is for layers with one input), using the same
plan functions as `tpaware convert`, so the shapes and permutations are the converter's. Modes:

- `tpaware`: W1 columns permuted by P2 before sharding; down gets whole groups, no gather; one AllReduce.
- `naive` (the paper's baseline): W1 in checkpoint order; AllGather the intermediate, reorder by P2, take the local
  chunk; then the same down shard and AllReduce.
- `local-sort` (what vLLM/TGI do): W1 and down split in checkpoint order; down rows sorted locally, keeping the
  scales/zeros of every group its rows touch; the groups the split cuts padded to whole blocks, as the runtime runs
  such a shard (`pipeline.runtime.linear.kernel_groups`); one AllReduce.
- `dense`: fp16 weights through cuBLAS (`torch.matmul`), the unquantized baseline.

Every quantized mode is first checked against an fp32 reference of the unsharded MLP. Timing: CUDA graphs (the
collectives inside: the final all-reduce is `--all-reduce`, tpaware's one-shot kernel by default; the naive mode's
AllGather is NCCL's) and eager, median over `--reps` replays, weights rotated through several copies when one copy
would sit in L2, in `--rounds` rounds with the modes taking turns; the slowest rank's median over rounds is reported.
Writes `<out>.json` and `<out>.md`; `scripts/plot_mlp.py` draws the PNG from the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.gptq.checkpoint import pack_layer  # noqa: E402
from pipeline.gptq.layer import QuantLinear, dequantize, select  # noqa: E402
from pipeline.plan import local_sort_row_layer, mlp_layers  # noqa: E402
from pipeline.runtime.linear import kernel_groups  # noqa: E402
from pipeline.synth import act_order_g_idx  # noqa: E402

MODELS = {  # name: (hidden, intermediate, activation)
    "llama70b": (8192, 28672, "silu-gated"),
    "granite20b": (6144, 24576, "gelu"),
    "paper-2layer": (8192, 28672, "none"),  # the paper's W1 then W2 form
}
MODES = ("tpaware", "naive", "local-sort", "dense")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
L2_BYTES = 50 * 2**20
ALL_REDUCE_TEXT = {"nccl": "NCCL",
                   "one-shot": "PyTorch symmetric-memory one-shot (`torch.ops.symm_mem.one_shot_all_reduce`)",
                   "peer": "tpaware one-shot over symmetric memory (`plugins/allreduce.py`: each rank writes its part "
                           "into its peers' memory, fp16 as it is)"}


@dataclass
class Shard:
    """One quantized layer's shard in the kernel's layout, plus how to call it."""

    tensors: dict[str, torch.Tensor]
    group_size: int
    in_perm: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        return torch.ops.tpaware.w4a16_gemm(x, t["qweight"], t["qzeros"], t["scales"], self.group_size, self.in_perm)


class Dense:
    """An fp16 weight shard through cuBLAS: the unquantized baseline."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def random_layer(k: int, n: int, group_size: int, g_idx: torch.Tensor, gen: torch.Generator,
                 device: torch.device) -> QuantLinear:
    groups = k // group_size
    return QuantLinear(
        q=torch.randint(0, 16, (k, n), dtype=torch.uint8, device=device, generator=gen),
        zeros=torch.randint(1, 16, (groups, n), dtype=torch.uint8, device=device, generator=gen),
        scales=(torch.rand(groups, n, device=device, generator=gen) * 2e-3 + 1e-3).half(),
        g_idx=g_idx.to(device), group_size=group_size,
    )


def to_shard(layer: QuantLinear, rows: torch.Tensor, cols: torch.Tensor, in_perm: torch.Tensor | None) -> Shard:
    dev = layer.q.device
    part = select(layer, rows.to(dev), cols.to(dev))
    # groups cut by a checkpoint-order split (local-sort) padded whole, as the runtime does
    part, in_perm = kernel_groups(part, None if in_perm is None else in_perm.to(dev))
    packed = pack_layer(part, "gptq_v2")
    return Shard({k: packed[k] for k in ("qweight", "qzeros", "scales")}, part.group_size, in_perm)


def activation(name: str, a: torch.Tensor) -> torch.Tensor:
    """The activation between W1 and W2, as the runtime computes it (on GPUs SiLU-and-multiply is one kernel)."""
    if name == "silu-gated":
        gate, up = a.chunk(2, dim=-1)
        if a.is_cuda:
            from plugins.fused import silu_mul

            return silu_mul(gate, up)
        return F.silu(gate) * up
    return F.gelu(a, approximate="tanh") if name == "gelu" else a


def nccl_all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


class OneShotAllReduce:
    """PyTorch's symmetric-memory one-shot all-reduce (`--all-reduce one-shot`): each rank copies its partial into a
    buffer that every peer has mapped, and every rank sums all partials by reading them over NVLink (peer-to-peer
    loads, no multicast); one small kernel where NCCL runs its protocol.  A buffer is made per shape at the first call,
    before any graph capture (the rendezvous is collective: every rank makes the same calls in the same order)."""

    def __init__(self) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self._symm_mem, self._group = symm_mem, dist.group.WORLD.group_name
        self._buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get((t.shape, t.dtype))
        if buf is None:  # the kernel sums fp32 or bf16 only: fp16 partials are summed in fp32
            buf = self._symm_mem.empty(t.shape, dtype=torch.float32 if t.dtype == torch.float16 else t.dtype,
                                       device=t.device)
            self._symm_mem.rendezvous(buf, self._group)
            self._buffers[(t.shape, t.dtype)] = buf
        buf.copy_(t)
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self._group).to(t.dtype)


class MLP:
    """One rank's MLP in one mode; `__call__` includes the collectives."""

    def __init__(self, mode: str, w1, w2, act: str, all_reduce, gather_index: torch.Tensor | None = None):
        self.mode, self.w1, self.w2, self.act, self.gather_index = mode, w1, w2, act, gather_index
        self.all_reduce = all_reduce

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inner = activation(self.act, self.w1(x))
        if self.gather_index is not None:  # naive: AllGather, reorder by P2, take the local chunk
            world = dist.get_world_size()
            m, width = inner.shape
            parts = torch.empty(world * m, width, dtype=inner.dtype, device=inner.device)
            dist.all_gather_into_tensor(parts, inner.contiguous())
            inner = parts.view(world, m, width).permute(1, 0, 2).reshape(m, -1)[:, self.gather_index]
        y = self.w2(inner)
        return self.all_reduce(y) if dist.get_world_size() > 1 else y

    def nbytes(self) -> int:
        return self.w1.nbytes + self.w2.nbytes


def build(model: str, tp: int, rank: int, group_size: int, seed: int, device: torch.device, dtype: torch.dtype,
          all_reduce=nccl_all_reduce) -> tuple[dict[str, MLP], torch.Tensor, torch.Tensor]:
    """Every mode's MLP for this rank, plus the unsharded fp32 weights for the reference."""
    hidden, inter, act = MODELS[model]
    gen_cpu = torch.Generator().manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    g1 = act_order_g_idx(hidden, group_size, gen_cpu)  # shared by gate and up: one input, one act order
    g2 = act_order_g_idx(inter, group_size, gen_cpu)
    width = 2 * inter if act == "silu-gated" else inter
    w1 = random_layer(hidden, width, group_size, g1, gen, device)
    w2 = random_layer(inter, hidden, group_size, g2, gen, device)

    def fused(cols: torch.Tensor) -> torch.Tensor:  # the same columns of gate and of up
        return torch.cat([cols, cols + inter]) if act == "silu-gated" else cols

    down_plan, (in_plan,) = mlp_layers(g2, [g1], group_size, tp)
    assert down_plan.policy == "tpaware", down_plan.reason
    p1, in_perm = in_plan.rows[rank], in_plan.in_perm[rank]
    chunk = torch.arange(inter).chunk(tp)[rank]
    down = to_shard(w2, down_plan.rows[rank], torch.arange(hidden), None)
    local = local_sort_row_layer(g2, tp, "baseline")
    p2 = down_plan.rows[rank]  # P2[chunk r]
    w1_checkpoint_order = to_shard(w1, p1, fused(chunk), in_perm)
    modes = {
        "tpaware": MLP("tpaware", to_shard(w1, p1, fused(in_plan.cols[rank]), in_perm), down, act, all_reduce),
        "naive": MLP("naive", w1_checkpoint_order, down, act, all_reduce, gather_index=p2.to(device)),
        "local-sort": MLP("local-sort", w1_checkpoint_order,
                          to_shard(w2, local.rows[rank], torch.arange(hidden), local.in_perm[rank]), act, all_reduce),
        "dense": MLP("dense", Dense(dequantize(w1, dtype)[:, fused(chunk).to(device)]),
                     Dense(dequantize(w2, dtype)[chunk.to(device)]), act, all_reduce),
    }
    return modes, dequantize(w1, torch.float32), dequantize(w2, torch.float32)


def _same_on_every_rank(m: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The MLP input: every rank of a TP group holds the same activation."""
    return torch.randn(m, hidden, generator=torch.Generator().manual_seed(m)).to(device, dtype)


def median_us(fn, reps: int) -> float:
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn(i)
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3


def time_mode(copies: list[MLP], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Eager and CUDA-graph medians (µs) over `reps` runs, rotating weight copies so none sits in L2."""
    for mlp in copies:  # warm-up: compiles and tunes the kernel, initialises NCCL, outside any capture
        for _ in range(3):
            mlp(x)
    torch.cuda.synchronize()
    eager = median_us(lambda i: copies[i % len(copies)](x), reps)
    graphs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for mlp in copies:
            mlp(x)
    torch.cuda.current_stream().wait_stream(stream)
    for mlp in copies:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            mlp(x)
        graphs.append(graph)
    torch.cuda.synchronize()
    graph_us = median_us(lambda i: graphs[i % len(graphs)].replay(), reps)
    return {"eager_us": eager, "graph_us": graph_us}


def slowest(value: float, device: torch.device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def init_rank(rank: int, tp: int, device_kind: str, port: int) -> torch.device:
    """Join the benchmark's process group: NCCL with rank r on cuda:r, or, for `--device cpu`, gloo and the op's
    exact CPU path (for checking the modes, not for timing). Registers the W4A16 op."""
    os.environ.update(MULTICAST_OFF)
    if device_kind == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp,
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    import plugins.ops  # noqa: F401  registers torch.ops.tpaware.w4a16_gemm

    return device


def use_shape(shape: tuple[int, int] | None) -> None:
    """`--shape`: every model's (hidden, intermediate) replaced, in each process (spawned workers import this module
    afresh, so the main process's change does not reach them)."""
    if shape:
        for name, (_, _, act) in list(MODELS.items()):
            MODELS[name] = (*shape, act)


def worker(rank: int, tp: int, args: argparse.Namespace, port: int, results: str) -> None:
    use_shape(args.shape)
    device = init_rank(rank, tp, args.device, port)
    all_reduce = nccl_all_reduce  # and gloo's on the CPU
    if tp > 1 and args.device == "cuda" and args.all_reduce == "one-shot":
        all_reduce = OneShotAllReduce()
    elif tp > 1 and args.device == "cuda" and args.all_reduce == "peer":
        from plugins.allreduce import PeerAllReduce

        all_reduce = PeerAllReduce()
    rows = []
    for model in args.models:
        hidden = MODELS[model][0]
        copies_of: dict[str, list[MLP]] = {mode: [] for mode in MODES}
        sets = 0
        while sets == 0 or args.device == "cuda" and sets < args.max_copies and sum(c.nbytes() for c in copies_of["tpaware"]) < 2 * L2_BYTES:
            modes, w1_ref, w2_ref = build(model, tp, rank, args.group_size, args.seed + sets, device, args.dtype,
                                          all_reduce)
            if sets == 0:
                x = _same_on_every_rank(max(args.m), hidden, args.dtype, device)
                reference = activation(MODELS[model][2], x.float() @ w1_ref) @ w2_ref
                for mode, mlp in modes.items():
                    err = ((mlp(x).float() - reference).norm() / reference.norm()).item()
                    err = slowest(err, device)
                    assert err < args.tolerance, f"{model} {mode}: relative error {err:.2e}"
                    rows.append({"model": model, "shape": list(MODELS[model][:2]), "tp": tp, "mode": mode,
                                 "check_rel_err": err})
            del w1_ref, w2_ref
            for mode, mlp in modes.items():
                copies_of[mode].append(mlp)
            sets += 1
        for m in args.m if args.device == "cuda" else ():
            x = _same_on_every_rank(m, hidden, args.dtype, device)
            rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.rounds):  # the modes take turns: a slow spell of the card costs one round of each
                for mode in MODES:
                    rounds[mode].append(time_mode(copies_of[mode], x, args.reps))
            for mode in MODES:
                times = {k: statistics.median(r[k] for r in rounds[mode]) for k in rounds[mode][0]}
                row = {"model": model, "tp": tp, "mode": mode, "m": m, "weight_copies": sets,
                       "bytes_per_rank": copies_of[mode][0].nbytes(),
                       **{k: slowest(v, device) for k, v in times.items()}}
                rows.append(row)
                if rank == 0:
                    print(f"{model:13s} tp={tp} M={m:2d} {mode:10s} graph {row['graph_us']:8.1f} us  "
                          f"eager {row['eager_us']:8.1f} us", flush=True)
        del copies_of
        torch.cuda.empty_cache()
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    dist.destroy_process_group()


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    import triton

    return {"card": props.name, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "driver": _driver(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node()}


def _driver() -> str:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# MLP latency under TP ({env['card']})", "",
             f"card {env['card']} x{env['gpus']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton']}, NCCL {env['nccl']}, {env['date']}", "", f"command: `{env['command']}`", "",
             f"Slowest rank's median over {env.get('rounds', 1)} rounds (the modes in turn) of the median of "
             f"{env.get('reps', 200)} runs, µs. CUDA graph (collectives inside) / eager. "
             "Speed-up = naive / tpaware (graph). "
             f"All-reduce: {env.get('all_reduce', ALL_REDUCE_TEXT['nccl'])}; the naive mode's AllGather: NCCL.", ""]
    timed = [r for r in rows if "m" in r]
    for model in dict.fromkeys(r["model"] for r in timed):
        lines += [f"## {model} {MODELS[model]}", "",
                  "| tp | M | tpaware | naive | local-sort | dense fp16 | naive/tpaware | local-sort/tpaware |",
                  "|---|---|---|---|---|---|---|---|"]
        for tp in sorted({r["tp"] for r in timed if r["model"] == model}):
            for m in sorted({r["m"] for r in timed if r["model"] == model and r["tp"] == tp}):
                by = {r["mode"]: r for r in timed if (r["model"], r["tp"], r["m"]) == (model, tp, m)}
                cell = {k: f"{v['graph_us']:.1f} / {v['eager_us']:.1f}" for k, v in by.items()}
                lines.append(f"| {tp} | {m} | {cell['tpaware']} | {cell['naive']} | {cell['local-sort']} | "
                             f"{cell['dense']} | {by['naive']['graph_us'] / by['tpaware']['graph_us']:.2f}x | "
                             f"{by['local-sort']['graph_us'] / by['tpaware']['graph_us']:.2f}x |")
        lines += ["", "Bytes of weights + scales + zeros per rank (MiB):", "",
                  "| tp | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
        for tp in sorted({r["tp"] for r in timed if r["model"] == model}):
            by = {r["mode"]: r["bytes_per_rank"] for r in timed if (r["model"], r["tp"]) == (model, tp)}
            lines.append(f"| {tp} | " + " | ".join(f"{by[mode] / 2**20:.1f}" for mode in MODES) + " |")
        lines.append("")
    checks = [r for r in rows if "check_rel_err" in r]
    lines += ["Correctness (relative error vs fp32 reference of the unsharded MLP, before timing): max "
              f"{max(r['check_rel_err'] for r in checks):.2e} over {len(checks)} model/tp/mode checks.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), type=lambda s: s.split(","))
    parser.add_argument("--tp", default="1,2,4,8", type=lambda s: [int(v) for v in s.split(",")],
                        help="TP degrees; on GPUs those above the GPU count are skipped")
    parser.add_argument("--m", default="1,2,4,8,16", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds per M, the modes in turn; each result is the median over rounds")
    parser.add_argument("--max-copies", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-reduce", choices=tuple(ALL_REDUCE_TEXT), default="peer",
                        help="the final all-reduce at tp > 1 on GPUs: tpaware's one-shot kernel (the runtime's "
                        "default), NCCL, or PyTorch's symmetric-memory one-shot (fp32/bf16 only, so fp16 is copied); "
                        "the one-shot kernels move the parts over NVLink, multicast off")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/mlp"))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: check every mode's output with gloo (no timing), e.g. on small --shape")
    parser.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")),
                        help="hidden,intermediate: replace the models' sizes (for quick checks)")
    args = parser.parse_args()
    use_shape(args.shape)
    # fp16 on GPUs; fp32 on CPU, where the check is exact up to fp32 rounding
    args.dtype, args.tolerance = (torch.float16, 1e-2) if args.device == "cuda" else (torch.float32, 1e-5)
    def env() -> dict:
        return {**environment(), "all_reduce": ALL_REDUCE_TEXT[args.all_reduce], "rounds": args.rounds,
                "reps": args.reps}

    rows = run_per_tp(worker, args, 29500, lambda rows: write_results(args.out, env(), rows))
    if args.device == "cpu":
        print("\n".join(f"{r['model']} {r['shape'][0]}x{r['shape'][1]} tp={r['tp']} {r['mode']}: rel err "
                        f"{r['check_rel_err']:.2e}" for r in rows))
        return
    print(markdown(env(), rows))


def run_per_tp(worker, args: argparse.Namespace, base_port: int, save) -> list[dict]:
    """Spawn `worker(rank, tp, args, port, results_file)` on tp processes for each tp in `args.tp` and collect the
    rows rank 0 writes; on GPUs `save(rows)` runs after every tp, so a run cut short still leaves its finished rows."""
    os.environ.update(MULTICAST_OFF)
    rows: list[dict] = []
    for i, tp in enumerate(args.tp):
        if args.device == "cuda" and tp > torch.cuda.device_count():
            print(f"skipping tp={tp}: only {torch.cuda.device_count()} GPU(s)")
            continue
        results = Path(f"{args.out}.tp{tp}.part.json")
        results.parent.mkdir(parents=True, exist_ok=True)
        mp.spawn(worker, args=(tp, args, base_port + 17 * i + os.getpid() % 1000, str(results)), nprocs=tp, join=True)
        rows += json.loads(results.read_text())
        results.unlink()
        if args.device == "cuda":
            save(rows)
    return rows


def write_results(out: Path, env: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    Path(f"{out}.md").write_text(markdown(env, rows))


if __name__ == "__main__":
    main()
