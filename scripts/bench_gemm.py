"""Benchmark (and with --check, first verify) the W4A16 kernel at Llama-70B / Granite-20B shards.

    python scripts/bench_gemm.py --out benchmarks/run --check

For every per-rank MLP shard (tp 1/2/4/8) and M in 1..64 it times, as CUDA-graph replays over
weight copies that together exceed the L2 several times (random data, never zeros), the median of
many replays of: the `tpaware::w4a16_gemm` op (contiguous groups, tuned), fp16 cuBLAS
(`F.linear`) and `torch._weight_int4pack_mm` (bf16, group 128, best innerKTiles of 2/4/8); for
Llama tp=2 also the fused-gather and g_idx variants.  Bandwidth counts int4 + scale + zero bytes.
Writes gemm.md, gemm.json, gemm.png and tuned_configs.json into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins import ops, tuning  # noqa: E402  (ops registers the custom op)
from plugins.tuning import graph_time_us  # noqa: E402
from plugins.reference import random_layer, relative_error  # noqa: E402
from plugins.layout import dequantize  # noqa: E402
from plugins.w4a16 import w4a16_matmul  # noqa: E402

MODELS = {"llama-70b": (8192, 28672, True), "granite-20b": (6144, 24576, False)}  # hidden, inter, gated
TPS = (1, 2, 4, 8)
MS = (1, 2, 4, 8, 16, 32, 64)
GROUP = 128
TOL = 2e-3  # fp16 relative error bound for --check
ROUNDS = 3  # timing rounds per row (see _timed_in_rounds)


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    tp: int
    k: int
    n: int

    @property
    def weight_bytes(self) -> int:
        """int4 weights + fp16 scales + int4 zeros: what the kernel must read."""
        groups = self.k // GROUP
        return self.k * self.n // 2 + groups * self.n * 2 + groups * self.n // 2


def shapes() -> list[Shape]:
    """Per-rank MLP shards: gate+up (or up) is column-parallel, down is row-parallel."""
    out = []
    for model, (hidden, inter, gated) in MODELS.items():
        for tp in TPS:
            out.append(Shape(model, "gate_up" if gated else "up", tp, hidden, (2 if gated else 1) * inter // tp))
            out.append(Shape(model, "down", tp, inter // tp, hidden))
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s of 1 GiB, counting bytes read plus bytes written.

    The better of cudaMemcpy (`copy_`) and an elementwise kernel (`mul(src, 1, out=dst)`).
    """
    src = torch.rand(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    us = min(graph_time_us(lambda _: (lambda: dst.copy_(src)), 1, replays=20),
             graph_time_us(lambda _: (lambda: torch.mul(src, 1.0, out=dst)), 1, replays=20))
    return 2 * src.numel() * 4 / us / 1e3


@triton.jit
def _read_words(src, out, n_words, per_program, BLOCK: tl.constexpr):
    """XOR of one contiguous run of int32 words per program: a kernel that only reads."""
    start = tl.program_id(0).to(tl.int64) * per_program
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(0, per_program, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        acc ^= tl.load(src + offs, mask=(offs < n_words) & (offs < start + per_program), other=0)
    tl.store(out + tl.program_id(0), tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def read_only_us(nbytes: int, l2: int) -> float:
    """Best µs of `_read_words` over `nbytes` (2 to 16 programs per SM, 1 or 4 K words per loop trip), timed as the
    GEMM is: the floor for any kernel that must read those bytes on this card, its launch and ramp included."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    words = nbytes // 4
    copies = tuning.n_copies(nbytes, l2)
    bufs = [torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    out = torch.empty(16 * sms, dtype=torch.int32, device="cuda")
    best = float("inf")
    for per_sm in (2, 4, 8, 16):
        grid = per_sm * sms
        for block in (1024, 4096):
            per_program = triton.cdiv(words, grid)
            best = min(best, graph_time_us(
                lambda i: (lambda: _read_words[(grid,)](bufs[i], out, words, per_program, BLOCK=block)), copies))
    return best


def bench_shape(shape: Shape, l2: int, gen: torch.Generator, check: bool, variants: bool) -> list[dict]:
    """All M values of one shape; returns one row per M."""
    copies = tuning.n_copies(shape.weight_bytes, l2)
    read_us = read_only_us(shape.weight_bytes, l2)
    weights = [random_layer(shape.k, shape.n, GROUP, generator=gen)[0] for _ in range(copies)]
    fp16 = [torch.randn(shape.n, shape.k, device="cuda", dtype=torch.float16, generator=gen) / 64
            for _ in range(tuning.n_copies(shape.k * shape.n * 2, l2))]
    raw = torch.randint(0, 256, (shape.n, shape.k // 2), dtype=torch.uint8, device="cuda", generator=gen)
    int4 = {tiles: [torch._convert_weight_to_int4pack(raw, tiles) for _ in range(copies)] for tiles in (2, 4, 8)}
    del raw
    sz = [(torch.rand(shape.k // GROUP, shape.n, 2, device="cuda", generator=gen) / 64).to(torch.bfloat16)
          for _ in range(copies)]
    perm = torch.randperm(shape.k, device="cuda", generator=gen)
    # an act-order g_idx: whole groups of 128 rows, scattered over K
    gi = (torch.arange(shape.k, device="cuda", dtype=torch.int32) // GROUP)[
        torch.randperm(shape.k, device="cuda", generator=gen)]
    if check:
        w64 = dequantize(weights[0], GROUP, dtype=torch.float64)
        w64_gidx = dequantize(weights[0], GROUP, gi, dtype=torch.float64)
    rows = []
    for m in MS:
        x = torch.randn(m, shape.k, device="cuda", generator=gen).to(torch.float16)
        op = torch.ops.tpaware.w4a16_gemm

        def ours(i, x=x):
            w = weights[i]
            return lambda: op(x, w["qweight"], w["qzeros"], w["scales"], GROUP)

        row = {**asdict(shape), "m": m, "bytes": shape.weight_bytes, "copies": copies, "us_read": read_us}
        ours(0)()  # tunes this (shape, M bucket) outside any capture
        key = tuning.cache_key(ops._device_info(0)[0], "contig", torch.float16, GROUP, m, shape.n, shape.k)
        config = tuning.lookup(key)
        row["config"] = asdict(config)
        if check:  # the tuned config in all three variants, output poisoned with NaN first
            for name, ref, extra in (("rel_err", w64, {}), ("rel_err_perm", w64, {"in_perm": perm}),
                                     ("rel_err_gidx", w64_gidx, {"g_idx": gi})):
                out = torch.full((m, shape.n), float("nan"), dtype=x.dtype, device="cuda")
                w4a16_matmul(x, weights[0], GROUP, config, out=out, **extra)
                xr = x[:, perm] if "in_perm" in extra else x
                row[name] = relative_error(out, xr.double() @ ref)
        timed = {"us": (ours, copies)}  # column -> (make_call, copies)
        if variants:  # the fused gather: the contiguous choice if a tensor-core tile, else its own (lookup_call)
            op(x, weights[0]["qweight"], weights[0]["qzeros"], weights[0]["scales"], GROUP, perm)
            row["config_perm"] = asdict(tuning.lookup_call(ops._device_info(0)[0], "perm", torch.float16, GROUP, m,
                                                           shape.n, shape.k))
            timed["us_perm"] = (lambda i, x=x: (lambda: op(
                x, weights[i]["qweight"], weights[i]["qzeros"], weights[i]["scales"], GROUP, perm)), copies)
            timed["us_gidx"] = (lambda i, x=x: (lambda: w4a16_matmul(x, weights[i], GROUP, config, g_idx=gi)), copies)
        timed["us_cublas"] = (lambda i, x=x: (lambda: F.linear(x, fp16[i % len(fp16)])), len(fp16))
        xb = x.to(torch.bfloat16)
        for tiles, packed in int4.items():
            timed[f"int4pack_{tiles}"] = (
                lambda i, p=packed: (lambda: torch._weight_int4pack_mm(xb, p[i], GROUP, sz[i])), copies)
        row.update(_timed_in_rounds(timed))
        tinygemm = {tiles: row.pop(f"int4pack_{tiles}") for tiles in int4}
        row["int4pack_inner_k_tiles"] = min(tinygemm, key=tinygemm.get)
        row["us_int4pack"] = tinygemm[row["int4pack_inner_k_tiles"]]
        rows.append(row)
        print(f"{shape.model:12s} {shape.layer:8s} tp{shape.tp} K={shape.k:6d} N={shape.n:6d} M={m:3d} "
              f"ours {row['us']:8.2f} us  cublas {row['us_cublas']:8.2f}  int4pack {row['us_int4pack']:8.2f}"
              + (f"  err {row['rel_err']:.1e}/{row['rel_err_perm']:.1e}/{row['rel_err_gidx']:.1e}" if check else ""),
              flush=True)
    return rows


def _timed_in_rounds(timed: dict[str, tuple]) -> dict[str, float]:
    """Median over ROUNDS of each column's `graph_time_us`, the columns taking turns in every round: a slow spell of
    the card (a one-round run had rows 7-34% slower than the next run's, plugins/NOTES.md) then costs one round of
    every column instead of one whole row."""
    times: dict[str, list[float]] = {column: [] for column in timed}
    for _ in range(ROUNDS):
        for column, (make_call, copies) in timed.items():
            times[column].append(graph_time_us(make_call, copies))
    return {column: sorted(t)[len(t) // 2] for column, t in times.items()}


def environment(argv: list[str]) -> dict:
    """Card, driver, versions, date and the exact command, for the report header."""
    import triton

    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "card": props.name, "sms": props.multi_processor_count, "l2_mb": props.L2_cache_size / 2**20,
        "driver": driver, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(argv),
    }


def markdown(env: dict, copy_gbs: float, rows: list[dict]) -> str:
    """The report: header, per-row table (µs, GB/s, % of copy, baselines)."""
    lines = [
        "# W4A16 GEMM benchmark",
        "",
        f"- card: {env['card']} ({env['sms']} SMs, L2 {env['l2_mb']:.0f} MiB), driver {env['driver']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- measured device-to-device copy: {copy_gbs:.0f} GB/s (read + write)",
        f"- time: median of {ROUNDS} rounds (every column of a row timed once per round, in turn) of the median of 50 "
        "CUDA-graph replays, each running the call once per weight copy (copies stream >= 4x the L2); fp16 "
        "activations, group 128, random data",
        "- GB/s counts int4 weights + fp16 scales + int4 zeros; x and y are ignored",
        "- read-only µs: a kernel that only reads the same bytes (`_read_words`, best of 8 launch shapes), timed the "
        "same way: the floor for any kernel of that size on this card",
        "",
        "| model | layer | tp | K | N | M | ours µs | GB/s | % copy | read-only µs | cuBLAS fp16 µs | x cuBLAS | "
        "int4pack µs (iKT) | x int4pack | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gbs = r["bytes"] / r["us"] / 1e3
        cfg_s = _config_text(r["config"])
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['tp']} | {r['k']} | {r['n']} | {r['m']} | {r['us']:.1f} | "
            f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {r['us_read']:.1f} | {r['us_cublas']:.1f} | "
            f"{r['us_cublas'] / r['us']:.2f} | "
            f"{r['us_int4pack']:.1f} ({r['int4pack_inner_k_tiles']}) | {r['us_int4pack'] / r['us']:.2f} | {cfg_s} |")
    variant_rows = [r for r in rows if "us_perm" in r]
    if variant_rows:
        lines += ["", "## Variants (Llama-70B tp=2; g_idx with the contiguous config, the fused gather tuned)", "",
                  "| layer | M | contiguous µs | fused gather µs | g_idx µs | fused gather config |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['m']} | {r['us']:.1f} | {r['us_perm']:.1f} | {r['us_gidx']:.1f} | "
                  f"{_config_text(r['config_perm'])} |" for r in variant_rows]
    return "\n".join(lines) + "\n"


def _config_text(cfg: dict) -> str:
    """`fma|dot|ws|ws2 MxNxK sSPLIT|pPROGRAMS wWARPS [pf] [px]`: split-K or a stream-K grid of PROGRAMS, pf prefetches
    by hand, px is the FMA path's `prep_x`; ws is the tensor-core tile on the warp-specialized Gluon kernel, ws2 the
    same with two consumer warpgroups."""
    grid = f"p{cfg['programs']}" if cfg.get("programs") else f"s{cfg['split_k']}"
    ws = "ws2" if cfg.get("warpgroups", 1) == 2 else "ws"
    path = ws if cfg.get("warp_specialized") else "dot" if cfg["use_dot"] else "fma"
    return (f"{path} {cfg['block_m']}x{cfg['block_n']}x{cfg['block_k']} "
            f"{grid} w{cfg['num_warps']}{' pf' if cfg['prefetch'] else ''}"
            f"{' px' if cfg.get('prep_x') else ''}")


def plot(rows: list[dict], copy_gbs: float, path: Path) -> None:
    """Achieved GB/s and speed-up over cuBLAS versus M, one line per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bw, sp) = plt.subplots(1, 2, figsize=(14, 5.5))
    for shape in shapes():
        rs = [r for r in rows if (r["model"], r["layer"], r["tp"]) == (shape.model, shape.layer, shape.tp)]
        if not rs:
            continue
        style = "-" if shape.model == "llama-70b" else "--"
        label = f"{shape.model} {shape.layer} tp{shape.tp}"
        ms = [r["m"] for r in rs]
        bw.plot(ms, [r["bytes"] / r["us"] / 1e3 for r in rs], style, marker="o", ms=3, label=label)
        sp.plot(ms, [r["us_cublas"] / r["us"] for r in rs], style, marker="o", ms=3, label=label)
        if shape.model == "llama-70b" and shape.tp == 2:
            bw.plot(ms, [r["bytes"] / r["us_int4pack"] / 1e3 for r in rs], ":", color="gray",
                    label=f"int4pack {shape.layer} tp2")
    bw.axhline(copy_gbs, color="k", lw=0.8)
    bw.axhline(0.75 * copy_gbs, color="k", lw=0.8, ls=":")
    bw.set(xscale="log", xlabel="M", ylabel="GB/s (int4 + scales + zeros)", title="achieved bandwidth "
           "(black: measured copy, dotted: 75%)")
    sp.axhline(2.8, color="k", lw=0.8, ls=":")
    sp.set(xscale="log", xlabel="M", ylabel="speed-up", title="speed-up over fp16 cuBLAS (dotted: 2.8x)")
    bw.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gemm.md/json/png, tuned_configs.json")
    parser.add_argument("--plot", type=Path, help="only redraw gemm.png into --out from this gemm.json "
                        "(on a machine without matplotlib)")
    parser.add_argument("--check", action="store_true", help="compare with the fp64 reference at every shape")
    parser.add_argument("--only", default="", help="substring filter on 'model layer tpN' (for quick runs)")
    parser.add_argument("--retune", action="store_true", help="ignore the shipped choices for this card and tune "
                        "every shape afresh (tuned_configs.json keeps the other cards' shipped choices)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        saved = json.loads(args.plot.read_text())
        plot(saved["rows"], saved["copy_gbs"], args.out / "gemm.png")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gemm: no CUDA GPU here; the benchmark times the kernel on one (--plot redraws a gemm.json "
                 "anywhere)")
    env = environment(sys.argv)
    print(json.dumps(env), flush=True)
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    card = ops._device_info(0)[0]
    others = {k: c for k, c in tuning.skip_shipped().items() if not k.startswith(card + "|")} if args.retune else None
    rows = []
    for shape in shapes():
        if args.only not in f"{shape.model} {shape.layer} tp{shape.tp}":
            continue
        variants = shape.model == "llama-70b" and shape.tp == 2
        rows += bench_shape(shape, l2, gen, args.check, variants)
        torch.cuda.empty_cache()
        tuning.save(args.out / "tuned_configs.json", others)  # after every shape: a time-out keeps the rest
        (args.out / "gemm.json").write_text(json.dumps({"env": env, "copy_gbs": copy_gbs, "rows": rows}, indent=1))
    (args.out / "gemm.md").write_text(markdown(env, copy_gbs, rows))
    try:
        plot(rows, copy_gbs, args.out / "gemm.png")
    except ImportError:
        print("no matplotlib: draw gemm.png elsewhere with --plot gemm.json")
    if args.check:
        worst = max(max(r["rel_err"], r["rel_err_perm"], r["rel_err_gidx"]) for r in rows)
        print(f"check: worst relative error {worst:.2e} (bound {TOL})")
        if worst > TOL:
            sys.exit(1)


if __name__ == "__main__":
    main()
