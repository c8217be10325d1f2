"""Export a per-rank folder as a TensorRT-LLM unified checkpoint, and build it with `trtllm-build`.

TensorRT-LLM never supported act-order GPTQ: its converter refuses `desc_act=True`, its loaders never read `g_idx`, and
its groupwise plugin (group size 64 or 128) has no permutation input. Our per-rank files already hold act-order-sorted
shards with whole groups, so the export is names and packing only: no second TP split, no requantization.

Targets the engine-era releases (0.2x to 1.2.x, TensorRT 10.x: `trtllm-build`, unified checkpoint = `config.json` +
`rank{r}.safetensors`); the PyTorch backend that replaced them cannot load GPTQ at all. Per quantized linear the
checkpoint holds `weight` (int4, two per byte along N, after TensorRT-LLM's SM-specific
`preprocess_weights_for_mixed_gemm`, viewed as fp16: [K, N/4]), `weights_scaling_factor` [K/G, N] and `zero`
[K/G, N], an additive term: the plugin computes `W = s * (q - 8) + zero`, so `zero = (8 - z) * s`.

What stock TensorRT-LLM lacks is the local input gather `X[:, in_perm]` of the column-parallel layers: the shipped
model class (`trtllm_model.py`, passed to `trtllm-build --model_cls_file`) adds it where `config.json` says so. The
MLP's down projection needs none, which is the point of the TP-aware plan. Two layouts cannot be expressed and are
refused: q/k/v with different act orders (TensorRT-LLM fuses them into one linear with one input), and row-parallel
shards whose groups are split across ranks (the local-sort policy), which the plugin's uniform groups cannot hold.
o_proj under `--attn-policy masked` is exported whole on every rank with a gather-and-mask input (exact).
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.arch import ARCHES, GPT_BIGCODE, LLAMA, Arch, layer_name
from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import save_tensors
from pipeline.gptq.layer import QuantLinear
from pipeline.plan import RankHeads
from pipeline.rankfolder import TOKENIZER_FILES, read_manifest, read_rank, rank_file
from pipeline.runtime.linear import shard_layer
from pipeline.runtime.loader import quant_tensor_names
from pipeline.runtime.model import rope_theta

MODEL_FILE = "tpaware_trtllm_model.py"
GROUP_SIZES = (64, 128)  # the only group sizes TensorRT-LLM's groupwise plugin takes
INSTALL_HINT = ("install an engine-era TensorRT-LLM (0.2x to 1.2.x; Linux, CUDA GPU, Python 3.10/3.12): "
                "pip install 'tensorrt-llm<1.3' --extra-index-url https://pypi.nvidia.com")
Preprocess = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """How one of our architectures is named in TensorRT-LLM."""

    architecture: str  # config.json `architecture`, which picks TensorRT-LLM's config class
    model_cls: str  # the class in trtllm_model.py that `trtllm-build --model_cls_name` loads
    linears: dict[str, tuple[str, ...]]  # TensorRT-LLM module -> our layers, concatenated along N in this order
    norms: dict[str, str]  # our per-layer norm -> TensorRT-LLM's
    biases: bool  # every linear has a bias (row-parallel ones only on rank 0 in our files)


TARGETS = {
    "llama": Target("LlamaForCausalLM", "TpawareLLaMAForCausalLM",
                    {"attention.qkv": LLAMA.qkv, "attention.dense": (LLAMA.o_proj,),
                     "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",), "mlp.proj": (LLAMA.mlp_out,)},
                    {"input_layernorm": "input_layernorm", "post_attention_layernorm": "post_layernorm"}, False),
    "gpt_bigcode": Target("GPTBigCodeForCausalLM", "TpawareGPTForCausalLM",
                          {"attention.qkv": GPT_BIGCODE.qkv, "attention.dense": (GPT_BIGCODE.o_proj,),
                           "mlp.fc": GPT_BIGCODE.mlp_in, "mlp.proj": (GPT_BIGCODE.mlp_out,)},
                          {"ln_1": "input_layernorm", "ln_2": "post_layernorm"}, True),
}


# --- the math: pure functions of tensors -------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [K, N] (0..15) -> int8 [K, N/2]: signed `q - 8`, two per byte along N, even column in the low nibble.

    This is the layout TensorRT-LLM packs a GPTQ weight into before `preprocess_weights_for_mixed_gemm`.
    """
    signed = (q.to(torch.int16) - 8) & 0xF
    return (signed[:, 0::2] | (signed[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)


def additive_zero(zeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plugin's `zero` = (8 - z) * s, so that `s * (q - 8) + zero == s * (q - z)`.

    Computed in fp32, where the product of an fp16 scale and a small integer is exact; the cast to the model dtype is
    the one rounding TensorRT-LLM's format itself imposes (the zero is stored in the model dtype).
    """
    return ((8 - zeros.float()) * scales.float()).to(dtype)


def fuse(parts: list[QuantLinear], in_perms: list[torch.Tensor | None], names: tuple[str, ...]
         ) -> tuple[QuantLinear, torch.Tensor | None]:
    """Concatenate layers that share one input along N (q, k, v -> qkv); they must gather that input identically."""
    first = in_perms[0]
    for name, perm in zip(names[1:], in_perms[1:]):
        if (perm is None) != (first is None) or (perm is not None and not torch.equal(perm, first)):
            raise InputError(f"{names[0]} and {name} have different act orders (g_idx): TensorRT-LLM fuses them into "
                             "one linear that can gather its input only one way", tensor=f"{name}.in_perm")
    if len(parts) == 1:
        return parts[0], first
    biases = [p.bias for p in parts]
    return QuantLinear(q=torch.cat([p.q for p in parts], 1), zeros=torch.cat([p.zeros for p in parts], 1),
                       scales=torch.cat([p.scales for p in parts], 1), g_idx=parts[0].g_idx,
                       group_size=parts[0].group_size,
                       bias=None if biases[0] is None else torch.cat(biases)), first


def masked_gather(in_perm: torch.Tensor | None, heads: RankHeads, head_dim: int, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked o_proj's input as an index into this rank's own heads and a 0/1 mask.

    Our runtime places the rank's heads in a zero-filled full-width input and then gathers `full[..., in_perm]`.
    The same vector is `x_local[..., index] * mask`: one gather, one multiply, no zero-filled buffer in the graph.
    """
    source = torch.arange(width) if in_perm is None else in_perm.long()
    local = source - heads.q_start * head_dim
    own = (local >= 0) & (local < heads.q_count * head_dim)
    return torch.where(own, local, 0).to(torch.int32), own


def lm_head_shard(weight: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """TensorRT-LLM's lm_head is column-parallel: vocab padded with zero rows to a multiple of tp, then split."""
    pad = -weight.shape[0] % tp
    padded = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight
    return padded.chunk(tp)[rank]


# --- what the manifest allows ------------------------------------------------------------------------------------

def target_of(manifest: dict) -> Target:
    if manifest["arch"] not in TARGETS:
        raise InputError(f"arch {manifest['arch']!r} has no TensorRT-LLM export (supported: {', '.join(TARGETS)})")
    return TARGETS[manifest["arch"]]


def _modules(manifest: dict, target: Target) -> Iterable[tuple[str, tuple[str, ...]]]:
    """(TensorRT-LLM module, our layer names) for every quantized linear of the model."""
    arch = ARCHES[manifest["arch"]]
    for i in range(manifest["dims"]["layers"]):
        for module, ours in target.linears.items():
            yield f"transformer.layers.{i}.{module}", tuple(layer_name(arch, i, n) for n in ours)


def check_exportable(manifest: dict, target: Target) -> int:
    """Refuse, with the reason, any layout TensorRT-LLM cannot hold; return the (one) group size."""
    tp, layers, o_proj = manifest["tp"], manifest["layers"], ARCHES[manifest["arch"]].o_proj
    group_sizes = {layers[n]["group_size"] for _, names in _modules(manifest, target) for n in names}
    if len(group_sizes) != 1 or not group_sizes <= set(GROUP_SIZES):
        raise InputError(f"group sizes {sorted(group_sizes)}: TensorRT-LLM's groupwise plugin takes one group size, "
                         f"{' or '.join(map(str, GROUP_SIZES))}")
    group_size = group_sizes.pop()
    multiple = max(64, group_size)
    for module, names in _modules(manifest, target):
        for name in names:
            if not all(layers[name]["contiguous_groups"]):
                raise InputError(_split_groups_reason(layers[name], name.endswith(o_proj)), tensor=f"{name}.g_idx")
        info = layers[names[0]]
        k = info["shape_per_rank"][0][0]
        n = sum(layers[name]["shape_per_rank"][0][1] for name in names)
        # TensorRT-LLM pads a linear whose full K or N is not a multiple of max(64, G) * tp; our shards are not padded
        full = (k, n * tp) if info["parallel"] == "column" else (k * tp, n)
        for dim, size in zip("KN", full):
            if size % (multiple * tp):
                raise InputError(f"{module}: {dim}={size} is not a multiple of max(64, group_size) * tp = "
                                 f"{multiple * tp}; TensorRT-LLM would pad it, and padding is not exported")
    return group_size


def _split_groups_reason(info: dict, is_o_proj: bool) -> str:
    if is_o_proj and info["policy"] == "local-sort":
        return ("o_proj keeps groups split across ranks (--attn-policy local), which TensorRT-LLM's groupwise plugin "
                "cannot express: re-convert with --attn-policy masked")
    return (f"groups are split across ranks ({info['policy']}: {info['reason']}), which TensorRT-LLM's groupwise "
            "plugin cannot express")


def gather_modules(manifest: dict, target: Target) -> tuple[list[str], list[str]]:
    """The modules that gather their input on some rank (so on every rank), and the masked (whole) o_proj ones."""
    layers = manifest["layers"]
    masked = manifest["attn_policy"] == "masked"
    gather, whole = [], []
    for module, names in _modules(manifest, target):
        if masked and module.endswith(".attention.dense"):
            whole.append(module)
            gather.append(module)
        elif any(any(layers[name]["gathers_input"]) for name in names):
            gather.append(module)
    return gather, whole


# --- config and tensors ------------------------------------------------------------------------------------------

def trtllm_config(manifest: dict, target: Target, group_size: int, dtype: torch.dtype, sm: int | None,
                  gather: list[str], whole: list[str]) -> dict:
    """TensorRT-LLM's config.json, plus a `tpaware` block that the shipped model class reads."""
    dims, hf, tp = manifest["dims"], manifest["config"], manifest["tp"]
    config = {
        "architecture": target.architecture,
        "dtype": str(dtype).removeprefix("torch."),
        "logits_dtype": "float32",
        "vocab_size": dims["vocab"],
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": "W4A16_GPTQ", "kv_cache_quant_algo": None, "group_size": group_size,
                         "has_zero_point": True, "pre_quant_scale": False, "exclude_modules": ["lm_head"]},
        "tpaware": {"tool": manifest["tool"], "source": manifest["source"], "model_cls_name": target.model_cls,
                    "preprocessed_for_sm": sm, "gather": gather, "masked": whole},
    }
    if target.biases:
        config.update(hidden_act="gelu", bias=True, position_embedding_type="learned_absolute",
                      max_position_embeddings=hf.get("n_positions", 2048),
                      norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    else:
        config.update(hidden_act="silu", position_embedding_type="rope_gpt_neox",
                      max_position_embeddings=hf.get("max_position_embeddings", 2048),
                      norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=rope_theta(hf),
                      rotary_scaling=hf.get("rope_scaling"))
    return config


def rank_checkpoint(manifest: dict, tensors: dict[str, torch.Tensor], rank: int, dtype: torch.dtype,
                    preprocess: Preprocess | None) -> dict[str, torch.Tensor]:
    """Every TensorRT-LLM tensor of one rank, from that rank's file only."""
    target, arch = target_of(manifest), ARCHES[manifest["arch"]]
    gather, whole = gather_modules(manifest, target)
    heads, head_dim = RankHeads(**manifest["heads"][rank]), manifest["dims"]["hidden"] // manifest["dims"]["heads"]
    out: dict[str, torch.Tensor] = {}
    for module, names in _modules(manifest, target):
        parts = [shard_layer(tensors, n, manifest["layers"][n]["group_size"]) for n in names]
        layer, in_perm = fuse(parts, [tensors.get(f"{n}.in_perm") for n in names], names)
        out.update(linear_tensors(module, layer, dtype, preprocess, target.biases))
        if module in whole:
            index, mask = masked_gather(in_perm, heads, head_dim, layer.in_features)
            out[f"{module}.in_perm"], out[f"{module}.in_mask"] = index, mask.to(dtype)
        elif module in gather:
            out[f"{module}.in_perm"] = (torch.arange(layer.in_features) if in_perm is None else in_perm).to(torch.int32)
    quant = quant_tensor_names(manifest)
    out.update(dense_tensors(manifest, arch, target, {k: v for k, v in tensors.items() if k not in quant}, rank, dtype))
    return out


def linear_tensors(module: str, layer: QuantLinear, dtype: torch.dtype, preprocess: Preprocess | None,
                   biases: bool) -> dict[str, torch.Tensor]:
    """One groupwise-quantized linear: packed weight, scales, additive zero and (zero-filled if absent) bias."""
    packed = pack_int4(layer.q)
    out = {
        f"{module}.weight": packed if preprocess is None else preprocess(packed).view(dtype),
        f"{module}.weights_scaling_factor": layer.scales.to(dtype),
        f"{module}.zero": additive_zero(layer.zeros, layer.scales, dtype),
    }
    if layer.bias is not None and not biases:
        raise InputError("this architecture's TensorRT-LLM model has no linear biases", tensor=f"{module}.bias")
    if biases:  # row-parallel biases are added by the plugin before the all-reduce: rank 0 holds it, the rest zeros
        out[f"{module}.bias"] = (layer.bias if layer.bias is not None
                                 else torch.zeros(layer.out_features)).to(dtype)
    return out


def dense_tensors(manifest: dict, arch: Arch, target: Target, tensors: dict[str, torch.Tensor], rank: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Embeddings, norms and the lm_head (split by vocab); any other tensor is refused rather than dropped."""
    names = {f"{arch.embed}.weight": "transformer.vocab_embedding.weight"}
    if arch.positions:
        names[f"{arch.positions}.weight"] = "transformer.position_embedding.weight"
    suffixes = ("weight", "bias") if target.biases else ("weight",)
    for suffix in suffixes:
        names[f"{arch.final_norm}.{suffix}"] = f"transformer.ln_f.{suffix}"
        for i in range(manifest["dims"]["layers"]):
            for ours, theirs in target.norms.items():
                names[f"{layer_name(arch, i, ours)}.{suffix}"] = f"transformer.layers.{i}.{theirs}.{suffix}"
    lm_head = f"{arch.lm_head}.weight"
    unknown = sorted(set(tensors) - set(names) - {lm_head})
    if unknown:
        raise InputError(f"{len(unknown)} tensor(s) have no TensorRT-LLM name, e.g. '{unknown[0]}'")
    out = {theirs: tensors[ours].to(dtype) for ours, theirs in names.items() if ours in tensors}
    missing = sorted(set(names.values()) - set(out))
    if missing:
        raise InputError(f"missing from the rank file: TensorRT-LLM needs '{missing[0]}'")
    head = tensors.get(lm_head, tensors[f"{arch.embed}.weight"])  # tied embeddings: an explicit copy
    out["lm_head.weight"] = lm_head_shard(head, manifest["tp"], rank).to(dtype).clone()  # own storage for safetensors
    return out


# --- I/O at the edges ---------------------------------------------------------------------------------------------

def sm_preprocessor(sm: int) -> Preprocess:
    """TensorRT-LLM's own `preprocess_weights_for_mixed_gemm` for GPU architecture `sm` (e.g. 90 for H100)."""
    try:
        from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm as preprocess
    except ImportError as e:
        raise InputError(f"tensorrt_llm is not importable ({e}); the SM-specific weight layout needs its "
                         f"preprocess_weights_for_mixed_gemm: {INSTALL_HINT}, or pass --no-preprocess for the plain "
                         "int8 packing") from None
    if "sm_" not in inspect.signature(preprocess).parameters:
        raise InputError("this TensorRT-LLM's preprocess_weights_for_mixed_gemm takes no target SM (too old): "
                         f"{INSTALL_HINT}")
    return lambda packed: preprocess(packed, torch.quint4x2, torch.float16, sm_=sm)


def export_trtllm(folder: Path, out: Path, sm: int | None, dtype: torch.dtype = torch.float16,
                  track: Callable[[Iterable], Iterable] = iter) -> dict:
    """Write the TensorRT-LLM checkpoint of per-rank folder `folder` to `out`; `sm=None` skips the SM preprocessing.

    `dtype` is the model dtype: float16 for TensorRT-LLM (GPTQ scales are fp16, so nothing but the additive zero is
    rounded); float32 exists for the exactness tests, the plugin itself takes fp16/bf16 only. Returns the config.json
    written. Reads only the per-rank folder, checksums verified.
    """
    manifest = read_manifest(folder)
    target = target_of(manifest)
    group_size = check_exportable(manifest, target)
    preprocess = None if sm is None else sm_preprocessor(sm)
    gather, whole = gather_modules(manifest, target)
    config = trtllm_config(manifest, target, group_size, dtype, sm, gather, whole)
    with atomic_directory(out) as tmp:
        for r in track(range(manifest["tp"])):
            tensors = rank_checkpoint(manifest, read_rank(folder, r, verify=True), r, dtype, preprocess)
            save_tensors(tensors, tmp / rank_file(r))
        shutil.copy2(Path(__file__).with_name("trtllm_model.py"), tmp / MODEL_FILE)
        for name in TOKENIZER_FILES:
            if (Path(folder) / name).is_file():
                shutil.copy2(Path(folder) / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return config


def default_checkpoint_dir(engine_dir: Path) -> Path:
    """Where `tpaware export trtllm ENGINE_DIR` writes by default: beside the per-rank folder, never inside it."""
    engine_dir = Path(engine_dir).resolve()
    return engine_dir.with_name(f"{engine_dir.name}-trtllm-ckpt")


def build_command(executable: str, checkpoint: Path, config: dict, out: Path, workers: int | None,
                  extra_args: Iterable[str] = ()) -> list[str]:
    """The `trtllm-build` command line for an exported checkpoint, with our model class and one worker per rank."""
    return [executable, "--checkpoint_dir", str(checkpoint), "--output_dir", str(out),
            "--model_cls_file", str(checkpoint / MODEL_FILE), "--model_cls_name", config["tpaware"]["model_cls_name"],
            "--workers", str(workers or config["mapping"]["tp_size"]), *extra_args]


def build_trtllm(engine_dir: Path, out: Path | None = None, workers: int | None = None,
                 extra_args: Iterable[str] = ()) -> Path:
    """Run `trtllm-build` on the exported checkpoint of `engine_dir` (or on `engine_dir` if it is one).

    The engines go to `out`, by default `<ENGINE>-trtllm` beside the per-rank folder (`<CHECKPOINT>-engine` when
    given a checkpoint).

    Refuses, in one line, a checkpoint written with --no-preprocess, a GPU whose SM differs from the one the weights
    were laid out for, and a machine without TensorRT-LLM. Returns the engine folder.
    """
    engine_dir = Path(engine_dir).resolve()
    given = _is_trtllm_checkpoint(engine_dir)
    checkpoint = engine_dir if given else default_checkpoint_dir(engine_dir)
    if not _is_trtllm_checkpoint(checkpoint):
        raise InputError(f"no TensorRT-LLM checkpoint here or at {checkpoint}: run `tpaware export trtllm "
                         f"{engine_dir} --sm <SM>` first", file=engine_dir)
    config = json.loads((checkpoint / "config.json").read_text())
    sm = config["tpaware"]["preprocessed_for_sm"]
    if sm is None:
        raise InputError("exported with --no-preprocess (inspection only): re-export with --sm", file=checkpoint)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor != sm:
            raise InputError(f"weights are laid out for SM {sm}, this GPU is SM {major * 10 + minor}: "
                             "re-export with the GPU's --sm", file=checkpoint)
    executable = shutil.which("trtllm-build")
    if executable is None:
        raise InputError(f"trtllm-build not found: {INSTALL_HINT}")
    out = Path(out) if out else engine_dir.with_name(f"{engine_dir.name}-{'engine' if given else 'trtllm'}")
    returncode = subprocess.run(build_command(executable, checkpoint, config, out, workers, extra_args)).returncode
    if returncode:
        raise InputError(f"trtllm-build failed with exit code {returncode} (its log is above)", file=checkpoint)
    return out


def _is_trtllm_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    try:
        return config.is_file() and "tpaware" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
