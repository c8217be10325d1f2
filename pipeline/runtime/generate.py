"""Greedy generation with the KV cache: the new tokens, and the logits that chose them; on GPUs the decode steps
replay a CUDA graph."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.runtime.model import Cache, KVCache, StaticKVCache, Transformer


@dataclass(frozen=True)
class Generation:
    tokens: torch.Tensor  # [B, n] the greedy continuation
    logits: torch.Tensor  # [B, T + n - 1, vocab] logits of prompt + tokens[:, :-1], position by position
    step_seconds: float | None = None  # mean time of the decode steps after the third token (graph replays on GPUs)


class DecodeGraph:
    """One decode step of `model` (one token per sequence) captured in a CUDA graph over a static KV cache.

    A decode step is a chain of small kernels, some 15 per layer (four GEMMs and their input preparations, attention,
    the all-reduces, the fused norms, rotary and SiLU); replayed from a graph they run back to back instead of each
    waiting for Python and a launch.  Capture only records: run one eager step of the same shape first (it compiles
    and tunes the kernels and sets up the collectives' buffers, none of which may happen inside a capture).  Each call
    copies `tokens` in, replays, and returns the step's logits [B, 1, vocab] (the same tensor every time: clone what
    is kept).  Collectives inside the graph are counted again on every replay, as an eager step would count them.
    """

    def __init__(self, model: Transformer, cache: StaticKVCache, tokens: torch.Tensor):
        self.comm, self.tokens = model.comm, tokens.clone()
        before = Counter(self.comm.counts)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache)
        self.collectives = self.comm.counts - before
        self.comm.counts.clear()  # recorded, not run: a replay counts them
        self.comm.counts.update(before)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.comm.counts.update(self.collectives)
        return self.logits


def warm_up(model: Transformer, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
    """One eager decode step on a side stream (what PyTorch asks before a capture), the caller's stream waiting."""
    side = torch.cuda.Stream(tokens.device)
    side.wait_stream(torch.cuda.current_stream(tokens.device))
    with torch.cuda.stream(side):
        logits = model(tokens, cache)
    torch.cuda.current_stream(tokens.device).wait_stream(side)
    return logits


@torch.inference_mode()
def greedy(model: Transformer, ids: torch.Tensor, max_tokens: int, graphs: bool = True) -> Generation:
    """Prefill `ids` [B, T], then decode `max_tokens` tokens one at a time, always taking the top logit.

    On a GPU (`graphs`, a plain `Transformer`) the cache is static and every decode step after the first replays one
    CUDA graph; elsewhere the cache grows and every step runs eagerly.  The logits are returned in the input's order so
    that one teacher-forced forward of prompt + tokens[:, :-1] by any other implementation lines up with them position
    by position, the KV-cache steps included.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    use_graph = graphs and ids.is_cuda and isinstance(model, Transformer) and max_tokens > 2
    if use_graph:
        cache = StaticKVCache.for_model(model, ids.shape[0], ids.shape[1] + max_tokens, model.lm_head.dtype,
                                        ids.device)
    else:
        cache = KVCache()
    step = model(ids, cache)
    logits, tokens = [step], []
    graph, started = None, None
    for i in range(max_tokens):
        tokens.append(step[:, -1].argmax(-1, keepdim=True))
        if i + 1 == max_tokens:
            break
        if i == 2:  # after prefill, the warm-up step and the capture: steady decoding
            started = _now(ids.device)
        if not use_graph:
            step = model(tokens[-1], cache)
        elif i == 0:
            step = warm_up(model, tokens[-1], cache)
        else:
            graph = graph or DecodeGraph(model, cache, tokens[-1])
            step = graph(tokens[-1]).clone()
        logits.append(step)
    seconds = None if started is None else (_now(ids.device) - started) / (max_tokens - 3)
    return Generation(torch.cat(tokens, dim=1), torch.cat(logits, dim=1), seconds)


def _now(device: torch.device) -> float:
    """Wall-clock seconds once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def tokenizer(folder: Path):
    """The tokenizer `convert` copied into the folder; synthetic models have none, so they take token ids."""
    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise InputError("no tokenizer files in the folder: give --prompt-ids instead of --prompt", file=folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def parse_ids(text: str, vocab: int) -> torch.Tensor:
    """`"1,2,3"` -> [[1, 2, 3]]; prompts separated by `;` (equal lengths) make a batch."""
    try:
        rows = [[int(v) for v in row.split(",") if v.strip()] for row in text.split(";")]
    except ValueError:
        raise InputError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise InputError(f"--prompt-ids {text!r}: prompts must be non-empty and of equal length")
    ids = torch.tensor(rows)
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"--prompt-ids {text!r}: ids must lie in 0..{vocab - 1}")
    return ids
