"""Greedy generation with the KV cache: the new tokens, and the logits that chose them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import InputError
from pipeline.runtime.model import KVCache, Transformer


@dataclass(frozen=True)
class Generation:
    tokens: torch.Tensor  # [B, n] the greedy continuation
    logits: torch.Tensor  # [B, T + n - 1, vocab] logits of prompt + tokens[:, :-1], position by position


@torch.inference_mode()
def greedy(model: Transformer, ids: torch.Tensor, max_tokens: int) -> Generation:
    """Prefill `ids` [B, T], then decode `max_tokens` tokens one at a time, always taking the top logit.

    The logits are returned in the input's order so that one teacher-forced forward of prompt + tokens[:, :-1] by any
    other implementation lines up with them position by position, the KV-cache steps included.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    cache = KVCache()
    step = model(ids, cache)
    logits, tokens = [step], []
    for i in range(max_tokens):
        tokens.append(step[:, -1].argmax(-1, keepdim=True))
        if i + 1 < max_tokens:
            step = model(tokens[-1], cache)
            logits.append(step)
    return Generation(torch.cat(tokens, dim=1), torch.cat(logits, dim=1))


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
