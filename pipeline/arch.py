"""One table per architecture: tensor names, which layers are column- or row-parallel, and the model's sizes.

Adding an architecture is adding a table here (and its forward in the runtime), not a fork of the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import InputError


@dataclass(frozen=True)
class Arch:
    """Names are relative to the layer prefix `layer.format(i)` unless they are model-level (`embed`, ...)."""

    model_type: str
    layer: str  # layer prefix, e.g. "model.layers.{}"
    qkv: tuple[str, ...]  # column-parallel attention inputs; one name when q, k and v are fused
    o_proj: str  # row-parallel attention output
    mlp_in: tuple[str, ...]  # column-parallel MLP inputs (gate, up) or (c_fc,)
    mlp_out: str  # row-parallel MLP output
    norms: tuple[str, ...]  # per-layer norms (weight and bias tensors follow the name)
    embed: str
    final_norm: str
    lm_head: str
    positions: str | None  # learned position embedding, if any
    gated: bool  # SiLU(gate) * up, else GELU(c_fc)
    sizes: dict[str, str]  # our size name -> HF config key


LLAMA = Arch(
    model_type="llama",
    layer="model.layers.{}",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    o_proj="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    positions=None,
    gated=True,
    sizes={"hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
           "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size"},
)

GPT_BIGCODE = Arch(
    model_type="gpt_bigcode",
    layer="transformer.h.{}",
    qkv=("attn.c_attn",),
    o_proj="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    norms=("ln_1", "ln_2"),
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    positions="transformer.wpe",
    gated=False,
    sizes={"hidden": "n_embd", "intermediate": "n_inner", "layers": "n_layer", "heads": "n_head",
           "vocab": "vocab_size"},
)

# Llama-family models that share Llama's names and math.
ARCHES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "gpt_bigcode": GPT_BIGCODE}


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def arch_of(config: dict) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise InputError(f"model_type={model_type!r} is not supported (supported: {', '.join(ARCHES)})")
    return ARCHES[model_type]


def dims_of(arch: Arch, config: dict) -> Dims:
    """Model sizes from a HF config; GPTBigCode's multi-query attention means one kv head."""
    values = {}
    for ours, key in arch.sizes.items():
        value = config.get(key)
        if ours == "intermediate" and value is None and arch is GPT_BIGCODE:
            value = 4 * config["n_embd"]  # HF's default when n_inner is null
        if value is None:
            raise InputError(f"missing '{key}'")
        values[ours] = int(value)
    if "kv_heads" not in values:
        values["kv_heads"] = 1 if config.get("multi_query", True) else values["heads"]
    return Dims(**values)


def layer_name(arch: Arch, index: int, name: str) -> str:
    return f"{arch.layer.format(index)}.{name}"
