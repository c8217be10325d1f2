"""Act-order GPTQ quantization with GPTQModel, the maintained GPTQ toolkit: HF fp folder in, HF GPTQ folder out.

tpaware does not implement GPTQ itself. The point of the project is to run real act-order checkpoints exactly, so
they must come from the tool people actually use. GPTQModel 7.6 runs on CPU; it needs at least two CPU workers in its
thread pool, which its default does not give a 2-core machine, hence `_cpu_workers`.

Calibration text: the docstrings of a fixed list of Python standard-library modules. Nothing may be downloaded, so
the text has to come from what is installed. Docstrings are English prose mixed with code, close to what SmolLM2 was
trained on, and they ship with every Python. Sampling text from the fp model was the alternative, but greedy decoding
repeats itself and sampling depends on the RNG and the hardware. The text is the same for a given Python minor
version; the sha256 of the calibration token ids goes into the cache stamp, so a cached checkpoint is reused only
when the calibration is the same.

Symmetric or not: asymmetric by default, because it is the better model at the same cost. On SmolLM2 (group 64,
act order) the mean KL divergence from the fp model over 4 x 128 held-out tokens was 0.12 asymmetric, 0.17 symmetric
and 0.13 symmetric with GPTQModel's MSE scale search, which takes 25% longer (`scripts/quantize_quality.py`).

Zero points: a symmetric checkpoint is written in the standard v1 `gptq` format (stored zero = z - 1 = 7). An
asymmetric one is written as `gptq_v2` (stored zero = z). GPTQModel's v1 writer subtracts 1 from the whole packed
int32, so a zero point of 0 borrows from its neighbour, and only a word-level reader would undo it. This does happen:
an asymmetric v1 SmolLM2 checkpoint had one zero point of 0 among 1.66 M. A nibble-wise reader misread two of them
(GPTQModel's own dequantized weights differ by up to 3.4 there), and that alone raised the KL divergence from 0.12
to 0.17.

Cache: the output folder holds `tpaware-quantize.json` (source fingerprint, settings, calibration hash, GPTQModel
version). When it matches, a second run returns in seconds instead of quantizing again.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import GROUP_SIZES, fingerprint
from pipeline.models import resolve_model

STAMP = "tpaware-quantize.json"
CALIBRATION_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
    "logging", "pathlib", "random", "re", "shutil", "sqlite3", "statistics", "string", "subprocess", "tempfile",
    "textwrap", "threading", "unittest", "urllib.parse", "zipfile",
)
SAMPLES = 32
SEQ_LEN = 256


def calibration_text(modules: Sequence[str] = CALIBRATION_MODULES) -> str:
    """Module docstrings, then each public class's and function's docstring in name order."""
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
                parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(part for part in parts if part)


def calibration_ids(tokenizer, samples: int = SAMPLES, seq_len: int = SEQ_LEN,
                    modules: Sequence[str] = CALIBRATION_MODULES) -> list[list[int]]:
    """`samples` windows of `seq_len` token ids, spread evenly over the whole calibration text."""
    ids = tokenizer(calibration_text(modules), add_special_tokens=False)["input_ids"]
    if len(ids) < samples * seq_len:
        raise InputError(f"the calibration text has {len(ids)} tokens, fewer than {samples} x {seq_len}")
    stride = len(ids) // samples
    return [ids[i * stride: i * stride + seq_len] for i in range(samples)]


def checkpoint_format(sym: bool) -> str:
    """v1 where it is exact (symmetric), v2 where v1 cannot hold a zero point of 0 (see the module docstring)."""
    return "gptq" if sym else "gptq_v2"


def output_name(source: str, bits: int, group_size: int, desc_act: bool, sym: bool) -> str:
    """The cache folder's name, e.g. `smollm2-gptq-w4g64-act-asym`: every setting that changes the tensors."""
    return f"{source}-gptq-w{bits}g{group_size}{'-act' if desc_act else ''}-{'sym' if sym else 'asym'}"


def quantize(model_dir: Path, out: Path, bits: int = 4, group_size: int = 64, desc_act: bool = True,
             sym: bool = False, calib: Sequence[Sequence[int]] | None = None, batch_size: int = 8) -> dict:
    """Quantize the HF fp model in `model_dir` with GPTQModel and write the GPTQ checkpoint `out` atomically.

    `calib` is token-id lists. None means the standard-library docstrings, tokenized with the model's own
    tokenizer. Returns the stamp, plus `cached: true` when `out` already held this exact result.
    """
    model_dir, out = Path(model_dir), Path(out)
    _check_settings(bits, group_size)
    if not (model_dir / "config.json").is_file():
        raise InputError("config.json not found: expected a Hugging Face fp model folder", file=model_dir)
    if calib is None:
        from transformers import AutoTokenizer

        calib = calibration_ids(AutoTokenizer.from_pretrained(model_dir, local_files_only=True))
    calib = [list(map(int, ids)) for ids in calib]
    stamp = _stamp(model_dir, bits, group_size, desc_act, sym, calib)
    if _read_stamp(out) == stamp:
        return dict(stamp, cached=True)

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(_cpu_workers()))
    start = time.perf_counter()
    with atomic_directory(out) as tmp, _output_to(log_path(out)):
        from gptqmodel import GPTQModel, QuantizeConfig

        config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                                format=checkpoint_format(sym),
                                act_group_aware=False,  # GPTQModel's default reordering for desc_act=False; keep plain
                                offload_to_disk=False)  # small models fit in memory; no temp path in the saved config
        # bf16, GPTQModel's CPU default: CPUs without AVX512-FP16 run fp16 matmuls ~10x slower than bf16 ones (8.8 vs
        # 94 GFLOP/s here), which made quantizing SmolLM2 take 13 minutes instead of 2. Scales are fp16 regardless.
        model = GPTQModel.load(str(model_dir), config, device="cpu", dtype=torch.bfloat16)
        model.quantize([{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib], batch_size=batch_size)
        model.save(str(tmp))
        (tmp / STAMP).write_text(json.dumps(dict(stamp, seconds=round(time.perf_counter() - start, 1)), indent=2))
    return dict(stamp, cached=False)


def log_path(out: Path) -> Path:
    """Where GPTQModel's own output (per-layer tables, its config dump) goes: beside the checkpoint, kept on failure."""
    return out.with_name(f"{out.name}.gptqmodel.log")


@contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send everything written to stdout and stderr, by Python or native code, to `path` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)


def quantize_model(model: str, engines: Path, out: Path | None = None, bits: int = 4, group_size: int = 64,
                   desc_act: bool = True, sym: bool = False) -> tuple[Path, dict]:
    """`quantize` for a folder or the embedded default (`smollm2`), into `engines/<output_name>` unless `out` is set."""
    _check_settings(bits, group_size)  # before the default model's first, slow, load
    folder, name = resolve_model(model, engines)
    out = Path(out) if out else Path(engines) / output_name(name, bits, group_size, desc_act, sym)
    return out, quantize(folder, out, bits, group_size, desc_act, sym)


def _check_settings(bits: int, group_size: int) -> None:
    if bits != 4:
        raise InputError(f"--bits {bits}: tpaware reads 4-bit GPTQ only")
    if group_size not in GROUP_SIZES:
        raise InputError(f"--group-size {group_size} is not one tpaware reads (use one of {GROUP_SIZES})")


def _cpu_workers() -> int:
    """GPTQModel's default, (cores + 1) // 2, but at least 2: its model loader alone asks for 2 CPU workers."""
    return max(2, ((os.cpu_count() or 1) + 1) // 2)


def _stamp(model_dir: Path, bits: int, group_size: int, desc_act: bool, sym: bool,
           calib: list[list[int]]) -> dict:
    """Everything the quantized tensors depend on. A cached folder is reused only if all of it matches."""
    return {
        "source_fingerprint": fingerprint(model_dir),  # not its path: a moved repository keeps its cache
        "settings": {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                     "checkpoint_format": checkpoint_format(sym)},
        "calibration": {"samples": len(calib), "tokens": sum(map(len, calib)),
                        "sha256": hashlib.sha256(json.dumps(calib).encode()).hexdigest()},
        "gptqmodel": _gptqmodel_version(),
    }


def _gptqmodel_version() -> str:
    """The installed GPTQModel's version; the install line pins the torch already there (7.7 needs torch>=2.14.1)."""
    try:
        return version("gptqmodel")
    except PackageNotFoundError:
        torch_pin = f"torch=={version('torch').split('+')[0]}"
        raise InputError(f"quantizing needs GPTQModel: run `pip install -c <(echo {torch_pin}) gptqmodel==7.6.0`"
                         ) from None


def _read_stamp(out: Path) -> dict | None:
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    stamp.pop("seconds", None)
    return stamp
