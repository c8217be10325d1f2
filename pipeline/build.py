"""`tpaware build`: engines from an export. `--backend tensorrt` builds one TensorRT engine per exported ONNX graph;
`--backend trtllm` is `pipeline.export.trtllm.build_trtllm`, imported only when asked for.

TensorRT cannot be installed on our CPU machines nor on the lent GPU machines, so the engine build itself is a thin
call into Polygraphy's TensorRT backend. Everything that can be decided without TensorRT is here and tested: that the
graphs satisfy TensorRT's INT4 rules (`pipeline.export.checks`), the optimization profile of every graph input, where
each engine goes, and the one-line refusal when TensorRT or a GPU is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.export.checks import tensorrt_violations
from pipeline.export.onnx import read_export

BACKENDS = ("tensorrt", "trtllm")
DYNAMIC_DIMS = ("batch", "seq")
TENSORRT_INSTALL = ("install TensorRT 10.x (the INT4 DequantizeLinear path needs >= 10.0; 11 drops the plugin API "
                    "TensorRT-LLM uses) on a machine with an NVIDIA GPU, e.g. `pip install 'tensorrt-cu12>=10.6,<11'`")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineJob:
    graph: Path
    engine: Path  # relative to the output folder
    profile: dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def build(engine_dir: Path, backend: str, onnx_dir: Path, out: Path | None, max_batch: int = 8,
          max_seq: int = 2048) -> Path:
    """Build `backend`'s engines for the per-rank folder `engine_dir` into `out` (default: the backend's own,
    `<engine_dir>-tensorrt` beside it for TensorRT); returns the engine folder."""
    if backend == "trtllm":
        from pipeline.export.trtllm import build_trtllm

        return build_trtllm(engine_dir, out=out)
    if backend != "tensorrt":
        raise InputError(f"--backend {backend!r} must be one of {', '.join(BACKENDS)}")
    out = out or Path(engine_dir).resolve().with_name(f"{Path(engine_dir).resolve().name}-tensorrt")
    jobs = tensorrt_jobs(engine_dir, onnx_dir, max_batch, max_seq)
    missing = tensorrt_unavailable()
    if missing:
        raise InputError(missing)
    with atomic_directory(out) as tmp:
        for job in jobs:
            _build_engine(job, tmp / job.engine)
    return out


def tensorrt_jobs(engine_dir: Path, onnx_dir: Path, max_batch: int, max_seq: int) -> list[EngineJob]:
    """One job per exported graph, after checking every graph against TensorRT's INT4 rules."""
    info = read_export(onnx_dir, engine_dir)
    jobs = []
    for graph in info["graphs"]:
        path = Path(onnx_dir) / graph
        model = onnx.load(str(path), load_external_data=False)  # shapes and attributes only
        problems = tensorrt_violations(model)
        if problems:
            raise InputError(f"TensorRT cannot take this graph ({len(problems)} problem(s), first: {problems[0]}); "
                             "the export is for onnxruntime only", file=path)
        jobs.append(EngineJob(path, Path(graph).with_suffix(".engine"),
                              profile_shapes(model, max_batch, max_seq)))
    return jobs


def profile_shapes(model: onnx.ModelProto, max_batch: int, max_seq: int) -> dict[str, tuple[Shape, Shape, Shape]]:
    """TensorRT's optimization profile per input: batch 1..max_batch (opt 1), seq 1..max_seq (opt max_seq/4)."""
    ranges = {"batch": (1, 1, max_batch), "seq": (1, max(1, max_seq // 4), max_seq)}
    profile = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        unknown = [d.dim_param for d in dims if d.dim_param and d.dim_param not in ranges]
        if unknown:
            raise InputError(f"input {value.name!r} has dynamic dimension(s) {unknown}; only {DYNAMIC_DIMS} are known")
        shapes = [ranges[d.dim_param] if d.dim_param else (d.dim_value,) * 3 for d in dims]
        profile[value.name] = tuple(tuple(s[k] for s in shapes) for k in range(3))
    return profile


def tensorrt_unavailable() -> str | None:
    """Why TensorRT engines cannot be built here (one line: what is missing and how to get it), or None."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"TensorRT is not installed (import tensorrt: {e}); {TENSORRT_INSTALL}"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: TensorRT builds an engine on the GPU it will run on; run this on a GPU machine"
    return None


def _build_engine(job: EngineJob, dest: Path) -> None:
    """Parse, build and save one engine through Polygraphy's TensorRT backend (needs TensorRT and a GPU)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    profile = Profile()
    for name, (lo, opt, hi) in job.profile.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    dest.parent.mkdir(parents=True, exist_ok=True)
    network = NetworkFromOnnxPath(str(job.graph), strongly_typed=True)
    SaveEngine(EngineBytesFromNetwork(network, config=CreateConfig(profiles=[profile])), path=str(dest))()
