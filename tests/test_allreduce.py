"""The one-shot all-reduce kernel (plugins/allreduce.py).

One rank runs alone (on the CPU in Triton's interpreter, or on one GPU) against buffers laid out as its peers would
have left them: every peer's parts of two calls already in this rank's buffer, in the slot of each call's parity, so
its polls pass at once.  Checked over the two calls: the sums, its own part written into every peer's buffer in the
call's slot (and nowhere else), the parts it read set back to EMPTY, its parities.  A regression in the slot
arithmetic can make the rank poll forever instead of failing.  With two GPUs, real processes run it over NVLink: back
to back with one rank stalled now and then, and replayed in a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plugins.allreduce import BLOCK, EMPTY, MAX_NUMEL, MAX_PROGRAMS, SENT_FOR_EMPTY, PeerAllReduce, one_shot_all_reduce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("world,rank,n", [(2, 0, 3 * BLOCK + 5), (4, 2, BLOCK - 1), (2, 1, BLOCK + 1)])
def test_one_rank_sums_the_peers_parts_sends_its_own_and_empties_the_slot(world, rank, n):
    dtype = torch.float16  # bf16 runs on the GPUs only: the interpreter truncates fp32 -> bf16 instead of rounding
    gen = torch.Generator().manual_seed(world * 10 + rank)
    calls = [[(torch.randn(n, generator=gen) * 100).to(DEVICE, dtype) for _ in range(world)] for _ in range(2)]
    calls[0][rank][3] = torch.tensor(EMPTY, dtype=torch.int16).view(dtype)  # a NaN with EMPTY's bits must still travel
    slots = [1, 0]  # parities start at zero: the first call takes slot 1
    buffers = [torch.full((2 * world * MAX_NUMEL,), EMPTY, dtype=torch.int32, device=DEVICE) for _ in range(world)]

    def region(owner: int, slot: int, part: int) -> torch.Tensor:
        return buffers[owner].view(torch.int16)[(slot * world + part) * MAX_NUMEL:][:n]

    for slot, parts in zip(slots, calls):  # what the peers wrote here
        for r in range(world):
            if r != rank:
                region(rank, slot, r).copy_(parts[r].view(torch.int16))
    parities = torch.zeros(MAX_PROGRAMS, dtype=torch.int32, device=DEVICE)
    buf_ptrs = torch.tensor([b.data_ptr() for b in buffers], device=DEVICE)
    programs = -(-n // BLOCK)

    for slot, parts in zip(slots, calls):
        out = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)
        one_shot_all_reduce(parts[rank], out, buf_ptrs, parities, rank, world)

        torch.testing.assert_close(out, sum(p.float() for p in parts).to(dtype), rtol=0, atol=0, equal_nan=True)
        sent = parts[rank].view(torch.int16).clone()
        sent[sent == EMPTY] = SENT_FOR_EMPTY
        for peer in range(world):
            if peer != rank:
                assert torch.equal(region(peer, slot, rank), sent), f"slot {slot}: own part on peer {peer}"
                assert region(peer, 1 - slot, rank).eq(EMPTY).all() or slot == 0, "written to the other slot"
                assert region(rank, slot, peer).eq(EMPTY).all(), f"slot {slot}: peer {peer}'s part not emptied"
        assert parities[:programs].eq(slot).all() and parities[programs:].eq(0).all()
    assert region(rank, slots[0], rank).eq(EMPTY).all(), "no rank writes its own part into its own buffer"
    assert buffers[rank].view(torch.int16)[n:MAX_NUMEL].eq(EMPTY).all(), "nothing written past the tensor"


@pytest.mark.parametrize("numel,dtype", [(MAX_NUMEL + 1, torch.float16), (8, torch.float64)])
def test_what_does_not_fit_is_refused(numel, dtype):
    x = torch.zeros(numel, dtype=dtype)
    none = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="at most"):
        one_shot_all_reduce(x, x, none, torch.zeros(MAX_PROGRAMS, dtype=torch.int32), 0, 2)


class _FakePeer:
    """Stands in for PeerAllReduce: records what it was asked to reduce."""

    def __init__(self, group=None):
        self.calls: list[torch.Tensor] = []

    takes = staticmethod(PeerAllReduce.takes)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t)
        return t


@pytest.mark.parametrize("setting,maps,numel,dtype,expected", [
    ("peer", True, 16 * 8192, torch.float16, "peer"),
    ("peer", True, MAX_NUMEL + 1, torch.float16, "nccl"),  # a prompt's tensor: NCCL's job
    ("peer", True, 8192, torch.float64, "nccl"),
    ("peer", False, 8192, torch.float16, "nccl"),  # some GPU pair cannot map the other's memory
    ("nccl", True, 8192, torch.float16, "nccl"),  # TPAWARE_ALL_REDUCE=nccl
])
def test_runtime_takes_the_one_shot_kernel_only_where_it_fits(monkeypatch, tmp_path, setting, maps, numel, dtype,
                                                             expected):
    import plugins.allreduce
    from pipeline.runtime.comm import DistComm

    monkeypatch.setenv("TPAWARE_ALL_REDUCE", setting)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: maps)
    monkeypatch.setattr(plugins.allreduce, "PeerAllReduce", _FakePeer)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        comm = DistComm()
        comm.world_size = 2  # as if a second rank existed: only the choice is checked, nothing is reduced
        t = torch.zeros(numel, dtype=dtype)
        chosen = comm._peer_all_reduce(t)
        assert ("peer" if chosen is not None else "nccl") == expected
        if chosen is not None:
            chosen(t)
            assert chosen.calls == [t]
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, init_file: str) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world, device_id=device)
    try:
        reduce = PeerAllReduce()
        shapes = [(8192, torch.float16), (16 * 8192, torch.bfloat16), (8192, torch.float16), (BLOCK + 3, torch.float16)]
        for step, (numel, dtype) in enumerate(shapes):
            parts = [torch.randn(numel, generator=torch.Generator().manual_seed(100 * step + r)).to(dtype)
                     for r in range(world)]
            got = reduce(parts[rank].to(device))
            assert torch.equal(got.cpu(), sum(p.float() for p in parts).to(dtype)), (step, numel, dtype)
        # 64 calls without a host sync, rank 1 stalled now and then so that rank 0 runs ahead: a buffer half reused
        # too early would show up as a wrong sum
        inputs = [[torch.randn(4 * BLOCK, generator=torch.Generator().manual_seed(500 + 10 * k + r)).half()
                   for r in range(world)] for k in range(64)]
        on_device = [parts[rank].to(device) for parts in inputs]
        outputs = []
        for k, x in enumerate(on_device):
            if rank == 1 and k % 5 == 0:
                torch.cuda._sleep(200_000)  # ~0.1 ms of GPU time
            outputs.append(reduce(x))
        for k, (parts, got) in enumerate(zip(inputs, outputs)):
            assert torch.equal(got.cpu(), sum(p.float() for p in parts).half()), f"back-to-back call {k}"
        # inside a CUDA graph, replayed with new inputs: the call counts advance on device at every replay
        x = torch.empty(8192, dtype=torch.float16, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = reduce(x)
        for step in range(20):
            parts = [torch.randn(8192, generator=torch.Generator().manual_seed(1000 + 10 * step + r)).half()
                     for r in range(world)]
            x.copy_(parts[rank])
            graph.replay()
            assert torch.equal(y.cpu(), sum(p.float() for p in parts).half()), step
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs that map each other's memory")
def test_two_gpus_all_reduce_eagerly_and_in_graphs(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
