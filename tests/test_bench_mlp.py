"""The MLP benchmark's modes compute the same MLP: checked on CPU (gloo, the op's exact path) before any GPU timing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_mlp.py"


@pytest.mark.slow
def test_every_mode_matches_the_unsharded_mlp_at_tp2():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "256,1024", "--tp", "2",
                             "--models", "llama70b,granite20b"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = re.findall(r"^(\S+) (\d+x\d+) tp=2 (\S+): rel err (\S+)$", result.stdout, flags=re.M)
    assert {(model, mode) for model, _, mode, _ in errors} == {
        (model, mode) for model in ("llama70b", "granite20b") for mode in ("tpaware", "naive", "local-sort", "dense")}
    assert {shape for _, shape, _, _ in errors} == {"256x1024"}  # in the worker processes too, not the models' own
    assert all(float(err) < 1e-5 for _, _, _, err in errors)
