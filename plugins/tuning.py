"""Per-shape choice of `Config`: candidates, a heuristic default, timing, and a JSON cache.

The choice is keyed on (device name, variant, dtype, group size, M bucket, N, K).  Tuned choices
live in memory and can be saved to / loaded from JSON (`plugins/tuned_configs.json` ships the
ones measured for the benchmark shapes), so a serving process need not re-tune.  No tuning
happens during CUDA-graph capture: there the cached or heuristic choice is used.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from plugins.w4a16 import Config

MAX_M = 64  # largest M the kernel serves; above it the op dequantizes and calls cuBLAS
SHIPPED = Path(__file__).with_name("tuned_configs.json")
_CACHE: dict[str, Config] = {}
_LOADED = False
TUNING_REPLAYS = 20  # graph replays per candidate, each calling it once per weight copy
MAX_TUNING_COPIES = 64  # bounds a tiny layer's timing graph (64 calls); layers under 4x L2 / 64 then partly hit the L2

# (block_n, block_k, num_warps, prefetch) tried per family: tiles that compile without spills
# and without the layout conversions that some shapes trigger (scripts/gemm_sass_report.py).
_FMA_TILES = ((64, 128, 4, False), (64, 128, 4, True), (128, 128, 8, False), (128, 128, 8, True),
              (32, 128, 4, False), (64, 256, 4, True), (128, 256, 8, True), (64, 64, 4, True), (128, 64, 8, True))
# dot tiles never prefetch by hand: Triton pipelines their weight loads (cp.async, num_stages)
# (the 32-row K steps serve group 32, whose groups would otherwise change inside every K step and send the dot path
# through its weight-by-weight dequantizing step: plugins/NOTES.md "Session 13")
_DOT_TILES = ((128, 128, 8, False), (128, 128, 4, False), (256, 128, 8, False), (256, 64, 8, False),
              (64, 128, 4, False), (256, 32, 8, False), (128, 32, 4, False))
_STAGES = 3
_STREAM_K_PER_SM = (2, 3, 4)
FMA_MAX_M = 4  # above it each weight feeds so many FFMAs that the tensor cores win


def _fma_regs(block_m: int, block_n: int, block_k: int, warps: int) -> int:
    """fp32 accumulator registers per thread of the FMA path (it keeps two: acc and the step's partial)."""
    return block_m * block_n * (block_k // 8) // (warps * 32)


def m_bucket(m: int) -> int:
    """Smallest power of two >= m (1, 2, 4, ..., 64): M values in one bucket share a choice."""
    return 1 << max(m - 1, 0).bit_length()


def cache_key(device: str, variant: str, dtype: torch.dtype, group_size: int, m: int, n: int, k: int) -> str:
    return f"{device}|{variant}|{str(dtype).removeprefix('torch.')}|g{group_size}|m{m_bucket(m)}|n{n}|k{k}"


def _split_choices(tiles: int, steps: int, num_sms: int) -> list[int]:
    """Split counts worth trying: from enough programs to cover every SM, doubling while under 8 programs per SM
    (a K step's chain of loads, unpacking and products is long: more programs in flight hide it), with at least 4
    K steps per split."""
    split = 1
    while tiles * split < num_sms and steps // (split * 2) >= 4:
        split *= 2
    splits = [split]
    while tiles * splits[-1] < 8 * num_sms and steps // (splits[-1] * 2) >= 4:
        splits.append(splits[-1] * 2)
    return splits


def candidates(m: int, n: int, k: int, num_sms: int, permuted: bool = False,
               warp_specialized: bool = False) -> list[Config]:
    """Configs to try for one shape; the first is the untuned default.

    Split-K counts for every tile, and for the tensor-core tiles also stream-K grids (`Config.programs`): where the
    tile count is no multiple of the SM count (Llama tp=2 gate+up: 224 tiles on 132 SMs), evening the work out over
    the programs was 5% faster at M=16 (plugins/NOTES.md).

    The FMA tiles are tried with and without prepared X (`Config.prep_x`), except for a layer with an input
    permutation (`permuted`), whose FMA path always prepares X, like every dot tile.

    Where the warp-specialized kernel can run the call (`warp_specialized`, see `w4a16_ws.supported`), its split-K
    grids are added for as long as every program is resident at once (3 per SM): a second round of programs measured
    1.56x slower (plugins/NOTES.md "Session 9"); and where the tiles fit one per SM, its form with two consumer
    warpgroups per tile (one program per SM, no split: 1.5 µs faster on 112 tiles at M=1, "Session 12"), unless they
    would leave half the SMs idle (64 tiles: 40-48 µs against 29-31 split by 4).
    """
    bucket = m_bucket(m)
    families: list[tuple[int, bool, tuple[tuple[int, int, int, bool], ...]]] = []
    if bucket <= FMA_MAX_M:  # CUDA-core FMAs: tensor cores would pad M to 16 rows
        families.append((bucket, False, tuple(t for t in _FMA_TILES if _fma_regs(bucket, *t[:3]) <= 32)))
    families.append((max(16, bucket), True, _DOT_TILES))
    if bucket > 16:  # several 16-row tiles per weight tile: lighter programs, weights from L2
        families.append((16, True, _DOT_TILES))
    out = []
    for block_m, use_dot, tiles in families:
        for block_n, block_k, warps, prefetch in tiles:
            n_tiles = -(-n // block_n) * -(-m // block_m)
            for split in _split_choices(n_tiles, -(-k // block_k), num_sms):
                out.append(Config(block_m, block_n, block_k, split, use_dot, prefetch, warps, _STAGES))
            # stream-K for the dot tiles (2 to 5 fit per SM): more programs than tiles, at most one per K step
            if use_dot:
                out += [Config(block_m, block_n, block_k, 1, True, False, warps, _STAGES, programs=per_sm * num_sms)
                        for per_sm in _STREAM_K_PER_SM if n_tiles < per_sm * num_sms <= n_tiles * -(-k // block_k)]
    if warp_specialized:
        from plugins import w4a16_ws

        n_tiles = -(-n // w4a16_ws.BLOCK_N) * -(-m // 16)
        out += [Config(16, w4a16_ws.BLOCK_N, w4a16_ws.BLOCK_K, split, True, False, 4, w4a16_ws.STAGES,
                       warp_specialized=True)
                for split in (1, 2, 3, 4) if split == 1 or n_tiles * split <= w4a16_ws.PER_SM * num_sms]
        if num_sms // 2 < n_tiles <= num_sms:
            out.append(Config(16, w4a16_ws.BLOCK_N, w4a16_ws.BLOCK_K, 1, True, False, 4, w4a16_ws.SHARED_STAGES,
                              warp_specialized=True, warpgroups=2))
    return out + [replace(c, prep_x=True) for c in out if not (c.use_dot or permuted)]


def lookup(key: str) -> Config | None:
    """Cached choice for `key`; the shipped JSON is merged in on first use."""
    if not _LOADED and SHIPPED.exists():
        load(SHIPPED)
    return _CACHE.get(key)


def lookup_call(device: str, variant: str, dtype: torch.dtype, group_size: int, m: int, n: int,
                k: int) -> Config | None:
    """The cached choice for a call, or where its variant has none, the contiguous layer's wherever that runs the same
    GEMM: a g_idx layer shares the kernel's structure, and a permuted input on the tensor-core path is gathered by the
    X preparation, which that path runs anyway.  (On the CUDA-core path the gather adds that launch, which moves the
    best choice: a permuted layer is then tuned on its own.)"""
    config = lookup(cache_key(device, variant, dtype, group_size, m, n, k))
    if config is None and variant != "contig":
        contig = lookup(cache_key(device, "contig", dtype, group_size, m, n, k))
        if contig is not None and (variant == "gidx" or contig.use_dot):
            return contig
    return config


def choose(key: str, cands: list[Config], run: Callable[[Config, int], None], copies: int) -> Config:
    """Cached choice, else (outside graph capture, unless TPAWARE_AUTOTUNE=0) time every candidate.

    `run(config, i)` calls the kernel on weight copy i of `copies` (see `weight_copies`): each candidate is timed as
    the benchmark times it, back-to-back calls that stream the weights from memory.  Timing single calls after an L2
    flush instead favoured the one-launch candidates (the CUDA-core tiles at M = 1 paid no X-preparation launch in a
    cold graph): on H100 it picked the CUDA-core tile for Llama-70B's tp=2 down shard at M=1, 33.0 µs where the
    tensor-core tile it passed over takes 30.4 (benchmarks/gemm_h100.md).
    """
    hit = lookup(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing() or os.environ.get("TPAWARE_AUTOTUNE", "1") == "0":
        return cands[0]
    best = min(cands, key=lambda c: _time_or_inf(lambda i: (lambda: run(c, i)), copies))
    _CACHE[key] = best
    return best


def _time_or_inf(make_call: Callable[[int], Callable[[], None]], copies: int) -> float:
    """`graph_time_us`, or infinity for a candidate that needs more shared memory than the device has."""
    from triton.runtime.errors import OutOfResources

    try:
        return graph_time_us(make_call, copies, TUNING_REPLAYS)
    except OutOfResources:
        return float("inf")


def n_copies(bytes_per_copy: int, l2_bytes: int) -> int:
    """Enough weight copies that one pass over them streams at least 4x the L2 (at least 2 copies)."""
    return max(2, math.ceil(4 * l2_bytes / bytes_per_copy))


def weight_copies(weights: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The layer plus clones of it, `n_copies` in all (at most MAX_TUNING_COPIES): calls cycling through them read the
    weights from memory, not from the L2 (temporary memory while a shape is tuned: about 4x the L2)."""
    qweight = weights["qweight"]
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    count = min(n_copies(nbytes, torch.cuda.get_device_properties(qweight.device).L2_cache_size), MAX_TUNING_COPIES)
    return [weights] + [{name: t.clone() for name, t in weights.items()} for _ in range(count - 1)]


def graph_time_us(make_call: Callable[[int], Callable[[], None]], copies: int, replays: int = 50) -> float:
    """Median device µs per call: a CUDA graph calls `make_call(i)()` once for each copy i, back to back (as a model
    runs its layers, without the launch gaps of eager calls); CUDA events around each replay."""
    for i in range(copies):  # warm-up: compile, tune, allocate outside the capture
        make_call(i)()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            make_call(i)()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return sorted(times)[len(times) // 2]


def save(path: Path, others: dict[str, Config] | None = None) -> None:
    """Write every cached choice, plus `others` not cached (e.g. other cards' shipped ones), to `path` as JSON."""
    merged = {**(others or {}), **_CACHE}
    path.write_text(json.dumps({k: asdict(c) for k, c in sorted(merged.items())}, indent=1) + "\n")


def skip_shipped() -> dict[str, Config]:
    """Leave the shipped choices out of the cache (to re-tune every shape); returns them."""
    global _LOADED
    _LOADED = True
    return {k: Config(**fields) for k, fields in json.loads(SHIPPED.read_text()).items()}


def load(path: Path) -> None:
    """Merge choices from a JSON file written by `save` (entries already cached win)."""
    global _LOADED
    _LOADED = True
    for key, fields in json.loads(path.read_text()).items():
        _CACHE.setdefault(key, Config(**fields))
