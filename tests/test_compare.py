"""Polygraphy comparison of the ONNX export against the PyTorch rank model: it passes per layer and end to end, it
fails on a wrong permutation, and its saved JSON reproduces the check with the `polygraphy run` CLI."""

from __future__ import annotations

import pytest

# The export and its checks need the `onnx` extra (onnx, onnxruntime, Polygraphy): without it, skip, not fail to import.
for _module in ("onnx", "onnxruntime", "polygraphy"):
    pytest.importorskip(_module, reason="needs the onnx extra: pip install -e '.[onnx]'")

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import numpy_helper
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compare import COMMANDS_FILE, OUTPUT_DIR, compare
from pipeline.errors import InputError
from pipeline.export.onnx import export_onnx
from pipeline.shard import convert

POLYGRAPHY = str(Path(sys.executable).parent / "polygraphy")
LAYERS = 2


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """`exported(model_type, tp)` -> (per-rank folder, export folder) at group size 64 (TensorRT's form), cached."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(model_type: str, tp: int) -> tuple[Path, Path]:
        if (model_type, tp) not in cache:
            root = tmp_path_factory.mktemp(f"{model_type}-tp{tp}")
            convert(tiny_checkpoint(model_type, group_size=64), tp, root / "ranks")
            export_onnx(root / "ranks", root / "onnx")
            cache[model_type, tp] = root / "ranks", root / "onnx"
        return cache[model_type, tp]

    return make


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
@pytest.mark.parametrize("tp", [1, 2])
def test_comparison_passes_per_layer_and_end_to_end(exported, model_type, tp):
    folder, out = exported(model_type, tp)
    checks = compare(folder, out, batch=2, seq=6)
    names = [c.name for c in checks]
    prefixes = [""] if tp == 1 else [f"rank{r}." for r in range(tp)]
    assert names == [f"{p}layer{i}.{part}" for p in prefixes for i in range(LAYERS) for part in ("attn", "mlp")] + [
        "end-to-end logits"]
    for c in checks:
        assert c.passed, c
        assert c.max_abs <= 1e-5 * c.scale  # well inside the tolerance: fp32 rounding only
    files = [c for c in checks if c.command]  # the shell can repeat what was checked against a file
    assert len(files) == (1 if tp == 1 else 2 * LAYERS * tp)
    assert (out / OUTPUT_DIR / COMMANDS_FILE).read_text().count("polygraphy run") == len(files)


def _swap_permutation(path: Path, layer: str) -> None:
    """Overwrite the graph at `path` with `layer`'s input permutation wrong: two entries swapped."""
    model = onnx.load(str(path))
    (init,) = [t for t in model.graph.initializer if t.name == f"{layer}.in_perm"]
    perm = numpy_helper.to_array(init).copy()
    perm[[0, -1]] = perm[[-1, 0]]
    init.CopyFrom(numpy_helper.from_array(perm, init.name))
    onnx.save(model, str(path))


def test_wrong_permutation_fails_where_it_is(exported, tmp_path):
    folder, good = exported("llama", 2)
    out = tmp_path / "onnx"
    shutil.copytree(good, out)
    _swap_permutation(out / "rank1/layer0.mlp.onnx", "model.layers.0.mlp.gate_proj")
    checks = compare(folder, out, batch=1, seq=6)
    assert {c.name for c in checks if not c.passed} == {"rank1.layer0.mlp", "end-to-end logits"}
    worst = next(c for c in checks if c.name == "rank1.layer0.mlp")
    assert worst.max_abs > 1e-2 * worst.scale  # not a rounding matter


def test_polygraphy_cli_reproduces_the_check(exported, tmp_path):
    folder, good = exported("llama", 1)
    out = tmp_path / "onnx"
    shutil.copytree(good, out)
    (check,) = [c for c in compare(folder, out, batch=1, seq=5) if c.command]
    argv = shlex.split(check.command)
    assert argv[:2] == ["polygraphy", "run"] and "ORT_ENABLE_BASIC" in argv
    run = subprocess.run([POLYGRAPHY, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr
    _swap_permutation(out / "model.onnx", "model.layers.1.self_attn.o_proj")
    run = subprocess.run([POLYGRAPHY, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr


def test_cli_compare_exit_codes(exported, tmp_path):
    folder, good = exported("gpt_bigcode", 2)
    out = tmp_path / "onnx"
    shutil.copytree(good, out)
    result = CliRunner().invoke(app, ["compare", str(folder), "--onnx", str(out), "--seq", "4", "--iterations", "1"])
    assert result.exit_code == 0, result.output
    assert "sh " in result.output and "FAIL" not in result.output
    _swap_permutation(out / "rank0/layer1.attn.onnx", "transformer.h.1.attn.c_attn")
    result = CliRunner().invoke(app, ["compare", str(folder), "--onnx", str(out), "--seq", "4", "--iterations", "1"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_compare_refuses_an_export_of_another_folder(exported):
    folder, _ = exported("llama", 2)
    _, other = exported("gpt_bigcode", 2)
    with pytest.raises(InputError, match="different per-rank folder"):
        compare(folder, other)
    with pytest.raises(InputError, match="run `tpaware export onnx` first"):
        compare(folder, folder)
