"""Synthetic act-order GPTQ checkpoints of any shape, in seconds.

Weights are random normal, quantized round-to-nearest per group in a random act order with real g_idx, the layout
GPTQ's desc_act produces. Tests and GPU runs use them: no model can be downloaded, and Llama-70B-shaped layers are
needed on machines that cannot receive large files.
"""

from __future__ import annotations

import torch

from pipeline.arch import ARCHES, GPT_BIGCODE, Dims, layer_name
from pipeline.gptq.checkpoint import Checkpoint, QuantConfig
from pipeline.gptq.layer import QuantLinear


def quantize_rtn(weight: torch.Tensor, g_idx: torch.Tensor, group_size: int, sym: bool) -> QuantLinear:
    """Round-to-nearest 4-bit quantization of `weight` [K, N] with the given row groups (v2 zeros, 0..15)."""
    groups = int(g_idx.max()) + 1
    w = weight.float()
    index = g_idx.long().unsqueeze(1).expand_as(w)
    lo = torch.zeros(groups, w.shape[1]).scatter_reduce(0, index, w, "amin", include_self=False)
    hi = torch.zeros(groups, w.shape[1]).scatter_reduce(0, index, w, "amax", include_self=False)
    if sym:
        scales = torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-8) / 7.5
        zeros = torch.full_like(scales, 8)
    else:
        scales = (hi - lo).clamp_min(1e-8) / 15
        zeros = torch.round(-lo / scales).clamp(0, 15)
    scales = scales.half()
    q = torch.round(w / scales.float()[g_idx.long()] + zeros[g_idx.long()]).clamp(0, 15)
    return QuantLinear(q=q.to(torch.uint8), zeros=zeros.to(torch.uint8), scales=scales, g_idx=g_idx.to(torch.int32),
                       group_size=group_size)


def act_order_g_idx(k: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """g_idx as desc_act makes it: rows visited in a random order, every `group_size` consecutive visits one group."""
    order = torch.randperm(k, generator=generator)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


def synth_layer(k: int, n: int, group_size: int, sym: bool, generator: torch.Generator, desc_act: bool = True,
                bias: bool = False, g_idx: torch.Tensor | None = None) -> QuantLinear:
    """One random layer [k, n]; group_size -1 means one group over all k rows, as in GPTQ. Pass `g_idx` to share an
    act order with another layer."""
    group_size = k if group_size == -1 else group_size
    if g_idx is None:
        g_idx = (act_order_g_idx(k, group_size, generator) if desc_act
                 else (torch.arange(k) // group_size).to(torch.int32))
    weight = torch.randn(k, n, generator=generator) * k**-0.5
    layer = quantize_rtn(weight, g_idx, group_size, sym)
    if bias:
        layer = QuantLinear(layer.q, layer.zeros, layer.scales, layer.g_idx, group_size,
                            (torch.randn(n, generator=generator) * 0.02).half())
    return layer


def hf_config(model_type: str, dims: Dims) -> dict:
    """A minimal HF config.json for `dims`, readable by transformers' own model class."""
    if model_type == "gpt_bigcode":
        return {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": dims.hidden,
                "n_inner": dims.intermediate, "n_layer": dims.layers, "n_head": dims.heads, "multi_query": True,
                "vocab_size": dims.vocab, "n_positions": 2048, "activation_function": "gelu_pytorch_tanh",
                "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "tie_word_embeddings": True,
                "torch_dtype": "float16"}
    return {"model_type": model_type, "architectures": ["LlamaForCausalLM"], "hidden_size": dims.hidden,
            "intermediate_size": dims.intermediate, "num_hidden_layers": dims.layers,
            "num_attention_heads": dims.heads, "num_key_value_heads": dims.kv_heads, "vocab_size": dims.vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "float16"}


def synth_checkpoint(model_type: str, dims: Dims, group_size: int = 64, sym: bool = False,
                     checkpoint_format: str = "gptq", desc_act: bool = True, seed: int = 0,
                     shared_act_order: bool = True) -> Checkpoint:
    """A whole random act-order GPTQ model; GPTBigCode gets multi-query attention (one kv head) and biases.

    Layers that read the same input (q/k/v, gate/up) share one act order by default, as in GPTQ, whose order comes
    from the Hessian of the layer's input; `shared_act_order=False` draws one per layer (the harder case for us).
    """
    arch = ARCHES[model_type]
    if arch is GPT_BIGCODE and dims.kv_heads != 1:
        raise ValueError("GPTBigCode here is multi-query: kv_heads must be 1")
    gen = torch.Generator().manual_seed(seed)
    d, bigcode = dims.head_dim, arch is GPT_BIGCODE
    qkv_out = [dims.heads * d, dims.kv_heads * d, dims.kv_heads * d]
    shapes = {n: (dims.hidden, out) for n, out in zip(arch.qkv, [sum(qkv_out)] if bigcode else qkv_out)}
    shapes[arch.o_proj] = (dims.heads * d, dims.hidden)
    shapes.update({n: (dims.hidden, dims.intermediate) for n in arch.mlp_in})
    shapes[arch.mlp_out] = (dims.intermediate, dims.hidden)
    layers, dense = {}, {}
    for i in range(dims.layers):
        shared: dict[tuple[str, ...], torch.Tensor] = {}
        for n, (k, out) in shapes.items():
            inputs = next((group for group in (arch.qkv, arch.mlp_in) if n in group), (n,))
            layer = synth_layer(k, out, group_size, sym, gen, desc_act, bias=bigcode,
                                g_idx=shared.get(inputs) if shared_act_order else None)
            shared.setdefault(inputs, layer.g_idx)
            layers[layer_name(arch, i, n)] = layer
        for norm in arch.norms:
            dense[f"{layer_name(arch, i, norm)}.weight"] = (1 + 0.1 * torch.randn(dims.hidden, generator=gen)).half()
            if bigcode:
                dense[f"{layer_name(arch, i, norm)}.bias"] = (0.1 * torch.randn(dims.hidden, generator=gen)).half()
    dense[f"{arch.embed}.weight"] = torch.randn(dims.vocab, dims.hidden, generator=gen).half()
    dense[f"{arch.final_norm}.weight"] = (1 + 0.1 * torch.randn(dims.hidden, generator=gen)).half()
    if bigcode:
        dense[f"{arch.final_norm}.bias"] = (0.1 * torch.randn(dims.hidden, generator=gen)).half()
        dense[f"{arch.positions}.weight"] = (0.1 * torch.randn(2048, dims.hidden, generator=gen)).half()
    else:
        dense[f"{arch.lm_head}.weight"] = (torch.randn(dims.vocab, dims.hidden, generator=gen) * dims.hidden**-0.5).half()
    quant = QuantConfig(bits=4, group_size=group_size, sym=sym, desc_act=desc_act, checkpoint_format=checkpoint_format)
    return Checkpoint(config=hf_config(model_type, dims), quant=quant, layers=layers, dense=dense)
