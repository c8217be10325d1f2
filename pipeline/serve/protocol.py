"""The generate model's wire contract: tensor names, types and shapes, and what a valid request is.

One table feeds both the `config.pbtxt` writer and the clients, so they cannot drift apart. The model is not batched
(`max_batch_size: 0`): one request is one prompt. Triton itself refuses a wrong datatype or shape (HTTP 400 /
INVALID_ARGUMENT) before the model sees it; `parse` refuses the rest with an `InputError` the model turns into the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError

MODEL = "tpaware"


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str  # Triton's config type; the KServe v2 datatype is the part after TYPE_ (STRING is BYTES)
    dims: tuple[int, ...]
    optional: bool
    about: str

    @property
    def datatype(self) -> str:
        return "BYTES" if self.dtype == "TYPE_STRING" else self.dtype.removeprefix("TYPE_")


INPUTS = (
    Spec("text_input", "TYPE_STRING", (1,), True, "the prompt as text (needs tokenizer files in the engine folder)"),
    Spec("input_ids", "TYPE_INT64", (-1,), True, "the prompt as token ids (give exactly one of the two)"),
    Spec("max_tokens", "TYPE_INT32", (1,), False, "how many tokens to generate, at least 1"),
    Spec("temperature", "TYPE_FP32", (1,), True, "0 (default): greedy; > 0: sample from softmax(logits / t)"),
    Spec("seed", "TYPE_INT64", (1,), True, "sampling seed, >= 0 (default: a random one); same seed, same tokens"),
)
OUTPUTS = (
    Spec("text_output", "TYPE_STRING", (1,), False, "the new tokens decoded (empty without a tokenizer)"),
    Spec("output_ids", "TYPE_INT64", (-1,), False, "the new token ids"),
)


@dataclass(frozen=True)
class Limits:
    vocab: int
    context: int  # prompt + new tokens may not exceed it (the model's position table / RoPE range)


@dataclass(frozen=True)
class Request:
    ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0


def context_length(config: dict) -> int:
    """The longest sequence the architecture's config allows (Llama family or GPTBigCode)."""
    return int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)


def parse(inputs: Mapping[str, np.ndarray], limits: Limits, encode: Callable[[str], list[int]] | None,
          default_seed: Callable[[], int]) -> Request:
    """A checked request from the model's input arrays; `encode` is the tokenizer, None when the folder has none."""
    if ("text_input" in inputs) == ("input_ids" in inputs):
        raise InputError("give exactly one of text_input (BYTES) and input_ids (INT64)")
    if "text_input" in inputs:
        if encode is None:
            raise InputError("this model has no tokenizer files: send the prompt as input_ids (INT64)")
        try:
            text = _scalar(inputs["text_input"], "text_input").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"text_input is not UTF-8 ({e.reason} at byte {e.start})") from None
        ids = list(encode(text))
    else:
        ids = [int(v) for v in np.asarray(inputs["input_ids"]).reshape(-1)]
    max_tokens = int(_scalar(inputs["max_tokens"], "max_tokens"))
    temperature = float(_scalar(inputs["temperature"], "temperature")) if "temperature" in inputs else 0.0
    if not ids:
        raise InputError("empty prompt: give at least one token")
    if min(ids) < 0 or max(ids) >= limits.vocab:
        raise InputError(f"input_ids must lie in 0..{limits.vocab - 1}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(ids) + max_tokens > limits.context:
        raise InputError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length "
                         f"{limits.context}")
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be finite and >= 0, got {temperature}")
    seed = int(_scalar(inputs["seed"], "seed")) if "seed" in inputs else default_seed()
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    return Request(tuple(ids), max_tokens, temperature, seed)


def _scalar(array: np.ndarray, name: str):
    array = np.asarray(array)
    if array.size != 1:
        raise InputError(f"{name} takes one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]
