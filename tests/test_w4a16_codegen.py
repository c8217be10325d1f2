"""What the compiler makes of the W4A16 kernel for sm_90 (H100), checked on any machine.

`scripts/gemm_sass_report.py` compiles the kernel with the ptxas inside the Triton wheel, no GPU
needed.  These are the properties the speed rests on (plugins/NOTES.md), each of which a
plausible rewrite has broken before: no register spills; on the tensor-core path, the weight
words reach the wgmma operand registers without a round trip of the unpacked tile through shared
memory (v6 stored it with STS.128 and read it back with ldmatrix every K step, and ran 1.4x
slower); on the CUDA-core path, no barrier in the K loop.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# not imported here: this process may run the kernels in Triton's interpreter (see conftest.py); the report compiles
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gemm_sass_report.py"
DOT = ("16,128,128,4,dot", "16,64,128,4,dot", "16,256,64,8,dot", "16,128,128,4,dot,sk")
WS = "16,128,128,4,ws"  # the warp-specialized Gluon kernel (plugins/w4a16_ws.py)
WS2 = "16,128,128,4,ws2"  # the same with two consumer warpgroups
FMA = ("1,64,128,4,fma,pf", "2,64,128,4,fma,pf,px")


def _report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    out = subprocess.run([sys.executable, str(SCRIPT), "--json", *args], capture_output=True, text=True, env=env,
                         timeout=600, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
    configs = [arg for spec in DOT + FMA + (WS, WS2) for arg in ("--config", spec)]
    return {r["config"]: r for r in _report(*configs)}


@pytest.mark.parametrize("spec", DOT)
def test_dot_path_loads_words_into_the_operand_layout(reports, spec):
    r = reports[spec]
    assert r["stack_bytes"] == 0, r
    assert r["ldmatrix"] == 0 and r["opcodes"].get("STS.128", 0) == 0, r  # no unpacked tile through shared memory
    assert any(op.startswith("HGMMA") for op in r["opcodes"]), r  # wgmma, W^T from registers


def test_warp_specialized_loop_keeps_three_programs_per_sm(reports):
    """The Gluon kernel's consumer loop: wgmma with W^T from registers, no local memory, no unpacked tile through
    shared memory, fewer instructions per weight than the `tl` loop, and
    at most 80 registers at launch (3 programs of 8 warps per SM, the occupancy its speed was measured at)."""
    r, tl_loop = reports[WS], reports["16,128,128,4,dot"]
    assert any(op.startswith("HGMMA") for op in r["opcodes"]), r
    assert not any(op.startswith(("LDL", "STL")) for op in r["opcodes"]), r
    assert r["shared_stores"] == 0 and r["registers"] <= 80, r
    assert r["per_weight"] < tl_loop["per_weight"], (r, tl_loop)


def test_two_warpgroup_form_keeps_the_consumer_loop(reports):
    """With two consumer warpgroups the loop is the one-warpgroup loop (each takes every other K step), with no local
    memory and within the 128 registers at launch that `launch` asks for (`w4a16_ws.SHARED_MAXNREG`: one program of
    9 warps per SM)."""
    r, one = reports[WS2], reports[WS]
    assert any(op.startswith("HGMMA") for op in r["opcodes"]), r
    assert not any(op.startswith(("LDL", "STL")) for op in r["opcodes"]) and r["stack_bytes"] == 0, r
    assert r["registers"] <= 128 and r["shared_stores"] == 0, r
    assert abs(r["loop_instructions"] - one["loop_instructions"]) <= 8, (r, one)


@pytest.mark.parametrize("spec", DOT + FMA)
def test_launched_dependently_waits_before_reading(reports, spec):
    """With programmatic dependent launch a kernel may start before the one writing its X has finished.  (The Gluon
    kernel is launched plainly: with PDL it measured no faster, plugins/NOTES.md "Session 10".)"""
    assert reports[spec]["waits_before_reading"], reports[spec]


@pytest.mark.parametrize("spec", FMA)
def test_fma_path_has_no_barriers_or_spills(reports, spec):
    r = reports[spec]
    assert r["stack_bytes"] == 0 and r["barriers"] == 0 and r["shared_stores"] == 0, r


# Registers per thread that keep these tiles' programs per SM (65536 registers / (128 threads x budget)); the split-K
# epilogue once cost the 16x64x128 tile 30 more (a live column mask), one program per SM fewer.
REGISTER_BUDGET = {"16,64,128,4,dot": 96, "16,128,128,4,dot": 168, "16,128,128,4,dot,sk": 168, "1,64,128,4,fma,pf": 64}


@pytest.mark.parametrize("spec", REGISTER_BUDGET)
def test_register_budget(reports, spec):
    assert reports[spec]["registers"] <= REGISTER_BUDGET[spec], reports[spec]
