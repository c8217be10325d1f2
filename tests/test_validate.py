"""`tpaware validate`: the transformers reference built from the per-rank folder alone, the metrics, the thresholds,
the table and JSON, and the exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.arch import Dims
from pipeline.cli import app
from pipeline.gptq.checkpoint import read_checkpoint, write_checkpoint
from pipeline.gptq.layer import dequantize
from pipeline.reference import reference_model
from pipeline.runtime.comm import Comm
from pipeline.runtime.generate import Generation
from pipeline.runtime.loader import load_rank_model
from pipeline.shard import convert
from pipeline.synth import synth_checkpoint
from pipeline.validate import Thresholds, checks, compare, hf_reference, hf_state_dict, thresholds_for, validate


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    def make(model_type: str, tp: int):
        folder = tmp_path_factory.mktemp(f"{model_type}-tp{tp}") / "engine"
        convert(tiny_checkpoint(model_type, group_size=32), tp, folder)
        return folder

    return make


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_hf_state_dict_is_the_dequantized_checkpoint(tiny_checkpoint, engine, model_type):
    """From the tp=2 rank files alone: every weight is the original layer dequantized and transposed to HF's [N, K],
    every bias and dense tensor the checkpoint's, bit for bit."""
    ckpt = read_checkpoint(tiny_checkpoint(model_type, group_size=32))
    state = hf_state_dict(engine(model_type, 2))
    expected = {k: v.double() for k, v in ckpt.dense.items()}
    for name, layer in ckpt.layers.items():
        expected[f"{name}.weight"] = dequantize(layer).T
        if layer.bias is not None:
            expected[f"{name}.bias"] = layer.bias.double()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_transformers_reference_agrees_with_ours(tiny_checkpoint, engine, model_type):
    """Two independent forwards of the same unpermuted weights: transformers' class and our tp=1 reference (fp64).

    They differ by ~1e-7 of the logit scale, not 1e-15, because HF's RMSNorm and RoPE compute in fp32 even for an fp64
    model; a wrong transpose, tied head or norm would differ at the scale of the logits.
    """
    hf = hf_reference(engine(model_type, 1))
    ours = reference_model(read_checkpoint(tiny_checkpoint(model_type, group_size=32)))
    ids = torch.randint(0, ours.dims.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
    expected = ours(ids)
    assert (theirs - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_transformers5_rope_parameters_are_read(tmp_path):
    """A config saved by transformers 5 has RoPE's base only in `rope_parameters`; ours must use it too."""
    ckpt = synth_checkpoint("llama", Dims(64, 128, 1, 4, 2, 64), group_size=32)
    del ckpt.config["rope_theta"]
    ckpt.config["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    write_checkpoint(tmp_path / "src", ckpt)
    convert(tmp_path / "src", 1, tmp_path / "engine")
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf_reference(tmp_path / "engine")(ids).logits
    ours = load_rank_model(tmp_path / "engine", Comm(0, 1), torch.float64)(ids)
    assert (theirs - ours).abs().max() <= 1e-5 * theirs.abs().max()


def test_metrics_and_checks():
    logits = torch.rand(2, 4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits[1, 3, 5], logits[1, 3, 4] = 2.0, 1.9  # row 1's 2nd token (position 3): reference prefers 5 over 4 by 0.1
    ours = Generation(torch.tensor([[1, 2], [3, 4]]), logits)
    ref = logits.clone()
    ref[0, 0] = -ref[0, 0]  # one position flipped: cosine -1 there, its top-1 differs
    m = compare(ours, torch.tensor([[1, 2], [3, 5]]), ref)
    assert m.max_abs_err == pytest.approx(2 * logits[0, 0].abs().max().item())
    assert m.min_cosine == pytest.approx(-1.0)
    assert m.top1 == pytest.approx(7 / 8)
    assert m.token_match == pytest.approx(3 / 4)
    assert m.tie_margin == pytest.approx(0.1)
    failed = [c.name for c in checks(m, Thresholds(1e9, -1.5, 0.8, 0.1 + 1e-9)) if not c.ok]
    assert failed == []
    failed = [c.name for c in checks(m, Thresholds(1e-3, 0.5, 0.9, 0.05)) if not c.ok]
    assert failed == ["max |logit error|", "min cosine per position", "top-1 agreement", "greedy tokens"]
    assert thresholds_for(torch.float16, max_abs_err=0.2).max_tie_margin == pytest.approx(0.4)


@pytest.mark.slow
def test_validate_command_passes_and_writes_json(engine, tmp_path):
    folder = engine("gpt_bigcode", 2)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["validate", str(folder), "--mode", "naive", "--max-tokens", "3",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "greedy tokens" in result.output and "passed" in result.output
    report = json.loads(out.read_text())
    assert report["passed"] and report["tp"] == 2 and report["mode"] == "naive"
    assert report["collectives_per_layer"] == {"all_gather": 1.0, "all_reduce": 2.0}
    assert report["metrics"]["tokens"] == report["metrics"]["ref_tokens"]
    assert report["metrics"]["max_abs_err"] <= 1e-5 * report["metrics"]["max_abs_ref"]


@pytest.mark.slow
def test_validate_command_fails_a_threshold(engine):
    """A bound no fp32 run can meet: the table says FAIL, the JSON (default path) says so, the exit code is 1."""
    folder = engine("llama", 1)
    result = CliRunner().invoke(app, ["validate", str(folder), "--max-tokens", "2", "--max-abs-err", "1e-12"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    report = json.loads((folder / "validate.json").read_text())
    assert not report["passed"] and report["failures"][0].startswith("max |logit error|")
    assert report["collectives_per_layer"] == {"all_reduce": 2.0}


def test_validate_command_refuses_bad_options(engine, tmp_path):
    runner = CliRunner()
    folder = str(engine("llama", 2))
    for args in ([folder, "--mode", "bogus"], [folder, "--dtype", "int8"], [folder, "--device", "tpu"],
                 [str(tmp_path)]):
        result = runner.invoke(app, ["validate", *args])
        assert result.exit_code == 2, (args, result.output)


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_nccl_fp16_validates(engine, tp):
    """On GPUs: one process per GPU over NCCL, fp16, W4A16 kernel where plugins provide it, within fp16 bounds."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA device(s)")
    report = validate(engine("llama", tp), device="cuda", dtype=torch.float16, max_tokens=8)
    assert report.passed, report.failures
    assert report.collectives_per_layer == {"all_reduce": 2.0}
