"""A one-shot all-reduce for the small tensors of decode (the MLP's and attention's [M, hidden] outputs).

At M = 1..16 the tensor is 16-256 KiB and NCCL's all-reduce costs ~10 µs inside a CUDA graph on 2 x H100 (its
protocol, not the bytes).  Here every rank writes its part straight into a buffer of every peer (PyTorch symmetric
memory: NVLink peer-to-peer, no multicast), then sums the parts the peers wrote into its own buffer, in rank order
(fp32, so every rank holds the same bits): one kernel, no host synchronisation, capturable in a CUDA graph.

No flags and no fences: a buffer element holds EMPTY (all bits set, a NaN) until a peer's value lands there, and the
reader polls each element until it is not EMPTY, so the only cross-GPU latency is one posted NVLink store (an earlier
version stored locally, raised a flag per peer behind a system-scope fence and read the parts back over NVLink: two
round trips more).  A value whose bits are EMPTY is sent as another NaN.  Each element is written by one store and
read whole, so it is seen either EMPTY or complete.  The reader sets each element back to EMPTY once read.

Calls alternate between two slots of the buffer (each program keeps its parity in local memory), because a peer may
start its next call, and write, before this rank has read and emptied the current one; it cannot get two calls ahead,
since its next-but-one call needs this rank's part of the next, which this rank sends only after it finished this
call (kernels on a stream run in order; with dependent launch each waits for its predecessor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.pdl import enabled as pdl_enabled
from plugins.pdl import wait_for_previous_kernel

BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 16-byte loads for fp16/bf16
MAX_PROGRAMS = 256  # parities kept per rank; larger tensors are refused (the caller uses NCCL for them)
MAX_NUMEL = BLOCK * MAX_PROGRAMS  # 512 Ki elements: 1 MiB in fp16, well past where one-shot stops paying
EMPTY = -1  # the bits of an element no peer has written (all ones, in 16 or 32 bits alike: a NaN)
SENT_FOR_EMPTY = -2  # what a value whose bits are EMPTY travels as (a NaN too)
_BITS = {2: torch.int16, 4: torch.int32}  # element size -> the integer view of its bits


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, buf_ptrs, parity_ptr, n, rank, WORLD: tl.constexpr, MAX_NUMEL: tl.constexpr,
                     BLOCK: tl.constexpr, EMPTY: tl.constexpr, SENT_FOR_EMPTY: tl.constexpr, PDL: tl.constexpr):
    """out = the sum over ranks of x, chunk `program_id` of it (launched while the GEMM that writes x finishes).  x and
    out are integer views of the values' bits; the buffers hold [2 slots][WORLD parts][MAX_NUMEL] of them."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = x_ptr.dtype.element_ty
    slot = 1 - tl.load(parity_ptr + pid)  # the same on every rank: every rank makes the same calls
    mine = tl.load(x_ptr + offs, mask=mask)
    sent = tl.where(mine == EMPTY, SENT_FOR_EMPTY, mine).to(bits)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(buf_ptrs + peer).to(tl.pointer_type(bits))
            tl.store(theirs + (slot * WORLD + rank) * MAX_NUMEL + offs, sent, mask=mask)
    own = tl.load(buf_ptrs + rank).to(tl.pointer_type(bits))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in tl.static_range(WORLD):  # rank order on every rank: the same bits everywhere
        if r == rank:
            part = mine
        else:
            at = own + (slot * WORLD + r) * MAX_NUMEL + offs
            part = tl.load(at, mask=mask, other=0, volatile=True)
            while tl.max((part == EMPTY).to(tl.int32), axis=0) > 0:  # peer r's values have not all landed yet
                part = tl.load(at, mask=mask, other=0, volatile=True)
            tl.store(at, tl.full((BLOCK,), EMPTY, bits), mask=mask)  # empty for the call after next
        acc += part.to(out_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(parity_ptr + pid, slot)


def fits(t: torch.Tensor) -> bool:
    """Whether `t` has at most MAX_NUMEL elements of 2 or 4 bytes (larger tensors are NCCL's job)."""
    return t.numel() <= MAX_NUMEL and t.element_size() in _BITS


def refuse_unless_it_fits(t: torch.Tensor) -> None:
    """ValueError naming what `t` is, unless it `fits`."""
    if not fits(t):
        raise ValueError(f"one-shot all-reduce takes at most {MAX_NUMEL} elements of 2 or 4 bytes, got {t.numel()} "
                         f"of {t.dtype}")


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, buf_ptrs: torch.Tensor, parities: torch.Tensor, rank: int,
                        world: int) -> torch.Tensor:
    """Launch the kernel.  `buf_ptrs`: every rank's buffer address (int64, on x's device), a buffer holding
    2 x world x MAX_NUMEL elements of 4 bytes, all bits set before the first call; `parities`: this rank's
    MAX_PROGRAMS int32 slot parities, zero before the first call.  Every rank makes the same calls."""
    n = x.numel()
    refuse_unless_it_fits(x)
    pdl = pdl_enabled(x.device)
    _one_shot_kernel[(triton.cdiv(n, BLOCK),)](
        x.view(_BITS[x.element_size()]), out, buf_ptrs, parities, n, rank, WORLD=world, MAX_NUMEL=MAX_NUMEL,
        BLOCK=BLOCK, EMPTY=EMPTY, SENT_FOR_EMPTY=SENT_FOR_EMPTY, PDL=pdl, num_warps=8, launch_pdl=pdl)
    return out


class PeerAllReduce:
    """`all_reduce(t)` over a process group whose GPUs map each other's memory (one node, NVLink), for tensors of at
    most MAX_NUMEL elements of 2 or 4 bytes; returns a new tensor.  The symmetric buffer is made at the first call,
    which is collective (every rank makes the same calls in the same order) and must come before any CUDA-graph
    capture."""

    def __init__(self, group: torch.distributed.ProcessGroup | None = None):
        import torch.distributed as dist

        self._group = group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(self._group), dist.get_world_size(self._group)
        self._buffer: torch.Tensor | None = None  # this rank's symmetric buffer: its memory outlives the pointers

    def _make_buffer(self, device: torch.device) -> None:
        """This rank's buffer, all bits set, and every rank's address of it.  Collective."""
        import torch.distributed._symmetric_memory as symm_mem

        self._buffer = symm_mem.empty(2 * self.world * MAX_NUMEL, dtype=torch.int32, device=device).fill_(EMPTY)
        torch.cuda.synchronize(device)  # emptied before any peer can write to it
        handle = symm_mem.rendezvous(self._buffer, self._group.group_name)
        self._buf_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self._parities = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=device)

    takes = staticmethod(fits)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        refuse_unless_it_fits(t)
        t = t.contiguous()
        if self._buffer is None:
            self._make_buffer(t.device)
        return one_shot_all_reduce(t, torch.empty_like(t), self._buf_ptrs, self._parities, self.rank, self.world)
