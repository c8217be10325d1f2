"""A one-shot all-reduce for the small tensors of decode (the MLP's and attention's [M, hidden] outputs).

At M = 1..16 the tensor is 16-256 KiB and NCCL's all-reduce costs ~12 µs inside a CUDA graph on 2 x H100 (its
protocol, not the bytes).  Here every rank copies its part into a buffer that every peer has mapped (PyTorch symmetric
memory: NVLink peer-to-peer, no multicast), tells each peer that the chunk is there, waits for the peers to say the
same, reads all parts over NVLink and sums them in rank order (fp32, so every rank holds the same bits): one kernel,
no host synchronisation, capturable in a CUDA graph.

Signalling costs one one-way NVLink store per peer.  Program p keeps a call count (its epoch, modulo EPOCHS) in
local memory; it sets its flag on each peer to the epoch (release, system scope) and waits until each peer's flag here
shows the epoch (acquire), so flags never need a reset.  Calls alternate between the two halves of the buffer by the
epoch's parity, which removes the second barrier a single buffer would need (no rank may overwrite its part before
every peer has read it): a rank writes half e % 2 in call e only after its call e - 1 saw every peer's flag e - 1,
which the peer set after its call e - 2, the last reader of that half, had finished.  For the same reason a peer is at
most one call ahead, so a flag holds e - 1, e or e + 1 while a rank waits for e: the wait accepts e and e + 1 only,
which stays right when the count wraps (a serving process makes billions of calls).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plugins.pdl import enabled as pdl_enabled
from plugins.pdl import wait_for_previous_kernel

BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 16-byte loads for fp16/bf16
MAX_PROGRAMS = 256  # epochs and flags per peer; larger tensors are refused (the caller uses NCCL for them)
MAX_NUMEL = BLOCK * MAX_PROGRAMS  # 512 Ki elements: 1 MiB in fp16, well past where one-shot stops paying
EPOCHS = 1 << 30  # call counts wrap here (even, so the buffer halves keep alternating across the wrap)


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, buf_ptrs, flag_ptrs, epoch_ptr, n, rank, WORLD: tl.constexpr,
                     BLOCK: tl.constexpr, EPOCHS: tl.constexpr, PDL: tl.constexpr):
    """out = the sum over ranks of x, chunk `program_id` of it (launched while the GEMM that writes x finishes)."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dtype = x_ptr.dtype.element_ty
    epoch = (tl.load(epoch_ptr + pid) + 1) % EPOCHS  # this program's call count: the same on every rank
    half = (epoch % 2) * n
    mine = tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype)) + half
    tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    tl.debug_barrier()  # every thread's part is stored before the flags go up
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(theirs + pid * WORLD + rank, epoch, sem="release", scope="sys")
    own = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int32))
    ahead = (epoch + 1) % EPOCHS  # the peer may already be in its next call
    for peer in tl.static_range(WORLD):
        if peer != rank:
            seen = tl.atomic_add(own + pid * WORLD + peer, 0, sem="acquire", scope="sys")
            while (seen != epoch) & (seen != ahead):
                seen = tl.atomic_add(own + pid * WORLD + peer, 0, sem="acquire", scope="sys")
    tl.debug_barrier()  # no thread reads a peer's part before its flag was seen
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in tl.static_range(WORLD):  # rank order on every rank: the same bits everywhere
        part = tl.load(buf_ptrs + r).to(tl.pointer_type(dtype)) + half
        acc += tl.load(part + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
    tl.store(out_ptr + offs, acc.to(dtype), mask=mask)
    tl.store(epoch_ptr + pid, epoch)


def one_shot_all_reduce(x: torch.Tensor, out: torch.Tensor, buf_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                        epochs: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Launch the kernel.  `buf_ptrs` / `flag_ptrs`: every rank's buffer / flags address (int64, on x's device); a
    buffer holds 2 x numel elements of x's dtype, the flags MAX_PROGRAMS x world int32; `epochs`: this rank's
    MAX_PROGRAMS int32 call counts.  Flags and epochs start at zero, and every rank makes the same calls."""
    n = x.numel()
    if n > MAX_NUMEL:
        raise ValueError(f"one-shot all-reduce takes at most {MAX_NUMEL} elements, got {n}")
    pdl = pdl_enabled(x.device)
    _one_shot_kernel[(triton.cdiv(n, BLOCK),)](x, out, buf_ptrs, flag_ptrs, epochs, n, rank, WORLD=world,
                                              BLOCK=BLOCK, EPOCHS=EPOCHS, PDL=pdl, num_warps=8, launch_pdl=pdl)
    return out


class PeerAllReduce:
    """`all_reduce(t)` over a process group whose GPUs map each other's memory (one node, NVLink), for tensors of at
    most MAX_NUMEL elements of 2 or 4 bytes; returns a new tensor.  The symmetric buffers are made at the first call,
    which is collective (every rank makes the same calls in the same order) and must come before any CUDA-graph
    capture."""

    def __init__(self, group: torch.distributed.ProcessGroup | None = None):
        import torch.distributed as dist

        self._group = group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(self._group), dist.get_world_size(self._group)
        # symmetric tensors with every rank's address of them, kept together so the memory outlives its pointers
        self._symmetric_memory: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _symmetric(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed symmetric tensor; returns every rank's address of it (int64 on `device`).  Collective."""
        import torch.distributed._symmetric_memory as symm_mem

        t = symm_mem.empty(numel, dtype=dtype, device=device).zero_()
        torch.cuda.synchronize(device)  # zero before any peer can write to it
        handle = symm_mem.rendezvous(t, self._group.group_name)
        self._symmetric_memory.append((t, torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)))
        return self._symmetric_memory[-1][1]

    @staticmethod
    def takes(t: torch.Tensor) -> bool:
        """Whether `t` fits: at most MAX_NUMEL elements of 2 or 4 bytes (larger tensors are NCCL's job)."""
        return t.numel() <= MAX_NUMEL and t.element_size() in (2, 4)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if not self.takes(t):
            raise ValueError(f"one-shot all-reduce takes at most {MAX_NUMEL} elements of 2 or 4 bytes, got "
                             f"{t.numel()} of {t.dtype}")
        t = t.contiguous()
        if not self._symmetric_memory:
            self._buf_ptrs = self._symmetric(2 * MAX_NUMEL, torch.int32, t.device)  # two halves of up to 4 bytes each
            self._flag_ptrs = self._symmetric(MAX_PROGRAMS * self.world, torch.int32, t.device)
            self._epochs = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=t.device)
        return one_shot_all_reduce(t, torch.empty_like(t), self._buf_ptrs, self._flag_ptrs, self._epochs, self.rank,
                                   self.world)
