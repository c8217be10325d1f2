"""`tpaware export trtllm`: everything that can be checked without TensorRT-LLM (which cannot be installed here).

- names, shapes, dtypes and config.json fields of the unified checkpoint, Llama and GPTBigCode, tp 1/2/4;
- numerics: every exported linear dequantized with TensorRT-LLM's own formula `s * (q - 8) + zero`, plus the input
  gathers the shipped model class inserts, runs the TP forward and reproduces the unpermuted reference;
- the refusals (layouts the groupwise plugin cannot hold, missing TensorRT-LLM) and the SM preprocessing wiring, the
  latter against a stand-in `tensorrt_llm` module.
"""

from __future__ import annotations

import ast
import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.arch import ARCHES, Dims, layer_name
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.export import trtllm
from pipeline.gptq.checkpoint import Checkpoint, write_checkpoint
from pipeline.plan import rank_heads
from pipeline.reference import reference_model
from pipeline.runtime.comm import ThreadGroup
from pipeline.runtime.model import Transformer
from pipeline.shard import convert
from pipeline.synth import synth_checkpoint

DIMS = {  # the smallest shapes TensorRT-LLM takes unpadded at tp 4 with group size 64
    "llama": Dims(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=70),
    "gpt_bigcode": Dims(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=1, vocab=70),
}
TRT_LINEARS = {"llama": ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj"),
               "gpt_bigcode": ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj")}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """`source(model_type, **synth_kwargs)` -> (in-memory checkpoint, folder it is written to), cached."""
    cache: dict[tuple, tuple[Checkpoint, Path]] = {}

    def make(model_type: str, shared_qkv: bool = True, dims: Dims | None = None, group_size: int = 64):
        key = (model_type, shared_qkv, dims, group_size)
        if key not in cache:
            ckpt = synth_checkpoint(model_type, dims or DIMS[model_type], group_size=group_size,
                                    shared_act_order=shared_qkv)
            folder = tmp_path_factory.mktemp(f"{model_type}-src")
            write_checkpoint(folder, ckpt)
            cache[key] = ckpt, folder
        return cache[key]

    return make


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """`exported(model_type, tp, policy, dtype)` -> (checkpoint, exported folder, its config), cached."""
    cache: dict[tuple, tuple[Checkpoint, Path, dict]] = {}

    def make(model_type: str, tp: int, policy: str = "masked", dtype: torch.dtype = torch.float16):
        key = (model_type, tp, policy, dtype)
        if key not in cache:
            ckpt, src = source(model_type)
            folder = tmp_path_factory.mktemp(f"{model_type}-tp{tp}")
            convert(src, tp, folder / "ranks", policy)
            config = trtllm.export_trtllm(folder / "ranks", folder / "trtllm", sm=None, dtype=dtype)
            cache[key] = ckpt, folder / "trtllm", config
        return cache[key]

    return make


def expected_shapes(model_type: str, tp: int) -> dict[str, tuple[int, int]]:
    """[K, N] of every TensorRT-LLM linear on one rank, from the model's sizes alone."""
    d = DIMS[model_type]
    head_dim = d.hidden // d.heads
    qkv = (d.heads // tp + 2 * max(d.kv_heads // tp, 1)) * head_dim
    shapes = {"attention.qkv": (d.hidden, qkv), "attention.dense": (d.hidden, d.hidden),  # masked: whole o_proj
              "mlp.fc": (d.hidden, d.intermediate // tp), "mlp.proj": (d.intermediate // tp, d.hidden)}
    if model_type == "llama":
        shapes["mlp.gate"] = (d.hidden, d.intermediate // tp)
    return shapes


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_names_shapes_dtypes_and_config(exported, model_type, tp):
    _, folder, _ = exported(model_type, tp)
    d, group = DIMS[model_type], 64
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == {"llama": "LlamaForCausalLM", "gpt_bigcode": "GPTBigCodeForCausalLM"}[model_type]
    assert config["dtype"] == "float16"
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert config["quantization"] == {"quant_algo": "W4A16_GPTQ", "kv_cache_quant_algo": None, "group_size": group,
                                      "has_zero_point": True, "pre_quant_scale": False, "exclude_modules": ["lm_head"]}
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (
        d.hidden, d.intermediate, d.layers, d.heads, d.kv_heads, d.vocab)
    assert config["position_embedding_type"] == ("rope_gpt_neox" if model_type == "llama" else "learned_absolute")
    assert config["hidden_act"] == ("silu" if model_type == "llama" else "gelu")
    gathered = {"attention.qkv", "attention.dense", "mlp.fc", "mlp.gate"} & set(TRT_LINEARS[model_type])
    prefixes = [f"transformer.layers.{i}." for i in range(d.layers)]
    assert config["tpaware"]["gather"] == [p + m for p in prefixes for m in TRT_LINEARS[model_type] if m in gathered]
    assert config["tpaware"]["masked"] == [p + "attention.dense" for p in prefixes]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", trtllm.MODEL_FILE, *(f"rank{r}.safetensors" for r in range(tp))])

    biased = model_type == "gpt_bigcode"
    shapes = expected_shapes(model_type, tp)
    for r in range(tp):
        tensors = load_file(folder / f"rank{r}.safetensors")
        expected = {"transformer.vocab_embedding.weight": ((d.vocab, d.hidden), torch.float16),
                    "transformer.ln_f.weight": ((d.hidden,), torch.float16),
                    "lm_head.weight": ((-(-d.vocab // tp), d.hidden), torch.float16)}
        if biased:
            expected["transformer.position_embedding.weight"] = ((2048, d.hidden), torch.float16)
            expected["transformer.ln_f.bias"] = ((d.hidden,), torch.float16)
        for prefix in prefixes:
            for norm in ("input_layernorm", "post_layernorm"):
                for part in ("weight", "bias") if biased else ("weight",):
                    expected[f"{prefix}{norm}.{part}"] = ((d.hidden,), torch.float16)
            for module, (k, n) in shapes.items():
                name = prefix + module
                expected[f"{name}.weight"] = ((k, n // 2), torch.int8)
                expected[f"{name}.weights_scaling_factor"] = ((k // group, n), torch.float16)
                expected[f"{name}.zero"] = ((k // group, n), torch.float16)
                if biased:
                    expected[f"{name}.bias"] = ((n,), torch.float16)
                if module in gathered:
                    expected[f"{name}.in_perm"] = ((k,), torch.int32)
            expected[f"{prefix}attention.dense.in_mask"] = ((d.hidden,), torch.float16)
        assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == expected
        for prefix in prefixes:  # the paper's point: the MLP's down projection gathers nothing
            assert f"{prefix}mlp.proj.in_perm" not in tensors
            if biased and r > 0:  # row-parallel bias: added once, by rank 0, before the all-reduce
                assert not any(tensors[f"{prefix}{m}.bias"].any() for m in ("mlp.proj", "attention.dense"))
            mask = tensors[f"{prefix}attention.dense.in_mask"]
            assert mask.sum().item() == d.hidden // tp  # this rank's heads, and only them


def decode_linear(tensors: dict[str, torch.Tensor], module: str):
    """An exported linear as TensorRT-LLM computes it: W = s * (q - 8) + zero, input x[..., in_perm] * in_mask."""
    packed = tensors[f"{module}.weight"].view(torch.uint8).to(torch.int16)
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles).double()  # q - 8
    scales = tensors[f"{module}.weights_scaling_factor"].double()
    group = torch.arange(signed.shape[0]) // (signed.shape[0] // scales.shape[0])
    weight = scales[group] * signed + tensors[f"{module}.zero"].double()[group]
    bias, perm, mask = (tensors.get(f"{module}.{part}") for part in ("bias", "in_perm", "in_mask"))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if perm is not None:
            x = x[..., perm.long()]
        if mask is not None:
            x = x * mask.double()
        y = x @ weight
        return y if bias is None else y + bias.double()

    return forward


def exported_rank_model(folder: Path, config: dict, model_type: str, rank: int, comm) -> Transformer:
    """One rank's forward built from the exported checkpoint only (its config.json and rank files)."""
    arch, tp = ARCHES[model_type], config["mapping"]["tp_size"]
    dims = Dims(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"])
    ranks = [load_file(folder / f"rank{r}.safetensors") for r in range(tp)]
    tensors, heads = ranks[rank], rank_heads(dims, tp)[rank]
    dense = {f"{arch.embed}.weight": tensors["transformer.vocab_embedding.weight"],
             f"{arch.lm_head}.weight": torch.cat([t["lm_head.weight"] for t in ranks])[:dims.vocab],
             **{f"{arch.final_norm}.{p}": v for p in ("weight", "bias") if (v := tensors.get(f"transformer.ln_f.{p}"))
                is not None}}
    if arch.positions:
        dense[f"{arch.positions}.weight"] = tensors["transformer.position_embedding.weight"]
    linears = {}
    d = dims.head_dim
    for i in range(dims.layers):
        prefix = f"transformer.layers.{i}."
        for ours, theirs in zip(arch.norms, ("input_layernorm", "post_layernorm")):
            for p in ("weight", "bias"):
                if f"{prefix}{theirs}.{p}" in tensors:
                    dense[f"{layer_name(arch, i, ours)}.{p}"] = tensors[f"{prefix}{theirs}.{p}"]
        qkv = decode_linear(tensors, prefix + "attention.qkv")
        if len(arch.qkv) == 1:
            linears[layer_name(arch, i, arch.qkv[0])] = qkv
        else:  # TensorRT-LLM's fused qkv, split back into the [q | k | v] columns of this rank
            widths = [heads.q_count * d, heads.kv_count * d, heads.kv_count * d]
            starts = [0, widths[0], widths[0] + widths[1]]
            for n, start, width in zip(arch.qkv, starts, widths):
                linears[layer_name(arch, i, n)] = lambda x, f=qkv, s=start, w=width: f(x)[..., s:s + w]
        theirs = dict(zip((arch.o_proj, *arch.mlp_in, arch.mlp_out), TRT_LINEARS[model_type][1:]))
        for ours, module in theirs.items():
            linears[layer_name(arch, i, ours)] = decode_linear(tensors, prefix + module)
    hf = {"rms_norm_eps": config["norm_epsilon"], "layer_norm_epsilon": config["norm_epsilon"],
          "rope_theta": config.get("rotary_base", 10000.0)}
    return Transformer(arch, dims, hf, heads, {k: v.double() for k, v in dense.items()}, linears, comm)


@pytest.mark.parametrize("tp,policy", [(1, "local"), (1, "masked"), (2, "masked"), (4, "masked")])
@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_trtllm_formula_and_gathers_reproduce_the_reference(exported, model_type, tp, policy):
    # fp32 export: TensorRT-LLM stores `zero` in the model dtype; in fp32 it is exact, so any error is the layout's
    ckpt, folder, config = exported(model_type, tp, policy, torch.float32)
    ids = torch.randint(0, DIMS[model_type].vocab, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = reference_model(ckpt)(ids)
    group = ThreadGroup(tp)

    def run(rank: int) -> torch.Tensor:
        return exported_rank_model(folder, config, model_type, rank, group.comm(rank))(ids)

    with ThreadPoolExecutor(max_workers=tp) as pool:
        logits = list(pool.map(run, range(tp)))
    for rank_logits in logits:
        assert torch.allclose(rank_logits, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_fp16_export_rounds_only_the_additive_zero(exported):
    _, folder16, _ = exported("llama", 2)
    _, folder32, _ = exported("llama", 2, dtype=torch.float32)
    fp16, fp32 = load_file(folder16 / "rank1.safetensors"), load_file(folder32 / "rank1.safetensors")
    for name, tensor in fp16.items():
        if name.endswith(".zero"):
            assert torch.equal(tensor, fp32[name].half())  # (8 - z) * s, exact in fp32, rounded once
        else:  # scales, norms and embeddings were fp16 to begin with; packed weights and indices are integers
            assert torch.equal(tensor.to(fp32[name].dtype), fp32[name])


def test_pack_int4_layout():
    q = torch.tensor([[0, 15, 8, 9], [7, 1, 3, 12]], dtype=torch.uint8)
    assert trtllm.pack_int4(q).view(torch.uint8).tolist() == [[0x78, 0x10], [0x9F, 0x4B]]
    zeros, scales = torch.tensor([[3, 8]], dtype=torch.uint8), torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    assert trtllm.additive_zero(zeros, scales, torch.float32).tolist() == [[2.5, 0.0]]


def test_lm_head_is_padded_and_split_by_vocab():
    head = torch.arange(10.0).view(5, 2)
    shards = [trtllm.lm_head_shard(head, 2, r) for r in range(2)]
    assert [s.shape[0] for s in shards] == [3, 3]
    assert torch.equal(torch.cat(shards)[:5], head) and not shards[1][-1].any()


@pytest.mark.parametrize("kind", ["qkv_act_orders", "local_o_proj", "group_size", "padding"])
def test_refuses_what_the_groupwise_plugin_cannot_hold(source, tmp_path, kind):
    model_type, tp, policy, kwargs = "llama", 2, "masked", {}
    if kind == "qkv_act_orders":
        kwargs = {"shared_qkv": False}
    elif kind == "local_o_proj":
        policy = "local"
    elif kind == "group_size":
        kwargs = {"group_size": 32}
    else:  # hidden 384 is no multiple of max(64, 128) * 2: TensorRT-LLM would pad qkv's K
        kwargs = {"dims": Dims(hidden=384, intermediate=512, layers=1, heads=6, kv_heads=2, vocab=64),
                  "group_size": 128}
    _, src = source(model_type, **kwargs)
    convert(src, tp, tmp_path / "ranks", policy)
    message = {"qkv_act_orders": "different act orders", "local_o_proj": "--attn-policy masked",
               "group_size": "64 or 128",
               "padding": r"K=384 is not a multiple of max\(64, group_size\) \* tp = 256"}[kind]
    with pytest.raises(InputError, match=message):
        trtllm.export_trtllm(tmp_path / "ranks", tmp_path / "out", sm=None)
    assert not (tmp_path / "out").exists()


def fake_tensorrt_llm(monkeypatch, preprocess) -> None:
    """Stand in for `tensorrt_llm.quantization.functional`, the only TensorRT-LLM module the export imports."""
    for name in ("tensorrt_llm", "tensorrt_llm.quantization", "tensorrt_llm.quantization.functional"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["tensorrt_llm.quantization.functional"].preprocess_weights_for_mixed_gemm = preprocess


def test_sm_preprocessing_calls_tensorrt_llm(exported, monkeypatch, tmp_path):
    calls = []

    def preprocess(tensor, quant_mode, act_dtype, sm_=-1, do_weight_interleave=True):
        calls.append((tuple(tensor.shape), quant_mode, act_dtype, sm_))
        return tensor.flip(0)  # any reordering: the export must store what TensorRT-LLM returns

    fake_tensorrt_llm(monkeypatch, preprocess)
    _, plain, _ = exported("gpt_bigcode", 2)
    config = trtllm.export_trtllm(plain.parent / "ranks", tmp_path / "sm90", sm=90)
    assert config["tpaware"]["preprocessed_for_sm"] == 90
    assert calls and all(c[1:] == (torch.quint4x2, torch.float16, 90) for c in calls)
    before, after = load_file(plain / "rank0.safetensors"), load_file(tmp_path / "sm90" / "rank0.safetensors")
    for name in (n for n in before if n.endswith(".weight") and before[n].dtype == torch.int8):
        k, half_n = before[name].shape
        assert after[name].dtype == torch.float16 and after[name].shape == (k, half_n // 2)  # [K, N/4] as fp16
        assert torch.equal(after[name].view(torch.int8), before[name].flip(0))


def test_sm_preprocessing_refuses_without_or_with_an_old_tensorrt_llm(exported, monkeypatch, tmp_path):
    _, plain, _ = exported("llama", 1)
    with pytest.raises(InputError, match="tensorrt_llm is not importable.*--no-preprocess"):
        trtllm.export_trtllm(plain.parent / "ranks", tmp_path / "out", sm=90)
    fake_tensorrt_llm(monkeypatch, lambda tensor, quant_mode, act_dtype: tensor)
    with pytest.raises(InputError, match="takes no target SM"):
        trtllm.export_trtllm(plain.parent / "ranks", tmp_path / "out", sm=90)


def test_build_refuses_plain_packing_other_gpus_and_missing_trtllm_build(exported, monkeypatch, tmp_path):
    _, plain, _ = exported("llama", 2)
    with pytest.raises(InputError, match="--no-preprocess"):
        trtllm.build_trtllm(plain)
    with pytest.raises(InputError, match="tpaware export trtllm"):
        trtllm.build_trtllm(tmp_path)
    fake_tensorrt_llm(monkeypatch, lambda tensor, quant_mode, act_dtype, sm_=-1: tensor)
    ranks = plain.parent / "ranks"
    trtllm.export_trtllm(ranks, trtllm.default_checkpoint_dir(ranks), sm=90)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0))
    with pytest.raises(InputError, match="laid out for SM 90, this GPU is SM 80"):
        trtllm.build_trtllm(ranks)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtllm-build anywhere
    with pytest.raises(InputError, match="trtllm-build not found.*pip install"):
        trtllm.build_trtllm(ranks)  # finds the checkpoint beside the per-rank folder

    fake = tmp_path / "trtllm-build"  # a stand-in that records its arguments
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n")
    fake.chmod(0o755)
    engines = trtllm.build_trtllm(ranks, extra_args=["--max_batch_size", "8"])
    ckpt = trtllm.default_checkpoint_dir(ranks)
    assert engines == ranks.resolve().with_name("ranks-trtllm")
    assert (tmp_path / "args").read_text().split() == [
        "--checkpoint_dir", str(ckpt), "--output_dir", str(engines), "--model_cls_file", str(ckpt / trtllm.MODEL_FILE),
        "--model_cls_name", "TpawareLLaMAForCausalLM", "--workers", "2", "--max_batch_size", "8"]


def test_model_class_file_matches_the_export():
    """The shipped file cannot be imported here (it imports tensorrt_llm); check it names what the export writes."""
    source = (Path(trtllm.__file__).with_name("trtllm_model.py")).read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {t.model_cls for t in trtllm.TARGETS.values()} <= classes
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"gather", "masked", "int32"} <= strings
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert {"in_perm", "in_mask", "tpaware"} <= attributes
    imports = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(m.startswith("tensorrt_llm") for m in imports)  # standalone: trtllm-build loads it by path


def test_cli_export_trtllm(exported, tmp_path):
    _, plain, _ = exported("llama", 1)
    runner = CliRunner()
    result = runner.invoke(app, ["export", "trtllm", str(plain.parent / "ranks"), "--no-preprocess",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "config.json").is_file()
    result = runner.invoke(app, ["export", "trtllm", str(plain.parent / "ranks"), "--sm", "90",
                                 "--out", str(tmp_path / "sm")])
    assert result.exit_code == 2 and "tensorrt_llm is not importable" in result.output
    assert not (tmp_path / "sm").exists()
    result = runner.invoke(app, ["export", "trtllm", str(plain.parent / "ranks")])  # neither --sm nor --no-preprocess
    assert result.exit_code == 2 and "--no-preprocess" in result.output
