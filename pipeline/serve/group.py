"""The TP group behind the served model: the runtime's launcher runs every rank; rank 0 leads, the others follow.

`TPGroup` runs `run_ranks` in a background thread, so the launcher's guarantees hold for serving too: one process per
rank (gloo on CPU, NCCL on GPU), a failing rank stops them all, and none outlives the group. The serving process talks
to rank 0 through a pipe. Rank 0 broadcasts each request (prompt ids, max_tokens, temperature, seed) to ranks 1..tp-1,
then every rank generates it together; an empty header tells the followers to stop.

Requests go through the group one at a time: greedy decoding with a KV cache has no padding or attention mask, so
prompts of different lengths cannot share a batch. Sampling is greedy decoding over Gumbel-perturbed logits (argmax of
logits/t + Gumbel noise is a draw from softmax(logits/t)); every rank draws the same noise from the request's seed, so
every rank picks the same token, just as greedy decoding relies on every rank's logits being the same.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import threading
import time
from functools import partial
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pipeline.runtime.comm import Comm
from pipeline.runtime.generate import greedy
from pipeline.runtime.launch import RankSetup, check_setup, run_ranks
from pipeline.runtime.model import KVCache, Transformer
from pipeline.serve.protocol import Request

READY = "ready"
_POLL_S = 0.2  # how often a waiting caller checks that the group is still alive


class GroupDown(RuntimeError):
    """The TP group is not running (it failed, reached its lifetime, or was stopped)."""


class TPGroup:
    """The ranks of one per-rank folder, serving one request at a time.

    `lifetime` bounds the whole group (the launcher has one deadline): it is also the process group's timeout, which
    is how long a follower may wait for the next request.
    """

    def __init__(self, setup: RankSetup, lifetime: float, start_timeout: float = 600.0):
        self.tp = check_setup(setup)
        self._conn, child = mp.get_context("spawn").Pipe()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(setup, child, lifetime), daemon=True,
                                        name="tpaware-group")
        self._thread.start()
        try:
            if self._receive(start_timeout) != READY:
                raise GroupDown("rank 0 did not report ready")
        except BaseException:
            self.stop()
            raise

    def generate(self, request: Request, timeout: float) -> list[int]:
        """The new token ids for `request`; waits for the requests before it.

        A request that times out leaves rank 0 busy with it, and its late answer would be taken for the next
        request's: the group is told to stop and refuses everything from then on.
        """
        with self._lock:
            self._check()
            self._conn.send(request)
            try:
                return self._receive(timeout)
            except GroupDown as e:
                self._error = self._error or e
                self._tell_stop()
                raise

    def stop(self, timeout: float = 60.0) -> None:
        """Tell the ranks to finish, then wait for them (the launcher kills whatever is left on its way out)."""
        with self._lock:
            self._tell_stop()
            self._thread.join(timeout)

    def _tell_stop(self) -> None:
        with contextlib.suppress(OSError):  # rank 0 may be gone already
            self._conn.send(None)

    def _run(self, setup: RankSetup, child: Connection, lifetime: float) -> None:
        try:
            run_ranks(self.tp, partial(rank_task, setup, child), setup.device, lifetime)
        except BaseException as e:  # noqa: BLE001 - kept for the callers waiting on the group
            self._error = e

    def _check(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise GroupDown(f"the TP group is not running: {self._error or 'stopped'}")

    def _receive(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self._conn.poll(_POLL_S):
            self._check()
            if time.monotonic() > deadline:
                raise GroupDown(f"no answer from rank 0 within {timeout:.0f} s")
        return self._conn.recv()


def rank_task(setup: RankSetup, conn: Connection, comm: Comm, device: torch.device) -> dict[str, torch.Tensor]:
    """One rank's whole serving life: load, then lead (rank 0) or follow until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the server, which stops us in order
    model = setup.load(comm, device)
    dist.barrier()  # every rank has loaded before rank 0 reports ready
    if comm.rank == 0:
        conn.send(READY)
        while (request := _broadcast(_next(conn), device)) is not None:
            conn.send(decode(model, request, device).tolist())
    else:
        while (request := _broadcast(None, device)) is not None:
            decode(model, request, device)
    return {}


def decode(model: Transformer, request: Request, device: torch.device) -> torch.Tensor:
    """The new token ids [n] for one request: greedy, or sampled at the request's temperature and seed."""
    ids = torch.tensor([request.ids], device=device)
    if request.temperature > 0:
        model = GumbelSampler(model, request.temperature, request.seed, device)
    return greedy(model, ids, request.max_tokens).tokens[0].cpu()


class GumbelSampler:
    """Wraps a model so that the argmax of its last logits is a draw from softmax(logits / temperature)."""

    def __init__(self, model: Transformer, temperature: float, seed: int, device: torch.device):
        self.model, self.temperature = model, temperature
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        logits = self.model(ids, cache).float()
        exponential = torch.empty_like(logits[:, -1]).exponential_(generator=self.generator)
        logits[:, -1] -= self.temperature * exponential.log()  # -log(Exp(1)) is Gumbel(0, 1)
        return logits


def _next(conn: Connection) -> Request | None:
    """Rank 0's next request; None on stop, or when the serving process is gone (its end of the pipe closed)."""
    try:
        return conn.recv()
    except EOFError:
        return None


def _broadcast(request: Request | None, device: torch.device) -> Request | None:
    """Rank 0 sends `request` (None: stop) to every rank; every rank returns it."""
    header = torch.zeros(4, dtype=torch.int64, device=device)
    if request is not None:
        temperature = torch.tensor(request.temperature, dtype=torch.float64).view(torch.int64).item()
        header.copy_(torch.tensor([len(request.ids), request.max_tokens, request.seed, temperature]))
    dist.broadcast(header, src=0)
    length, max_tokens, seed, temperature_bits = header.tolist()
    if length == 0:
        return None
    ids = torch.tensor(request.ids if request else [0] * length, dtype=torch.int64, device=device)
    dist.broadcast(ids, src=0)
    temperature = torch.tensor(temperature_bits, dtype=torch.int64).view(torch.float64).item()
    return Request(tuple(ids.tolist()), max_tokens, temperature, seed)

