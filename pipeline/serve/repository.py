"""Write a Triton model repository that a stock `tritonserver --model-repository DIR` serves.

    DIR/tpaware/config.pbtxt        the generate model: Python backend, inputs/outputs, one instance, parameters
    DIR/tpaware/1/model.py          `pipeline/serve/triton_model.py`
    DIR/tpaware/1/tpaware_src/      this tpaware's code (pipeline/, plugins/), so the server needs no tpaware install
    DIR/tpaware/1/engine/           the per-rank folder (hard links where the file system allows, else copies)

`tpaware serve` writes the same repository into a temporary folder but points `engine_dir` at the folder instead of
copying it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pipeline
import plugins
from pipeline.atomic import atomic_directory
from pipeline.rankfolder import read_manifest
from pipeline.runtime.launch import check_setup
from pipeline.serve.frontend import Settings
from pipeline.serve.protocol import INPUTS, MODEL, OUTPUTS, Spec

MODEL_PY = Path(__file__).with_name("triton_model.py")  # imports Triton's backend utilities: copied, never imported
_INSTANCE = """\
# One instance is one TP group: tp rank processes that together hold the whole model. A second instance would start a
# second group (tp more processes, on the same GPUs). KIND_CPU even for device cuda: the ranks pick their GPUs
# themselves (rank r on cuda:r); KIND_GPU would start one instance, so one group, per visible GPU.
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
_BATCHING = """\
# Not batched: one request is one prompt. Triton queues concurrent requests and they go through the TP group one at a
# time (greedy decoding with a KV cache has no padding, so prompts of different lengths cannot share a batch).
max_batch_size: 0
"""


def write_repository(engine: Path, out: Path, settings: Settings, copy_engine: bool = True) -> Path:
    """Write the repository for `engine` to `out` atomically; returns the model's folder."""
    engine = Path(engine).resolve()
    manifest = read_manifest(engine)
    check_setup(replace(settings, engine_dir=str(engine)).setup(engine))  # refuse a bad device or dtype now
    if not copy_engine:
        settings = replace(settings, engine_dir=str(engine))
    with atomic_directory(out) as tmp:
        version = tmp / MODEL / "1"
        version.mkdir(parents=True)
        (tmp / MODEL / "config.pbtxt").write_text(model_config(manifest, settings, engine))
        shutil.copy2(MODEL_PY, version / "model.py")
        for package in (pipeline, plugins):
            shutil.copytree(Path(package.__file__).parent, version / "tpaware_src" / package.__name__,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if copy_engine:
            shutil.copytree(engine, version / settings.engine_dir, copy_function=_link_or_copy)
    return Path(out) / MODEL


def model_config(manifest: dict, settings: Settings, engine: Path) -> str:
    """config.pbtxt, with why each setting is what it is."""
    parts = [f"# The tpaware generate model for {engine.name} ({manifest['arch']}, tp={manifest['tp']}), "
             "written by `tpaware triton-repo`.",
             f'name: "{MODEL}"', 'backend: "python"', _BATCHING.rstrip(),
             "input [", ",\n".join(_tensor(spec) for spec in INPUTS), "]",
             "output [", ",\n".join(_tensor(spec) for spec in OUTPUTS), "]",
             _INSTANCE.rstrip(),
             "# Read by model.py (all strings)."]
    for key, value in settings.parameters().items():
        parts += [f"# {key}: {Settings.about(key)}",
                  f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}']
    return "\n".join(parts) + "\n"


def _tensor(spec: Spec) -> str:
    dims = ", ".join(map(str, spec.dims))
    optional = "\n    optional: true" if spec.optional else ""
    return (f"  {{\n    # {spec.about}\n    name: \"{spec.name}\"\n    data_type: {spec.dtype}\n    dims: [ {dims} ]"
            f"{optional}\n  }}")


def _link_or_copy(src: str, dst: str) -> None:
    """Hard links cost no space and `convert` replaces files rather than rewriting them; copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
