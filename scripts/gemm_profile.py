"""Run one W4A16 shape repeatedly, for Nsight Compute to profile the kernel it picks.

    ncu --clock-control none --kernel-name regex:w4a16 --launch-skip 10 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python scripts/gemm_profile.py --k 8192 --n 28672 --m 1 --configs OUT/tuned_configs.json

Loads tuned choices from --configs (so the profiled kernel is the benchmarked one; ncu's replay
would distort tuning) and prints the config used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins import ops, tuning  # noqa: E402
from plugins.reference import random_layer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--configs", type=Path, help="tuned_configs.json written by bench_gemm.py")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.configs:
        tuning.load(args.configs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights, _ = random_layer(args.k, args.n, args.group_size, generator=gen)
    x = torch.randn(args.m, args.k, device="cuda", generator=gen).to(torch.float16)
    for _ in range(args.iters):
        ops.w4a16_linear(x, weights, args.group_size)
    torch.cuda.synchronize()
    key = tuning.cache_key(ops._device_info(0)[0], "contig", torch.float16, args.group_size, args.m, args.n, args.k)
    print(key, tuning.lookup(key))


if __name__ == "__main__":
    main()
