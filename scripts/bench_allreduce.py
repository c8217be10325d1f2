"""All-reduce latency of decode-sized tensors: NCCL vs PyTorch's one-shot vs tpaware's one-shot, one process per GPU.

    python scripts/bench_allreduce.py --tp 2 --m 1,2,4,8,16 --out benchmarks/allreduce

The tensor is [M, hidden] fp16, what a TP MLP or attention block reduces per token.  Each method is first checked
(tpaware's result must equal the rank-order fp32 sum rounded once; the others within fp16 rounding of it), then timed
as `--calls` all-reduces back to back in one CUDA graph (`tuning.graph_time_us`, as the GEMM benchmark times its
calls), median of `--reps` replays, slowest rank.  Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_mlp import ALL_REDUCE_TEXT, OneShotAllReduce, environment, init_rank, nccl_all_reduce  # noqa: E402
from bench_mlp import run_per_tp, slowest  # noqa: E402
from plugins.allreduce import PeerAllReduce  # noqa: E402
from plugins.tuning import graph_time_us  # noqa: E402


def worker(rank: int, tp: int, args: argparse.Namespace, port: int, results: str) -> None:
    device = init_rank(rank, tp, "cuda", port)
    methods = {"nccl": nccl_all_reduce, "one-shot": OneShotAllReduce(), "peer": PeerAllReduce()}
    rows = []
    for m in args.m:
        parts = [torch.randn(m, args.hidden, generator=torch.Generator().manual_seed(100 * m + r)).half()
                 for r in range(tp)]
        exact = sum(p.float() for p in parts).half()
        x = parts[rank].to(device)
        for name, fn in methods.items():
            got = fn(x.clone()).cpu()  # NCCL reduces in place: x stays each rank's part
            err = (got.float() - exact.float()).abs().max().item()
            assert (err == 0) if name == "peer" else err <= 2e-3 * exact.float().abs().max().item(), (name, m, err)
            t = x.clone()  # NCCL's in-place sums grow t while timing: x stays each rank's part
            row = {"tp": tp, "m": m, "method": name, "bytes": x.numel() * x.element_size(), "max_abs_err": err,
                   "graph_us": slowest(graph_time_us(lambda _: (lambda: fn(t)), args.calls, args.reps), device)}
            rows.append(row)
            if rank == 0:
                print(f"tp={tp} M={m:2d} {name:8s} {row['graph_us']:7.1f} us", flush=True)
    if rank == 0:
        Path(results).write_text(json.dumps(rows))
    dist.destroy_process_group()


def markdown(env: dict, rows: list[dict]) -> str:
    lines = ["# All-reduce latency of decode-sized fp16 tensors", "",
             f"card {env['card']} x{env['gpus']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
             f"triton {env['triton']}, NCCL {env['nccl']}, {env['date']}", "", f"command: `{env['command']}`", "",
             f"µs per all-reduce of [M, hidden] fp16, {env['calls']} back to back in a CUDA graph, slowest rank's "
             "median.  Methods: "
             + "; ".join(f"`{k}` = {v}" for k, v in ALL_REDUCE_TEXT.items()) + ".", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines += ["| tp | M | KiB | " + " | ".join(methods) + " | nccl / peer |", "|" + "---|" * (len(methods) + 4)]
    for tp, m in dict.fromkeys((r["tp"], r["m"]) for r in rows):
        by = {r["method"]: r for r in rows if r["tp"] == tp and r["m"] == m}
        cells = " | ".join(f"{by[k]['graph_us']:.1f}" for k in methods)
        lines.append(f"| {tp} | {m} | {by[methods[0]]['bytes'] / 1024:.0f} | {cells} | "
                     f"{by['nccl']['graph_us'] / by['peer']['graph_us']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="2", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--m", default="1,2,4,8,16", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=20, help="all-reduces per graph")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/allreduce"))
    args = parser.parse_args()
    args.device = "cuda"

    def save(rows: list[dict]) -> None:
        env = {**environment(), "calls": args.calls}
        Path(f"{args.out}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        Path(f"{args.out}.md").write_text(markdown(env, rows))

    run_per_tp(worker, args, 29700, save)
    print(Path(f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
