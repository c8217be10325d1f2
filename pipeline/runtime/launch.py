"""Run a per-rank folder as real processes: one per rank, gloo on CPU, NCCL on GPU (rank r on cuda:r).

`run_ranks` spawns the tp ranks itself (torch.multiprocessing, start method spawn), so `tpaware run` and
`tpaware validate` need no torchrun. Rendezvous is a file store in a private temporary folder: no port to pick, so
concurrent runs cannot collide. Every rank runs the same picklable `task(comm, device)` (e.g. load its share of a
folder and generate) and hands back a dict of tensors plus its collective counts. The whole run has one deadline; on
timeout or on any rank's failure every rank still alive is terminated, then killed: no process outlives the call.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.errors import InputError
from pipeline.rankfolder import read_manifest
from pipeline.runtime.comm import Comm, DistComm
from pipeline.runtime.generate import Generation, greedy
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import Transformer
from pipeline.runtime.reshard import MODES

# NVLink SHARP / multicast off in every multi-GPU process: the lent machines do not support it.
MULTI_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEVICES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
Task = Callable[[Comm, torch.device], dict[str, torch.Tensor]]  # picklable: runs in every rank process


@dataclass(frozen=True)
class RankSetup:
    """What every rank process needs to build its model."""

    folder: str
    mode: str = "tpaware"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    kernel: bool = True

    def load(self, comm: Comm, device: torch.device) -> Transformer:
        return load_rank_model(Path(self.folder), comm, self.dtype, device, self.mode, self.kernel)


@dataclass(frozen=True)
class RankResult:
    values: dict[str, torch.Tensor]  # the task's result, on the CPU
    counts: dict[str, int]  # collectives this rank issued


def run_ranks(tp: int, task: Task, device: str = "cpu", timeout: float = 600.0) -> list[RankResult]:
    """Run `task(comm, device)` in `tp` processes joined in one process group; results in rank order."""
    if device == "cuda" and torch.cuda.device_count() < tp:
        raise InputError(f"tp={tp} needs {tp} GPUs, {torch.cuda.device_count()} visible")
    with tempfile.TemporaryDirectory(prefix="tpaware-run-") as tmp:
        ctx = mp.start_processes(_rank_main, args=(tp, tmp, task, device, timeout), nprocs=tp, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the {tp} rank(s) did not finish within {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            _raise_rank_error(Path(tmp), tp)
            raise
        finally:
            _stop(ctx.processes)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(tp)]


def check_setup(setup: RankSetup) -> int:
    """The folder's tp, after refusing what would only fail inside the ranks (bad mode or device)."""
    tp = read_manifest(Path(setup.folder))["tp"]
    if setup.mode not in MODES:
        raise InputError(f"--mode {setup.mode!r} must be one of {', '.join(MODES)}")
    if setup.device not in DEVICES:
        raise InputError(f"--device {setup.device!r} must be one of {', '.join(DEVICES)}")
    return tp


def dtype_of(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"--dtype {name!r} must be one of {', '.join(DTYPES)}")
    return DTYPES[name]


def generate(setup: RankSetup, ids: torch.Tensor, max_tokens: int, timeout: float = 600.0
             ) -> tuple[Generation, list[dict[str, int]]]:
    """Greedy generation at the folder's tp: rank 0's tokens and logits, and every rank's collective counts."""
    tp = check_setup(setup)
    results = run_ranks(tp, partial(greedy_task, setup, ids, max_tokens), setup.device, timeout)
    values = results[0].values
    step = values.get("step_seconds")
    return (Generation(values["tokens"], values["logits"], None if step is None else step.item()),
            [r.counts for r in results])


def greedy_task(setup: RankSetup, ids: torch.Tensor, max_tokens: int, comm: Comm, device: torch.device
                ) -> dict[str, torch.Tensor]:
    gen = greedy(setup.load(comm, device), ids.to(device), max_tokens)
    timed = {} if gen.step_seconds is None else {"step_seconds": torch.tensor(gen.step_seconds)}
    return {"tokens": gen.tokens, "logits": gen.logits, **timed}


def _rank_main(rank: int, tp: int, tmp: str, task: Task, device_kind: str, timeout: float) -> None:
    """One rank: join the group, run the task, save the result. Bad input is saved for the parent, then re-raised."""
    os.environ.update(MULTI_GPU_ENV)
    out = Path(tmp) / f"rank{rank}.pt"
    try:
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device, backend = torch.device("cuda", rank), "nccl"
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
            device, backend = torch.device("cpu"), "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=tp,
                                timeout=timedelta(seconds=timeout))
        try:
            comm = DistComm()
            values = {k: v.cpu() for k, v in task(comm, device).items()}
            torch.save(RankResult(values, dict(comm.counts)), out)
        finally:
            dist.destroy_process_group()
    except InputError as e:
        out.with_suffix(".err").write_text(str(e))
        raise


def _raise_rank_error(tmp: Path, tp: int) -> None:
    """Re-raise a rank's bad-input error as the one-line InputError the CLI prints; other errors pass through."""
    for r in range(tp):
        path = tmp / f"rank{r}.err"
        if path.is_file():
            raise InputError(f"rank {r}: {path.read_text()}") from None


def _stop(processes: list) -> None:
    """Terminate, then kill, every rank still running: nothing outlives `run_ranks`."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
