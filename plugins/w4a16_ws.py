"""The tensor-core W4A16 path as a warp-specialized Gluon kernel for Hopper: a TMA ring fed by a producer warp.

Why a second kernel: the `tl.*` kernel (`w4a16.py`) stops at 61-74% of the copy bandwidth on Llama-70B's tp=2 shards,
and with its dequantization removed it is still 10-44% above a kernel that only reads the bytes: what is left is
Triton's pipelined loop (a cp.async group, its wait and a CTA barrier every K step; plugins/NOTES.md "Session 8").
Gluon writes that loop by hand:

* a producer warp (24 registers) streams each K step's weight words [BLOCK_K/8, BLOCK_N], the prepared X tile
  [16, BLOCK_K] (rows past M are zero-filled by TMA), the step's scales and zero points into a ring of STAGES shared-
  memory slots with TMA, one mbarrier per slot for "ready" and one for "empty";
* the consumer warpgroup waits only on its slot's mbarrier (no CTA barrier per step), reads the words straight into
  the wgmma operand layout (each lane quad reads the same word: a broadcast), unpacks them as `_dot_weights` does,
  runs the wgmma (W^T X^T, W^T from registers) and applies zero point and scale once per group on the fp32 product.

The math, the K order of X and the prepared X itself are the `tl` kernel's dot path (`_prep_x_kernel`, PAIR_MAGIC);
only the loop differs.  It wins where each program streams whole K ranges with every program resident at once (3 per
SM): Llama-70B tp=2 gate+up, 224 tiles, 47.9 against 53.9 µs at M=1 on H100 (plugins/NOTES.md "Session 9").  The tuner
times it next to the `tl` candidates and keeps whichever is faster per shape.

Split-K only: the programs of one tile each take an equal K range and the last to finish sums the fp32 partials in
program order (deterministic), as `w4a16._finish_tile` does; stream-K ranges that cross tiles measured slower here.
Where the tiles about match the SMs, a program may instead run two consumer warpgroups on alternate K steps of one
ring (`warpgroups=2`, one program per SM), which streams a whole tile without a split.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_N = 128  # columns per program: one 4-warp wgmma group of 64-row tiles, two deep
BLOCK_K = 128  # K rows per step: one group of 128 rows (group sizes that are multiples of it)
MAXNREG = 80  # registers per thread at launch: 3 programs per SM; the consumer warps then take 136, the producer 24
PER_SM = 3  # programs resident per SM (registers above; shared memory 50 KiB each at 4 stages)
STAGES = 4  # ring slots the tuner uses: 3, 4 and 6 measured within 2-8% of each other, 4 best or level
# Two consumer warpgroups taking alternate K steps from one ring (`warpgroups=2`): one program per SM, so a layer
# whose tiles about match the SMs streams with no split-K (Llama-70B gate+up at tp=4, 112 tiles: 1.5-2.4 µs faster
# at M=1, 0.5-1.2 at M=2..16, on H100, plugins/NOTES.md "Session 12").  Registers at launch for its 9 warps (the
# second warpgroup then takes SHARED_REGS, the first the rest); ring depth, a multiple of 2 (a slot always serves
# the same warpgroup).
SHARED_MAXNREG = 128
SHARED_REGS = gl.constexpr(152)
SHARED_STAGES = 8
ZERO_WORDS = 32  # packed zero points per ring slot: 16 used, the slot padded to 128 bytes (TMA destination alignment)
_cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier  # the name in Triton 3.7 / 3.6


def supported(x: torch.Tensor, weights: dict[str, torch.Tensor], group_size: int, has_gidx: bool) -> bool:
    """Whether this kernel can run the call: a Hopper GPU (wgmma is sm_90a only), groups along K in whole steps,
    whole tiles along N and K, and tensors TMA can address (contiguous, 16-byte aligned)."""
    if x.device.type != "cuda" or not _hopper(x.device.index) or has_gidx:
        return False
    k, n = weights["qweight"].shape[0] * 8, weights["qweight"].shape[1]
    if group_size % BLOCK_K or k % BLOCK_K or n % BLOCK_N:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in weights.values())


@functools.cache
def _hopper(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@gluon.constexpr_function
def _mma_layout(num_warps):
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 16, 16])


@gluon.constexpr_function
def _pair_layout(BN, BK, num_warps):
    """[BN, BK/8, 4] (column n, word w, pair e) laid out as the wgmma A operand W^T [BN, BK] with k = 8w + 2e + h,
    less its first register bit h (the two halves of a pair, added back by the join in `_weights`).  From the operand
    layout's linear bases (fp16, k_width 2): registers k1 (h), n8, k8.., n64..; lanes k2 k4 (e) n1 n2 n4; warps n16.."""
    regs = [[8, 0, 0]] + [[0, w, 0] for w in _powers(1, BK // 8)] + [[n, 0, 0] for n in _powers(16 * num_warps, BN)]
    lanes = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warps = [[n, 0, 0] for n in _powers(16, 16 * num_warps)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                      shape=[BN, BK // 8, 4])


@gluon.constexpr_function
def _word_layout(BN, BK, num_warps):
    """The [BK/8, BN] word tile as shared memory holds it, laid out so that its transpose is the slice of
    `_pair_layout` along the pairs: the four lanes of a quad hold the same words."""
    pairs = _pair_layout(BN, BK, num_warps)

    def swap(bases):
        return [[b[1], b[0]] for b in bases]

    return gl.DistributedLinearLayout(reg_bases=swap(pairs.reg_bases), lane_bases=swap(pairs.lane_bases),
                                      warp_bases=swap(pairs.warp_bases), block_bases=[], shape=[BK // 8, BN])


@gluon.constexpr_function
def _zero_layout(BN, num_warps):
    """[BN/8, 8] (word a, nibble b; column n = 8a + b) spread as the accumulator's columns are."""
    regs = [[1, 0]] + [[a, 0] for a in _powers(2 * num_warps, BN // 8)]
    lanes = [[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]]
    warps = [[a, 0] for a in _powers(2, 2 * num_warps)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warps, block_bases=[],
                                      shape=[BN // 8, 8])


@gluon.constexpr_function
def _powers(start: int, stop: int) -> list[int]:
    """start, 2 start, 4 start, ... below stop."""
    out = []
    while start < stop:
        out.append(start)
        start *= 2
    return out


@gluon.jit
def _produce(w_desc, x_desc, s_desc, z_desc, w_smem, x_smem, s_smem, z_smem, ready, empty, m0, n0, first, last, N,
             GROUP_SIZE: gl.constexpr):
    """Producer warp: K steps first..last-1 into the ring, each slot refilled once the consumer has handed it back."""
    BK: gl.constexpr = x_desc.block_type.shape[1]
    STAGES: gl.constexpr = w_smem.type.shape[0]
    nbytes: gl.constexpr = (w_desc.block_type.nbytes + x_desc.block_type.nbytes + s_desc.block_type.nbytes
                            + z_desc.block_type.nbytes)
    for step in range(first, last):
        i = step - first
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # a fresh mbarrier counts as phase 1 complete
        bar = ready.index(slot)
        mbarrier.expect(bar, nbytes)
        meta = (step * BK // GROUP_SIZE) * N + n0  # the step's group row of scales (flattened)
        tma.async_copy_global_to_shared(w_desc, [step * (BK // 8), n0], bar, w_smem.index(slot))
        tma.async_copy_global_to_shared(x_desc, [m0, step * BK], bar, x_smem.index(slot))
        tma.async_copy_global_to_shared(s_desc, [meta], bar, s_smem.index(slot))
        tma.async_copy_global_to_shared(z_desc, [meta // 8], bar, z_smem.index(slot))


@gluon.jit
def _weights(tile, magic, dtype: gl.constexpr, num_warps: gl.constexpr):
    """W^T [BN, BK] in the wgmma A-operand registers from a [BK/8, BN] word tile in shared memory: raw nibbles as
    tiny floats, pair e of each word masked into its two halves (see `w4a16._dot_weights`)."""
    BK: gl.constexpr = tile.type.shape[0] * 8
    BN: gl.constexpr = tile.type.shape[1]
    pairs_layout: gl.constexpr = _pair_layout(BN, BK, num_warps)
    # Loaded untransposed and transposed in registers: a load through a permuted view of the tile read the wrong
    # words in Triton 3.6.
    words = gl.permute(tile.load(_word_layout(BN, BK, num_warps)), (1, 0))
    words = gl.convert_layout(words, gl.SliceLayout(2, pairs_layout), assert_trivial=True)
    e = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, pairs_layout)))
    pairs = ((gl.expand_dims(words, 2) >> (4 * gl.expand_dims(gl.expand_dims(e, 0), 0))) & 0x000F000F) | magic
    halves = gl.join(pairs.to(gl.int16), (pairs >> 16).to(gl.int16))  # [BN, BK/8, 4, 2]
    w = gl.reshape(halves, [BN, BK]).to(dtype, bitcast=True)
    operand: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=_mma_layout(num_warps), k_width=2)
    return gl.convert_layout(w, operand, assert_trivial=True)  # the layouts above make this free


@gluon.jit
def _zero_points(tile, num_warps: gl.constexpr):
    """Zero point of every accumulator column n from the slot's packed words, as fp32."""
    BN: gl.constexpr = tile.type.shape[0] * 8
    layout: gl.constexpr = _zero_layout(BN, num_warps)
    words = tile.load(gl.SliceLayout(1, layout))
    b = gl.arange(0, 8, layout=gl.SliceLayout(0, layout))
    z = gl.reshape((gl.expand_dims(words, 1) >> (4 * gl.expand_dims(b, 0))) & 0xF, [BN])
    return gl.convert_layout(z, gl.SliceLayout(1, _mma_layout(num_warps))).to(gl.float32)


@gluon.jit
def _consume(w_smem, x_smem, s_smem, z_smem, ready, empty, xsum_ptr, offs_m, mask_m, first, last, xsum_stride, magic,
             C: gl.constexpr, WARPGROUPS: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warpgroup C of WARPGROUPS: acc^T [BN, 16] over K steps first + C, first + C + WARPGROUPS, ... below
    last, (q X 2^P / XS - (z + OFFSET) sum(X)) s per step as in `w4a16._dot_step`."""
    BN: gl.constexpr = w_smem.type.shape[2]
    STAGES: gl.constexpr = w_smem.type.shape[0]
    dtype: gl.constexpr = x_smem.dtype
    mma: gl.constexpr = _mma_layout(num_warps)
    if dtype == gl.float16:  # weights q 2^-24; X as is
        UNDO: gl.constexpr = 2.0**24
        OFFSET: gl.constexpr = 0.0
    else:  # weights (128 + q) 2^-133; X 2^64
        UNDO: gl.constexpr = 2.0**69
        OFFSET: gl.constexpr = 128.0
    zero = gl.zeros([BN, 16], gl.float32, mma)
    acc = gl.zeros([BN, 16], gl.float32, mma)
    for step in range(first + C, last, WARPGROUPS):
        i = step - first
        slot = i % STAGES
        xsum = gl.load(xsum_ptr + offs_m * xsum_stride + step, mask=mask_m, other=0.0)
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        w = _weights(w_smem.index(slot), magic, dtype, num_warps)
        s = s_smem.index(slot).load(gl.SliceLayout(1, mma)).to(gl.float32)
        z = _zero_points(z_smem.index(slot).slice(0, BN // 8), num_warps)
        part = warpgroup_mma(w, x_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
        fence_async_shared()  # the slot's reads are ordered before the producer's next TMA write into it
        mbarrier.arrive(empty.index(slot), count=1)
        acc += (part * UNDO - gl.expand_dims(xsum, 0) * gl.expand_dims(z + OFFSET, 1)) * gl.expand_dims(s, 1)
    return acc


@gluon.jit
def _consume_and_hand_over(w_smem, x_smem, s_smem, z_smem, ready, empty, shared, done, xsum_ptr, m0, first, last, M,
                           xsum_stride, magic):
    """The second consumer warpgroup: every other K step, its sum handed to the first through shared memory."""
    num_warps: gl.constexpr = 4
    mma: gl.constexpr = _mma_layout(num_warps)
    offs_m = m0 + gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    acc = _consume(w_smem, x_smem, s_smem, z_smem, ready, empty, xsum_ptr, offs_m, offs_m < M, first, last,
                   xsum_stride, magic, 1, 2, num_warps)
    shared.store(acc)
    _cta_barrier()  # the warpgroup's stores are written before one of its threads arrives
    mbarrier.arrive(done, count=1)


@gluon.jit
def _consume_and_store(w_smem, x_smem, s_smem, z_smem, ready, empty, shared, done, xsum_ptr, out_ptr, ws_ptr,
                       lock_ptr, tile, m0, n0, first, last, SPLIT: gl.constexpr, M, N, stride_om, xsum_stride, magic,
                       WARPGROUPS: gl.constexpr, num_warps: gl.constexpr):
    """The first consumer warpgroup: its K steps (with WARPGROUPS = 2 every other one, plus the second warpgroup's
    sum), then the tile stored, or published as this program's partial (the last of the tile's SPLIT programs to
    arrive sums them in program order and resets the counter; SPLIT is a compile-time constant so that it issues all
    SPLIT loads at once: 0.3-1.7 µs faster than a loop over a run-time count, plugins/NOTES.md "Session 9")."""
    BN: gl.constexpr = w_smem.type.shape[2]
    mma: gl.constexpr = _mma_layout(num_warps)
    offs_m = m0 + gl.arange(0, 16, layout=gl.SliceLayout(0, mma))
    offs_n = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    acc = _consume(w_smem, x_smem, s_smem, z_smem, ready, empty, xsum_ptr, offs_m, offs_m < M, first, last,
                   xsum_stride, magic, 0, WARPGROUPS, num_warps)
    if WARPGROUPS == 2:
        mbarrier.wait(done, 0)
        acc += shared.load(mma)
    rows_in = gl.expand_dims(offs_m < M, 0)
    offs_o = gl.expand_dims(offs_n, 1) + gl.expand_dims(offs_m, 0) * stride_om
    if SPLIT == 1:
        gl.store(out_ptr + offs_o, acc.to(out_ptr.dtype.element_ty), mask=rows_in)
    else:
        local = gl.expand_dims(offs_n - n0, 1) * 16 + gl.expand_dims(offs_m - m0, 0)
        gl.store(ws_ptr + gl.program_id(0) * (BN * 16) + local, acc, mask=rows_in)
        _cta_barrier()  # every thread's partial is written before the counter is bumped
        arrived = gl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            total = gl.zeros([BN, 16], gl.float32, mma)
            for j in gl.static_range(SPLIT):  # fixed order: deterministic rounding
                total += gl.load(ws_ptr + (tile * SPLIT + j) * (BN * 16) + local, mask=rows_in, other=0.0,
                                 cache_modifier=".cg")
            gl.store(out_ptr + offs_o, total.to(out_ptr.dtype.element_ty), mask=rows_in)
            gl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch, no memset needed


@gluon.jit
def w4a16_ws_kernel(w_desc, x_desc, s_desc, z_desc, xsum_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, stride_om,
                    xsum_stride, magic, GROUP_SIZE: gl.constexpr, STAGES: gl.constexpr, SPLIT: gl.constexpr,
                    WARPGROUPS: gl.constexpr, num_warps: gl.constexpr):
    """Program p: output tile p // SPLIT (16-row M tiles fastest, so a weight tile's M tiles share it through L2),
    K range p % SPLIT of SPLIT equal ones, consumed by WARPGROUPS (1 or 2) warpgroups."""
    BN: gl.constexpr = w_desc.block_type.shape[1]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    s_smem = gl.allocate_shared_memory(s_desc.dtype, [STAGES] + s_desc.block_type.shape, s_desc.layout)
    z_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES] + z_desc.block_type.shape, z_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    SHARED_ROWS: gl.constexpr = BN if WARPGROUPS == 2 else 1  # the second warpgroup's sum (none with one)
    shared = gl.allocate_shared_memory(gl.float32, [SHARED_ROWS, 16], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    if WARPGROUPS == 2:
        mbarrier.init(done, count=1)
    m_tiles = gl.cdiv(M, 16)
    steps = K // BK
    tile = gl.program_id(0) // SPLIT
    j = gl.program_id(0) % SPLIT
    first = j * steps // SPLIT
    last = (j + 1) * steps // SPLIT
    m0 = (tile % m_tiles) * 16
    n0 = (tile // m_tiles) * BN
    if WARPGROUPS == 1:
        gl.warp_specialize([
            (_consume_and_store, (w_smem, x_smem, s_smem, z_smem, ready, empty, shared, done, xsum_ptr, out_ptr, ws_ptr,
                                  lock_ptr, tile, m0, n0, first, last, SPLIT, M, N, stride_om, xsum_stride, magic, 1,
                                  num_warps)),
            (_produce, (w_desc, x_desc, s_desc, z_desc, w_smem, x_smem, s_smem, z_smem, ready, empty, m0, n0, first,
                        last, N, GROUP_SIZE)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_consume_and_store, (w_smem, x_smem, s_smem, z_smem, ready, empty, shared, done, xsum_ptr, out_ptr, ws_ptr,
                                  lock_ptr, tile, m0, n0, first, last, SPLIT, M, N, stride_om, xsum_stride, magic, 2,
                                  num_warps)),
            (_consume_and_hand_over, (w_smem, x_smem, s_smem, z_smem, ready, empty, shared, done, xsum_ptr, m0, first,
                                      last, M, xsum_stride, magic)),
            (_produce, (w_desc, x_desc, s_desc, z_desc, w_smem, x_smem, s_smem, z_smem, ready, empty, m0, n0, first,
                        last, N, GROUP_SIZE)),
        ], [4, 1], [SHARED_REGS, 24])


def descriptors(xs: torch.Tensor, weights: dict[str, torch.Tensor]) -> tuple[TensorDescriptor, ...]:
    """TMA descriptors of one call: weight words [BLOCK_K/8, BLOCK_N] and X [16, BLOCK_K] boxes, scales and zero
    points as flat rows (a step's group row of a tile is contiguous)."""
    dtype = gl.float16 if xs.dtype == torch.float16 else gl.bfloat16
    return (
        TensorDescriptor.from_tensor(weights["qweight"], [BLOCK_K // 8, BLOCK_N], gl.NVMMASharedLayout(0, 32, 2)),
        TensorDescriptor.from_tensor(xs, [16, BLOCK_K], gl.NVMMASharedLayout.get_default_for([16, BLOCK_K], dtype)),
        TensorDescriptor.from_tensor(weights["scales"].view(-1), [BLOCK_N], gl.NVMMASharedLayout(0, 16, 1)),
        TensorDescriptor.from_tensor(weights["qzeros"].view(-1), [ZERO_WORDS], gl.NVMMASharedLayout(0, 32, 1)),
    )


def launch(xs: torch.Tensor, xsum: torch.Tensor, weights: dict[str, torch.Tensor], group_size: int, k: int,
           split: int, stages: int, magic: int, out: torch.Tensor, ws: torch.Tensor, locks: torch.Tensor,
           warpgroups: int = 1) -> None:
    """Y = X @ dequant(W) from X prepared by `w4a16._prep_x_kernel` for the dot path (`xs` [M, K_pad] in the pair
    order, `xsum` its row sums per BLOCK_K step); `ws` holds split x tiles fp32 partials when split > 1."""
    if warpgroups not in (1, 2) or stages % warpgroups:
        raise ValueError(f"warpgroups must be 1 or 2 and divide the ring's {stages} slots, got {warpgroups}")
    m, n = out.shape
    programs = triton.cdiv(m, 16) * (n // BLOCK_N) * split
    w4a16_ws_kernel[(programs,)](
        *descriptors(xs, weights), xsum, out, ws, locks, m, n, k, out.stride(0), xsum.stride(0), magic,
        GROUP_SIZE=group_size, STAGES=stages, SPLIT=split, WARPGROUPS=warpgroups, num_warps=4,
        maxnreg=MAXNREG if warpgroups == 1 else SHARED_MAXNREG,
    )
