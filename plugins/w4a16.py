"""Triton kernels for Y[M, N] = X[M, K] @ dequant(W4)[K, N], decode-sized M (1 to 64).

One kernel, specialised by constexpr flags into the variants:

* contiguous groups (group of row k is k // GROUP_SIZE), optionally gathering X[:, perm]: once
  per call by `_prep_x_kernel` (PREPARED_X: always on the dot path; on the FMA path for a
  permutation, or where the tuner chose `Config.prep_x`), else on load;
* general `g_idx` (per-row group lookup), the slow baseline: scales and zeros are gathered per
  nibble instead of once per tile row;
* USE_DOT picks tensor cores (one `tl.dot` per K step, computed transposed as W^T X^T so the
  weights are the wide wgmma operand and X, padded to 16 rows, the narrow one) or, for small M
  (1 to 4), CUDA-core FMAs that sum the 8 nibbles of a word inside one thread and reuse each
  unpacked nibble for every row of X;
* the programs share the (output tile, K step) iterations evenly (stream-K): a program that starts
  or ends inside a tile writes an fp32 partial, and the last part of the tile to arrive (an atomic
  counter that it resets afterwards) sums them in program order, so the result is deterministic and
  no extra kernel (memset, reduction) is launched.  `Config.split_k` programs per tile is split-K;
  `Config.programs` sets the count directly (a multiple of the SM count evens out the last round).

Dequantization avoids the slow int-to-float conversion; both paths multiply the raw nibbles,
read as tiny floats, and apply zero point and scale once per group and column afterwards.
The dot path masks nibbles e and e + 4 of a word into its two 16-bit halves (one shift and one
LOP3 per two weights), which read as fp16 are the subnormals q 2^-24 (bf16: the normal numbers
(128 + q) 2^-133), loading the words straight in the tensor-core operand layout; X's K order is
permuted to match.  The FMA path masks nibble i in place,
the integer 16^e q (e = i % 4), reads it as the fp32 subnormal 16^e q 2^-149 and multiplies
it by X pre-scaled by 2^64 / 16^e: one LOP3 and one FFMA per weight.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from plugins.pdl import enabled as pdl_enabled
from plugins.pdl import let_next_kernel_launch, wait_for_previous_kernel

DENORM_UNDO = tl.constexpr(2.0**85)  # 2^149 / 2^64: turns the accumulated sum back into x * q
X_UNDO = tl.constexpr(2.0**-64)  # FMA g_idx path: undoes X's 2^64 (its 16^-e cancels the weight's 16^e)
PREP_ROWS = 128  # packed rows of X per `_prep_x_kernel` program
MAGIC = tl.constexpr(0x4B000000)  # bit pattern of 2.0**23; OR-ing a value < 2**23 into it gives 2**23 + value
# dot path, OR-ed into both 16-bit halves of the masked words (see _dot_weights)
PAIR_MAGIC = {torch.float16: 0, torch.bfloat16: 0x00800080}


@triton.jit
def _zero_points(qzeros_ptr, grp, offs_n, mask, N):
    """int32 zero points (0..15) for groups `grp` and columns `offs_n` (broadcastable)."""
    packed = tl.load(qzeros_ptr + grp * (N // 8) + offs_n // 8, mask=mask, other=0)
    return (packed >> ((offs_n % 8) * 4)) & 0xF


@triton.jit
def _group_meta(scales_ptr, qzeros_ptr, grp, offs_n, mask, N):
    """fp32 (scale, zero point) for groups `grp` and columns `offs_n` (broadcastable)."""
    s = tl.load(scales_ptr + grp * N + offs_n, mask=mask, other=0.0).to(tl.float32)
    z = _zero_points(qzeros_ptr, grp, offs_n, mask, N)
    return s, (z | MAGIC).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _pair_order(c):
    """Row of the layer (within its 8-row word) that column c of the dot path's unpacked tile holds:
    8 (c // 8) + PAIR_ORDER[c % 8], PAIR_ORDER = (0, 4, 1, 5, 2, 6, 3, 7) (see _dot_weights)."""
    return (c & ~7) + ((c & 7) >> 1) + ((c & 1) << 2)


@triton.jit
def _nibble_bits(q, q_hi, i: tl.constexpr):
    """Nibble i of every word masked in place (no shift): the integer 16^(i % 4) * nibble.

    Nibbles 4..7 come from `q_hi = q >> 16`, one shift per word, so the bits stay below bit 16.
    """
    if i < 4:
        bits = q & (0xF << (4 * i))
    else:
        bits = q_hi & (0xF << (4 * (i - 4)))
    return bits


@triton.jit
def _load_words(qweight_ptr, rows, offs_n, row_end, mask_n, N):
    """The [len(rows), BLOCK_N] int32 weight tile, zero outside rows < row_end and the N mask."""
    mask = (rows < row_end)[:, None] & mask_n[None, :]
    return tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)


@triton.jit
def w4a16_kernel(
    x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr,
    out_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_om, magic,
    GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, PREPARED_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, PREFETCH: tl.constexpr, STREAM_K: tl.constexpr, PDL: tl.constexpr,
):
    """The P programs share the T (output tile, K step) iterations: program p takes [p T / P, (p + 1) T / P).

    Iterations are numbered tile by tile (M tiles fastest, so the M tiles of one weight tile run
    together and share it through L2), K steps within a tile.  A program that covers a tile only
    in part writes an fp32 partial, and the last part of the tile to arrive sums them
    (`_finish_tile`).
    * split-K (P = tiles x split): every range lies inside one tile, the K steps split evenly;
    * STREAM_K (P >= tiles, e.g. a multiple of the SM count): a range spans at most two tiles,
      and every program gets the same work, so no last round of programs runs half empty.
    With PDL (plugins/pdl.py) the next kernel may launch once every program has started, and nothing is read before
    the previous kernel (the X preparation, or whatever wrote X) has completed.
    """
    let_next_kernel_launch(PDL)
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    steps = tl.cdiv(K, BLOCK_K)
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    if STREAM_K:
        start = _range_start(pid, programs, tiles * steps)
        end = _range_start(pid + 1, programs, tiles * steps)
        it = start
        for _ in tl.static_range(2):  # no longer than one tile's steps: one tile boundary at most
            if it < end:
                tile = it // steps
                first = it - tile * steps
                last = tl.minimum(steps, first + end - it)
                _tile(x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr, out_ptr, ws_ptr,
                      lock_ptr, tile, first, last, 2 * pid + (it != start).to(tl.int32), m_tiles, steps, programs,
                      tiles * steps, M, N, K, stride_xm, stride_om, magic, GROUP_SIZE, HAS_PERM, HAS_GIDX, PREPARED_X,
                      BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, PREFETCH)
                it += last - first
    else:  # the same ranges, written per tile (fewer registers than the general form)
        split = programs // tiles
        tile = pid // split
        j = pid - tile * split
        _tile(x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr, out_ptr, ws_ptr, lock_ptr,
              tile, j * steps // split, (j + 1) * steps // split, 2 * pid, m_tiles, steps, programs, tiles * steps,
              M, N, K, stride_xm, stride_om, magic, GROUP_SIZE, HAS_PERM, HAS_GIDX, PREPARED_X,
              BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, PREFETCH)


@triton.jit
def _tile(x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr, out_ptr, ws_ptr, lock_ptr,
          tile, first, last, slot, m_tiles, steps, programs, total, M, N, K, stride_xm, stride_om, magic,
          GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, PREPARED_X: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
          USE_DOT: tl.constexpr, PREFETCH: tl.constexpr):
    """K steps first..last-1 of output tile `tile`: the product, then stored or published as partial `slot`."""
    offs_m = (tile % m_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile // m_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    result = _tile_product(x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr,
                           offs_m, offs_n, first, last, M, N, K, stride_xm, magic,
                           GROUP_SIZE, HAS_PERM, HAS_GIDX, PREPARED_X, BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, PREFETCH)
    _finish_tile(result, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, tile, first, last, steps,
                 slot, programs, total)


@triton.jit
def _range_start(p, programs, total):
    """First iteration of program p: floor(p T / P), in 64 bits (p T exceeds 2^31 on the largest shapes)."""
    return (tl.cast(p, tl.int64) * total // programs).to(tl.int32)


@triton.jit
def _range_owner(it, programs, total):
    """The program whose range holds iteration `it`: the largest p with floor(p T / P) <= it."""
    return ((tl.cast(it + 1, tl.int64) * programs + total - 1) // total - 1).to(tl.int32)


@triton.jit
def _tile_product(x_ptr, xsum_ptr, qweight_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr,
                  offs_m, offs_n, first, last, M, N, K, stride_xm, magic,
                  GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_GIDX: tl.constexpr, PREPARED_X: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  USE_DOT: tl.constexpr, PREFETCH: tl.constexpr):
    """X[offs_m] @ dequant(W)[:, offs_n] over K steps first..last-1, fp32 [BLOCK_M, BLOCK_N].

    Each K step loads a [ROWS, BLOCK_N] int32 tile (ROWS = BLOCK_K / 8).
    * dot path (`_dot_step`): the tile becomes W^T [BLOCK_N, BLOCK_K] in the wgmma operand
      registers (nibble pairs, `_dot_weights`; X prepared in the same K order) and is multiplied
      with X^T by one `tl.dot`; zero point and scale are applied to the fp32 product once per
      step.  Groups that change inside a step take `_dot_step_dequant`.
    * FMA path (small BLOCK_M): nibble plane i (rows 8r + i) multiplies the stride-8 slice of
      each row of X and each thread sums the 8 nibbles of its words; zero and scale come once
      per row.  With PREPARED_X, X was gathered, converted and pre-scaled by `_prep_x_kernel`
      (fp32, zero-padded, row sums in `xsum_ptr`).
    `magic` is passed at run time (2^23's bit pattern for the FMA path's g_idx variant,
    PAIR_MAGIC for the dot path), so ptxas keeps it in a register and fuses mask and OR into
    one LOP3 (two immediates cannot share one).
    """
    ROWS: tl.constexpr = BLOCK_K // 8  # packed int32 rows per K step
    # One group per K step: zero and scale are one [1, BLOCK_N] row for the whole step.
    ONE_GROUP: tl.constexpr = (not HAS_GIDX) and BLOCK_K <= GROUP_SIZE
    offs_r = tl.arange(0, ROWS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if USE_DOT:  # transposed, [N, M]: the weights are the dot's first operand (see _dot_step)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
    # The dot path within groups loads the next step's scales, zeros and X row sums a step ahead: Triton pipelines
    # only the loads that feed the dot, and these would wait on memory every step.
    META_AHEAD: tl.constexpr = USE_DOT and ONE_GROUP
    if META_AHEAD:
        tl.static_assert(PREPARED_X, "the dot path within groups reads X prepared by _prep_x_kernel")
        s_next, z_next, xsum_next = _dot_meta(first, scales_ptr, qzeros_ptr, xsum_ptr, offs_n, mask_n, offs_m,
                                              mask_m, N, stride_xm, GROUP_SIZE, BLOCK_K)

    row_end = tl.minimum(last * ROWS, K // 8)
    if PREFETCH:
        q_next = _load_words(qweight_ptr, first * ROWS + offs_r, offs_n, row_end, mask_n, N)
    for step in range(first, last):
        rows = step * ROWS + offs_r
        mask_r = rows < K // 8
        mask_w = mask_r[:, None] & mask_n[None, :]
        if PREFETCH:  # issue the next step's weight load before this step's arithmetic
            q = q_next
            q_next = _load_words(qweight_ptr, rows + ROWS, offs_n, row_end, mask_n, N)
        else:
            q = _load_words(qweight_ptr, rows, offs_n, row_end, mask_n, N)
        if META_AHEAD:
            s, z, xsum = s_next, z_next, xsum_next
            s_next, z_next, xsum_next = _dot_meta(tl.minimum(step + 1, last - 1), scales_ptr, qzeros_ptr, xsum_ptr,
                                                  offs_n, mask_n, offs_m, mask_m, N, stride_xm, GROUP_SIZE, BLOCK_K)
            acc = _dot_step(acc, q, step, s, z, xsum, magic, x_ptr, offs_m, mask_m, stride_xm, BLOCK_K, BLOCK_N)
        elif USE_DOT:
            acc = _dot_step_dequant(acc, q, step, magic, x_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr, offs_m,
                                    offs_n, mask_m, mask_n, K, N, stride_xm, GROUP_SIZE, HAS_PERM, HAS_GIDX,
                                    BLOCK_K, BLOCK_N)
        else:
            acc = _fma_step(acc, q, rows, mask_r, mask_w, step, x_ptr, xsum_ptr, qzeros_ptr, scales_ptr,
                            gidx_ptr, offs_m, mask_m, offs_n, mask_n, N, stride_xm, magic,
                            GROUP_SIZE, HAS_GIDX, ONE_GROUP, PREPARED_X, BLOCK_K)
    if USE_DOT:
        return tl.trans(acc)
    else:
        return tl.sum(acc, axis=1)


@triton.jit
def _dot_weights(q, magic, dtype: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W^T [BLOCK_N, BLOCK_K] of one K step from its [BLOCK_K / 8, BLOCK_N] words: raw nibbles as tiny floats.

    Column 8r + c holds nibble PAIR_ORDER[c] = c // 2 + 4 (c % 2) of word r: masking a word shifted
    by 4e with 0x000F000F keeps nibbles e and e + 4 in its two 16-bit halves, the pair that a
    tensor-core operand register holds.  Read as fp16, a half is the subnormal nibble * 2^-24; in
    bf16, OR-ing `magic` = 0x00800080 makes it the normal (128 + nibble) * 2^-133 (tensor cores may
    flush bf16 subnormals).  Mask and OR are one LOP3 (`magic` in a register): one shift and one
    LOP3 per two weights.

    Every pair is computed from its word broadcast along the pairs, element by element, so Triton
    can read the words from the pipelined shared-memory tile straight into the wgmma operand
    layout (each thread loads the words of its own pairs).  Expanding a word into its 4 pairs
    inside one thread instead (joins) left the unpacked fp16 tile in the loading thread, and Triton
    moved it to the operand layout through shared memory every step: 4x the weight bytes stored
    and read back, the shared-memory pipe ~84% busy (ncu), 82 instead of 60 µs (gate_up tp2 M=16).
    """
    words = tl.broadcast_to(tl.trans(q)[:, :, None], (BLOCK_N, BLOCK_K // 8, 4))
    words = tl.reshape(words, (BLOCK_N, BLOCK_K // 2))  # pair p of row n: word p // 4 of column n
    e = tl.arange(0, BLOCK_K // 2) % 4
    pairs = ((words >> (4 * e)[None, :]) & 0x000F000F) | magic
    halves = tl.join(pairs.to(tl.int16), (pairs >> 16).to(tl.int16))  # [BLOCK_N, BLOCK_K / 2, 2]
    return tl.reshape(halves, (BLOCK_N, BLOCK_K)).to(dtype, bitcast=True)


@triton.jit
def _dot_meta(step, scales_ptr, qzeros_ptr, xsum_ptr, offs_n, mask_n, offs_m, mask_m, N, stride_xm,
              GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """(scale, zero point) of the step's group for the W^T rows and the prepared X's row sums of the step."""
    s, z = _group_meta(scales_ptr, qzeros_ptr, step * BLOCK_K // GROUP_SIZE, offs_n, mask_n, N)
    xsum = tl.load(xsum_ptr + offs_m * (stride_xm // BLOCK_K) + step, mask=mask_m, other=0.0)
    return s, z, xsum


@triton.jit
def _dot_step(acc, q, step, s, z, xsum, magic, x_ptr, offs_m, mask_m, stride_xm, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """acc + (X[:, k-block] @ dequant(W[k-block]))^T for one K step inside one group, on the tensor cores.

    The dot takes the raw nibbles as tiny floats (see `_dot_weights`) and zero point, offset and
    scale are applied once to the fp32 product, (q X 2^P / XS - (z + OFFSET) sum(X)) s, so no
    per-weight arithmetic follows the LOP3.  X comes prepared (`_prep_x_kernel`: in the tile's K
    order, times XS (2^64 for bf16, else 1), zero-padded along K, `xsum` its row sums over the
    step), and UNDO = 2^P / XS: one contiguous load
    that Triton pipelines with the weights.  The product is computed transposed, W^T X^T: the
    [BLOCK_N, BLOCK_K] weights are the first operand (M side, 64-row wgmma tiles, taken from
    registers) and X^T the narrow second one, so the 16-row padding of X costs no weight traffic.
    """
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    if dtype == tl.float16:  # weights q 2^-24; X as is
        UNDO: tl.constexpr = 2.0**24
        OFFSET: tl.constexpr = 0.0
    else:  # weights (128 + q) 2^-133; X 2^64 (exact) keeps the products normal in fp32
        UNDO: tl.constexpr = 2.0**69
        OFFSET: tl.constexpr = 128.0
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (step * BLOCK_K + tl.arange(0, BLOCK_K))[None, :],
                mask=mask_m[:, None], other=0.0)  # rows past M are not read: the tensor cores pad them with zeros
    part = tl.dot(_dot_weights(q, magic, dtype, BLOCK_K, BLOCK_N), tl.trans(x))
    return acc + (part * UNDO - xsum[None, :] * (z + OFFSET)[:, None]) * s[:, None]


@triton.jit
def _dot_step_dequant(acc, q, step, magic, x_ptr, qzeros_ptr, scales_ptr, perm_ptr, gidx_ptr, offs_m, offs_n,
                      mask_m, mask_n, K, N, stride_xm, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr,
                      HAS_GIDX: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_dot_step` for groups that change inside a step (g_idx, or BLOCK_K > group size), the slow path:
    every weight is dequantized in fp32, (q - z) s, and X is read (and gathered) as it is."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_k = step * BLOCK_K + _pair_order(tl.arange(0, BLOCK_K))  # column c of the tile is row offs_k[c]
    mask_k = offs_k < K
    if HAS_PERM:
        col = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
    else:
        col = offs_k
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
    if HAS_GIDX:
        grp = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)[:, None]
    else:
        grp = (offs_k // GROUP_SIZE)[:, None]
    s, z = _group_meta(scales_ptr, qzeros_ptr, grp, offs_n[None, :], mask_k[:, None] & mask_n[None, :], N)
    q_int = (tl.trans(_dot_weights(q, magic, dtype, BLOCK_K, BLOCK_N)).to(tl.int16, bitcast=True) & 0xF)
    return tl.dot(tl.trans(((q_int.to(tl.float32) - z) * s).to(dtype)), tl.trans(x), acc)


@triton.jit
def _fma_step(acc, q, rows, mask_r, mask_w, step, x_ptr, xsum_ptr, qzeros_ptr, scales_ptr, gidx_ptr,
              offs_m, mask_m, offs_n, mask_n, N, stride_xm, magic, GROUP_SIZE: tl.constexpr,
              HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr, PREPARED_X: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """acc + the products of one K step on the CUDA cores, per [BLOCK_M, ROWS, BLOCK_N] partial.

    Each weight is unpacked once and reused by the BLOCK_M rows of X: one LOP3 and BLOCK_M FFMAs.
    The 2-D tiles (weights, per-row scales and zeros) become 3-D by a reshape and X is loaded
    through 3-D pointers, so no value changes threads: a `[None]` broadcast of the 2-D weight
    tile made Triton move it through shared memory every step (32 barriers per loop, 2x slower).
    """
    q = tl.reshape(q, (1, q.shape[0], q.shape[1]))
    rows3 = rows[None, :, None]
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm + rows3 * 8  # X[:, 8r]; + i is an immediate offset
    mask_x = mask_m[:, None, None] & mask_r[None, :, None]
    if not HAS_GIDX:
        if ONE_GROUP:  # the whole step lies in one group
            s, z = _group_meta(scales_ptr, qzeros_ptr, step * BLOCK_K // GROUP_SIZE,
                               offs_n[None, None, :], mask_n[None, None, :], N)
        else:
            s, z = _group_meta(scales_ptr, qzeros_ptr, (rows * 8 // GROUP_SIZE)[:, None], offs_n[None, :],
                               mask_w, N)
            s, z = tl.reshape(s, q.shape), tl.reshape(z, q.shape)  # like q: no layout change
    q_hi = q >> 16
    part = tl.zeros(acc.shape, dtype=tl.float32)
    xsum = tl.zeros((acc.shape[0], acc.shape[1], 1), dtype=tl.float32)
    for i in tl.static_range(8):  # nibble i of every word: rows 8r + i of the layer
        bits = _nibble_bits(q, q_hi, i)
        if PREPARED_X:  # already X 2^64 / 16^(i % 4) in fp32, zero-padded: no mask
            x = tl.load(x_rows + i)
        else:
            x_raw = tl.load(x_rows + i, mask=mask_x, other=0.0).to(tl.float32)
            xsum += x_raw
            x = x_raw * (2.0**64 / 16.0 ** (i % 4))
        if HAS_GIDX:  # the slow path: a group lookup per nibble
            grp = tl.load(gidx_ptr + rows * 8 + i, mask=mask_r, other=0)[:, None]
            s, z = _group_meta(scales_ptr, qzeros_ptr, grp, offs_n[None, :], mask_w, N)
            s, z = tl.reshape(s, q.shape), tl.reshape(z, q.shape)  # like q: no layout change
            # OR into 2^23's mantissa (one LOP3, `magic` in a register), minus 2^23: 16^e (q - z), exact
            w = (bits | magic).to(tl.float32, bitcast=True) - (z * 16.0 ** (i % 4) + 8388608.0)
            acc += x * (w * (s * X_UNDO))
        else:  # the row's 8 nibbles share zero and scale: both applied once below
            # bits read as fp32 are the subnormal 16^e q 2^-149, exactly; X carries 2^64 / 16^e,
            # so each FFMA adds x q 2^-85, a normal number
            part += x * bits.to(tl.float32, bitcast=True)
    if not HAS_GIDX:
        if PREPARED_X:
            xsum = tl.load(xsum_ptr + offs_m[:, None, None] * (stride_xm // 8) + rows3)
        acc += (part * DENORM_UNDO - xsum * z) * s
    return acc


@triton.jit
def _prep_x_kernel(x_ptr, perm_ptr, xs_ptr, xsum_ptr, M, K, K_PAD, stride_xm, HAS_PERM: tl.constexpr,
                   FOR_DOT: tl.constexpr, SUM_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """X as the GEMM reads it, once per call: gathered (X[:, perm]), reordered, scaled, with row
    sums, zero in the padding (columns k >= K, and rows m >= M where the FMA path reads whole M
    blocks), so that the GEMM loads it without masks along K.

    * FMA path: xs[m, k] = X[m, perm[k]] 2^64 / 16^(k % 4) in fp32 (the scale is a power of two
      built from its bits: exact), and xsum[m, r] = the sum of X[m, perm[8r + i]] over i < 8.
    * dot path (FOR_DOT): xs in X's dtype, column c of each 8-row word holding row PAIR_ORDER[c % 8]
      (the unpacked tile's K order), bf16 scaled by 2^64 (see `_dot_step`); xsum per K step of
      SUM_ROWS words.
    In the GEMM every thread would gather, convert and sum each X value it uses, for only the
    columns it owns, and the dot path again for every N tile: one extra launch does it once.
    """
    wait_for_previous_kernel(PDL)  # X is the previous kernel's output
    m = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.arange(0, 8)
    if FOR_DOT:
        k = r[:, None] * 8 + _pair_order(i)[None, :]
    else:
        k = r[:, None] * 8 + i[None, :]
    mask = (k < K) & (m < M)
    if HAS_PERM:
        col = tl.load(perm_ptr + k, mask=mask, other=0)
    else:
        col = k
    x = tl.load(x_ptr + m * stride_xm + col, mask=mask, other=0.0).to(tl.float32)
    out = r[:, None] * 8 + i[None, :]
    if FOR_DOT:
        if xs_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(xs_ptr + m * K_PAD + out, (x * 2.0**64).to(tl.bfloat16), mask=out < K_PAD)
        else:
            tl.store(xs_ptr + m * K_PAD + out, x.to(xs_ptr.dtype.element_ty), mask=out < K_PAD)
    else:
        scale = ((127 + 64 - 4 * (i % 4)) << 23).to(tl.float32, bitcast=True)  # 2^(64 - 4 (i % 4))
        tl.store(xs_ptr + m * K_PAD + out, x * scale[None, :], mask=out < K_PAD)
    sums = tl.sum(tl.reshape(tl.sum(x, axis=1), (BLOCK_R // SUM_ROWS, SUM_ROWS)), axis=1)
    block = tl.program_id(1) * (BLOCK_R // SUM_ROWS) + tl.arange(0, BLOCK_R // SUM_ROWS)
    tl.store(xsum_ptr + m * (K_PAD // (8 * SUM_ROWS)) + block, sums, mask=block < K_PAD // (8 * SUM_ROWS))


@triton.jit
def _finish_tile(result, out_ptr, ws_ptr, lock_ptr, offs_m, offs_n, M, N, stride_om, tile, first, last, steps,
                 slot, programs, total):
    """Store a whole tile's product; a part of a tile is published as partial number `slot` (2p for program p's
    first range of steps, 2p + 1 for its last), and the last part of the tile to arrive sums them all in program
    order (deterministic rounding), stores, and resets the tile's arrival counter for the next launch."""
    BLOCK_M: tl.constexpr = result.shape[0]
    BLOCK_N: tl.constexpr = result.shape[1]
    mask_o = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs_o = offs_m[:, None] * stride_om + offs_n[None, :]
    if (first == 0) & (last == steps):
        tl.store(out_ptr + offs_o, result.to(out_ptr.dtype.element_ty), mask=mask_o)
    else:
        local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        # partials are whole-width scratch (columns past N hold zeros: their weights and scales load as 0); masking
        # the columns too kept the mask live and cost the 16x64x128 tile 30 registers
        rows_in = (offs_m < M)[:, None]
        tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + local, result, mask=rows_in)
        tl.debug_barrier()  # every thread's partial is written before the counter is bumped
        tile_start = tile * steps
        owner = _range_owner(tile_start, programs, total)
        parts = _range_owner(tile_start + steps - 1, programs, total) - owner + 1
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == parts - 1:
            # the tile is the first range of every program but `owner`, which may have started before it
            owner_slot = 2 * owner + (_range_start(owner, programs, total) < tile_start).to(tl.int32)
            acc = tl.load(ws_ptr + owner_slot * (BLOCK_M * BLOCK_N) + local, mask=rows_in, other=0.0,
                          cache_modifier=".cg")
            for q in range(owner + 1, owner + parts):  # fixed order: deterministic rounding
                acc += tl.load(ws_ptr + 2 * q * (BLOCK_M * BLOCK_N) + local, mask=rows_in, other=0.0,
                               cache_modifier=".cg")
            tl.store(out_ptr + offs_o, acc.to(out_ptr.dtype.element_ty), mask=mask_o)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch, no memset needed


@dataclass(frozen=True)
class Config:
    """Launch parameters of `w4a16_kernel` (what the tuner searches over)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool
    prefetch: bool
    num_warps: int
    num_stages: int
    # FMA path: X prepared by `_prep_x_kernel` even without a permutation (with one it always is); the extra launch
    # pays only where the GEMM is issue-bound enough, which depends on the card and shape: the tuner decides.
    prep_x: bool = False
    # Stream-K: this many programs (at least one per output tile) share all (tile, K step) iterations evenly; 0:
    # `split_k` programs per tile.  A multiple of the SM count gives every SM the same work where tiles x split would
    # leave a last round half empty.
    programs: int = 0
    # Hopper: the dot path as the warp-specialized Gluon kernel (`w4a16_ws.py`, a TMA ring of `num_stages` slots,
    # `split_k` programs per tile, `warpgroups` consumer warpgroups taking alternate K steps); calls it cannot run
    # (`w4a16_ws.supported`) take this tile on the `tl` kernel.
    warp_specialized: bool = False
    warpgroups: int = 1

    def grid(self, m: int, n: int, k: int) -> tuple[int, int]:
        """(programs, output tiles) of a launch on [m, k] x [k, n]: stream-K runs one program per tile at least, and
        no program gets an empty range of K steps (it would still count as a part of its tile)."""
        tiles = triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)
        programs = max(self.programs, tiles) if self.programs else tiles * self.split_k
        return min(programs, tiles * triton.cdiv(k, self.block_k)), tiles

    def dequantizes(self, group_size: int, has_gidx: bool) -> bool:
        """Whether the dot path takes its per-weight dequantizing step: groups change inside a K step."""
        return self.use_dot and (has_gidx or self.block_k > group_size)

    def prepares_x(self, permuted: bool, group_size: int, has_gidx: bool) -> bool:
        """Whether X goes through `_prep_x_kernel` first: on the dot path within groups (the dequantizing step reads
        X as it is), on the FMA path for a permuted input or if the tuner chose so."""
        if self.dequantizes(group_size, has_gidx):
            return False
        return self.use_dot or permuted or self.prep_x


@functools.cache
def gluon_kernel():
    """`plugins.w4a16_ws`, imported on first use (Gluon), or None with a Triton whose Gluon lacks its Hopper API."""
    try:
        return importlib.import_module("plugins.w4a16_ws")
    except ImportError:
        return None


def gluon_kernel_for(x: torch.Tensor, weights: dict[str, torch.Tensor], group_size: int, has_gidx: bool):
    """`gluon_kernel()` where it can run this call (`w4a16_ws.supported`), else None."""
    module = gluon_kernel()
    return module if module is not None and module.supported(x, weights, group_size, has_gidx) else None


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, tiles: int) -> torch.Tensor:
    """Per-device arrival counters, one per output tile; zero between launches because the last part resets them."""
    buf = _LOCKS.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("run the shape once before CUDA-graph capture (it needs more tile counters)")
        buf = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
        _LOCKS[device] = buf
    return buf


def w4a16_matmul(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    group_size: int,
    config: Config,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel on a contiguous [M, K] `x` (any width when `in_perm` gathers K columns from it); returns
    [M, N] in x's dtype (into `out` if given)."""
    qweight = weights["qweight"]
    w4a16_ws = gluon_kernel_for(x, weights, group_size, g_idx is not None) if config.warp_specialized else None
    if config.warp_specialized and w4a16_ws is None:
        config = replace(config, warp_specialized=False)
    if config.dequantizes(group_size, g_idx is not None):  # needs far more registers and shared memory
        config = replace(config, block_n=min(config.block_n, 64), num_stages=1)
    m, k = x.shape[0], qweight.shape[0] * 8  # with in_perm, x may be narrower or wider than the weight's K
    n = qweight.shape[1]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xsum = x  # read only with PREPARED_X
    pdl = pdl_enabled(x.device)
    prepared = config.prepares_x(in_perm is not None, group_size, g_idx is not None)
    if prepared:  # gathered, converted, ordered and summed once, not per thread in the GEMM
        # the FMA path reads whole M blocks unmasked; the dot path masks rows past M (no traffic for them)
        m_pad = m if config.use_dot else triton.cdiv(m, config.block_m) * config.block_m
        k_pad = triton.cdiv(k, config.block_k) * config.block_k
        sum_rows = config.block_k // 8 if config.use_dot else 1
        xs = torch.empty(m_pad, k_pad, dtype=x.dtype if config.use_dot else torch.float32, device=x.device)
        xsum = torch.empty(m_pad, k_pad // (8 * sum_rows), dtype=torch.float32, device=x.device)
        _prep_x_kernel[(m_pad, triton.cdiv(k_pad // 8, PREP_ROWS))](
            x, x if in_perm is None else in_perm, xs, xsum, m, k, k_pad, x.stride(0),
            HAS_PERM=in_perm is not None, FOR_DOT=config.use_dot, SUM_ROWS=sum_rows, BLOCK_R=PREP_ROWS,
            PDL=pdl, launch_pdl=pdl)
        x, in_perm = xs, None
    programs, tiles = config.grid(m, n, k)
    locks = _locks(x.device, tiles)
    if programs != tiles:  # some program covers part of a tile: fp32 partials, two per program at most
        ws = torch.empty(2 * programs * config.block_m * config.block_n, dtype=torch.float32, device=x.device)
    else:  # never touched; typed as the partials are, so the kernel compiles the same (no allocation per call)
        ws = locks.view(torch.float32)
    if config.warp_specialized:
        w4a16_ws.launch(x, xsum, weights, group_size, k, config.split_k, config.num_stages, PAIR_MAGIC[out.dtype], out,
                        ws, locks, config.warpgroups)
        return out
    w4a16_kernel[(programs,)](
        x, xsum, qweight, weights["qzeros"], weights["scales"],
        qweight if in_perm is None else in_perm,
        qweight if g_idx is None else g_idx,
        out, ws, locks,
        m, n, k, x.stride(0), out.stride(0), PAIR_MAGIC[out.dtype] if config.use_dot else MAGIC.value,
        GROUP_SIZE=group_size, HAS_PERM=in_perm is not None, HAS_GIDX=g_idx is not None, PREPARED_X=prepared,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.use_dot, PREFETCH=config.prefetch, STREAM_K=config.programs > 0, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
    return out
