"""Bad input: one line naming the file and tensor, exit code 2, no traceback, no partial output folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file


def tpaware(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt"))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def _edit_quant_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _missing_g_idx(folder):
    _edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.g_idx"))
    return "model.layers.1.mlp.up_proj.g_idx", "desc_act=true"


def _shape_mismatch(folder):
    def edit(t):
        t["model.layers.0.self_attn.o_proj.scales"] = t["model.layers.0.self_attn.o_proj.scales"][:-1].clone()
    _edit_tensors(folder, edit)
    return "model.layers.0.self_attn.o_proj.scales", "expected"


def _truncated(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors", "truncated"


def _three_bits(folder):
    _edit_quant_config(folder, bits=3)
    return "config.json", "bits=3"


def _bad_group_size(folder):
    _edit_quant_config(folder, group_size=48)
    return "config.json", "group_size=48"


CASES = {"missing g_idx": _missing_g_idx, "shape mismatch": _shape_mismatch, "truncated": _truncated,
         "bits=3": _three_bits, "group size": _bad_group_size}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_fails_with_one_clear_line(ckpt, tmp_path, case):
    names_in_message = CASES[case](ckpt)
    out = tmp_path / "engines" / "out"
    result = tpaware("convert", str(ckpt), "--tp", "2", "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in names_in_message:
        assert fragment in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no output, not even a partial folder


def test_tp_that_does_not_divide_the_heads(ckpt, tmp_path):
    out = tmp_path / "engines" / "out"
    result = tpaware("convert", str(ckpt), "--tp", "3", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {ckpt / 'config.json'}: tp=3 does not divide num_attention_heads=4"]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_good_checkpoint_converts_and_inspects(ckpt, tmp_path):
    result = tpaware("convert", str(ckpt), "--tp", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tp"] == 2 and set(manifest["files"]) >= {"rank0.safetensors", "rank1.safetensors"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    result = tpaware("inspect", str(ckpt))
    assert result.returncode == 0 and "down_proj" in result.stdout
