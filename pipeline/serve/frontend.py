"""The served model without Triton: numpy arrays in, numpy arrays out, through one TP group.

`Settings` are the model's `config.pbtxt` parameters (strings there); the repository writer and the Python-backend
model both go through this class, so a parameter is named, defaulted and explained in one place.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
from pipeline.rankfolder import read_manifest
from pipeline.runtime.generate import tokenizer
from pipeline.runtime.launch import RankSetup, dtype_of
from pipeline.serve.group import TPGroup
from pipeline.serve.protocol import Limits, context_length, parse


def _param(default: str, about: str):
    return field(default=default, metadata={"about": about})


@dataclass(frozen=True)
class Settings:
    """The model's parameters, with the explanation written next to each in config.pbtxt."""

    engine_dir: str = _param("engine", "the per-rank folder; a relative path is taken from the version folder")
    device: str = _param("cpu", "cpu: one process per rank over gloo; cuda: rank r on cuda:r over NCCL")
    dtype: str = _param("float32", "activations and dequantized weights: float32, float16 or bfloat16")
    mode: str = _param("tpaware", "the runtime's mode: tpaware (gathers nothing), naive or local-sort")
    kernel: str = _param("true", "on CUDA, the W4A16 kernel for quantized matmuls (false: dequantize + matmul)")
    lifetime_s: str = _param("1728000", "the TP group's one deadline (20 days); also how long a rank may idle")
    request_timeout_s: str = _param("600", "longest wait for one request's tokens, after which the group stops")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> Settings:
        known = {f.name for f in fields(cls)}
        unknown = set(parameters) - known
        if unknown:
            raise InputError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**parameters)

    def parameters(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def about(cls, name: str) -> str:
        return next(f.metadata["about"] for f in fields(cls) if f.name == name)

    def setup(self, base: Path) -> RankSetup:
        folder = Path(self.engine_dir) if Path(self.engine_dir).is_absolute() else base / self.engine_dir
        if self.kernel not in ("true", "false"):
            raise InputError(f"parameter kernel={self.kernel!r} must be true or false")
        return RankSetup(str(folder), self.mode, self.device, dtype_of(self.dtype), self.kernel == "true")


class Frontend:
    """Checks a request, tokenizes it when it is text, runs it through the group and packs the answer."""

    def __init__(self, settings: Settings, base: Path):
        setup = settings.setup(base)
        folder = Path(setup.folder)
        manifest = read_manifest(folder)
        self.limits = Limits(manifest["dims"]["vocab"], context_length(manifest["config"]))
        try:
            self.tokenizer = tokenizer(folder)
        except InputError:  # no tokenizer files (a synthetic model): token ids only
            self.tokenizer = None
        self.timeout = float(settings.request_timeout_s)
        self.group = TPGroup(setup, float(settings.lifetime_s))

    def answer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        encode = (lambda text: self.tokenizer(text).input_ids) if self.tokenizer else None
        request = parse(inputs, self.limits, encode, default_seed=lambda: secrets.randbits(63))
        ids = self.group.generate(request, self.timeout)
        text = self.tokenizer.decode(ids) if self.tokenizer else ""
        return {"text_output": np.array([text.encode("utf-8")], dtype=np.object_),
                "output_ids": np.array(ids, dtype=np.int64)}

    def close(self) -> None:
        self.group.stop()
