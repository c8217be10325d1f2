"""The one place collectives happen, so tests can count them.

`DistComm` wraps torch.distributed (gloo on CPU, NCCL on GPU); on GPUs that map each other's memory, the all-reduce of
decode-sized tensors runs the one-shot kernel of `plugins/allreduce.py` (3.3-3.9 µs against NCCL's 9.5-11.8 on
2 x H200, `benchmarks/allreduce_h200x2.md`; `TPAWARE_ALL_REDUCE=nccl` turns it off).  `ThreadGroup` runs all ranks as
threads of one process, summing in rank order, for the simulated-TP reference: the same model code, no processes.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from typing import Callable

import torch


class Comm:
    """Counts every collective by name; subclasses do the communication."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.counts: Counter[str] = Counter()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.counts["all_reduce"] += 1
        return t if self.world_size == 1 else self._all_reduce(t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `t` along the last dimension, in rank order."""
        self.counts["all_gather"] += 1
        return t if self.world_size == 1 else self._all_gather(t)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def one_shot_all_reduce_allowed() -> bool:
    """Whether `DistComm` may run the one-shot kernel (where the GPUs map each other's memory): unless
    TPAWARE_ALL_REDUCE=nccl."""
    return os.environ.get("TPAWARE_ALL_REDUCE", "peer") == "peer"


class DistComm(Comm):
    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist, self._group = dist, group
        super().__init__(dist.get_rank(group), dist.get_world_size(group))
        self._peer = None  # the one-shot all-reduce, made at the first CUDA all-reduce where every GPU pair maps
        self._peer_checked = False

    def _peer_all_reduce(self, t: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The one-shot all-reduce if it takes `t` (same answer on every rank: the shapes and machine are the same)."""
        if not self._peer_checked:
            self._peer_checked = True
            world = range(self.world_size)  # rank r runs on cuda:r (pipeline.runtime.launch)
            if one_shot_all_reduce_allowed() and all(
                    torch.cuda.can_device_access_peer(a, b) for a in world for b in world if a != b):
                from plugins.allreduce import PeerAllReduce

                self._peer = PeerAllReduce(self._group)
        return self._peer if self._peer is not None and self._peer.takes(t) else None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        peer = self._peer_all_reduce(t) if t.is_cuda else None
        if peer is not None:
            return peer(t)
        t = t.contiguous()
        self._dist.all_reduce(t, group=self._group)
        return t

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_cuda:  # one NCCL call into one buffer: the form that CUDA graphs capture
            rows = t.reshape(-1, t.shape[-1]).contiguous()
            parts = rows.new_empty(self.world_size * rows.shape[0], rows.shape[1])
            self._dist.all_gather_into_tensor(parts, rows, group=self._group)
            gathered = parts.view(self.world_size, *rows.shape).permute(1, 0, 2)
            return gathered.reshape(*t.shape[:-1], self.world_size * t.shape[-1])
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t.contiguous(), group=self._group)
        return torch.cat(parts, dim=-1)


class ThreadGroup:
    """A process group made of threads: `comm(r)` is rank r's communicator."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def comm(self, rank: int) -> Comm:
        return _ThreadComm(self, rank)

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = t
        self._barrier.wait()
        parts = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read them
        return parts  # type: ignore[return-value]


class _ThreadComm(Comm):
    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__(rank, group.world_size)
        self._group = group

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        parts = self._group.exchange(self.rank, t)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._group.exchange(self.rank, t), dim=-1)
