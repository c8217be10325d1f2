"""One rank's forward pass of a Llama-family or GPTBigCode model, with a KV cache.

The same code runs the unpermuted reference (tp=1, dense weights) and every rank of a converted model: a rank holds
its heads' share of q/k/v and its slice of the MLP, and the only communication is `comm.all_reduce` after o_proj and
after down_proj (c_proj). Under the TP-aware plan nothing is ever gathered; the naive baseline's AllGather lives in
its down linear (`pipeline.runtime.linear.GatheredLinear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.arch import GPT_BIGCODE, Arch, Dims, layer_name
from pipeline.plan import RankHeads
from pipeline.runtime.comm import Comm

LinearFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class KVCache:
    """Keys and values per layer, [B, kv_heads, S, head_dim], grown by concatenation."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0


class Transformer:
    def __init__(self, arch: Arch, dims: Dims, config: dict, heads: RankHeads, dense: dict[str, torch.Tensor],
                 linears: dict[str, LinearFn], comm: Comm, masked_o_proj: bool = False):
        self.arch, self.dims, self.config, self.heads = arch, dims, config, heads
        self.dense, self.linears, self.comm, self.masked_o_proj = dense, linears, comm, masked_o_proj
        self.lm_head = dense.get(f"{arch.lm_head}.weight", dense[f"{arch.embed}.weight"])  # tied embeddings

    def __call__(self, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T], continuing `cache` when given."""
        start = cache.length if cache is not None else 0
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = F.embedding(ids, self.dense[f"{self.arch.embed}.weight"])
        if self.arch.positions:
            x = x + self.dense[f"{self.arch.positions}.weight"][positions]
        for i in range(self.dims.layers):
            x = x + self.comm.all_reduce(self.attention(i, self.norm(i, 0, x), positions, cache))
            x = x + self.comm.all_reduce(self.mlp(i, self.norm(i, 1, x)))
        return self._norm(self.arch.final_norm, x) @ self.lm_head.T

    def norm(self, i: int, which: int, x: torch.Tensor) -> torch.Tensor:
        return self._norm(layer_name(self.arch, i, self.arch.norms[which]), x)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm or RMSNorm, computed in at least fp32 (as HF does): a squared fp16 activation overflows."""
        weight, wide = self.dense[f"{name}.weight"], x.to(_at_least_fp32(x.dtype))
        if self.arch is GPT_BIGCODE:
            eps = self.config.get("layer_norm_epsilon", 1e-5)
            bias = self.dense[f"{name}.bias"]
            return F.layer_norm(wide, (x.shape[-1],), weight.to(wide.dtype), bias.to(wide.dtype), eps).to(x.dtype)
        eps = self.config.get("rms_norm_eps", 1e-6)
        return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.linears[layer_name(self.arch, i, name)](x)

    def attention(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """This rank's partial o_proj output for its heads."""
        b, t, _ = h.shape
        d, hq, hkv = self.dims.head_dim, self.heads.q_count, self.heads.kv_count
        if len(self.arch.qkv) == 1:
            q, k, v = self.linear(i, self.arch.qkv[0], h).split([hq * d, hkv * d, hkv * d], dim=-1)
        else:
            q, k, v = (self.linear(i, name, h) for name in self.arch.qkv)
        q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))
        if self.arch is not GPT_BIGCODE:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            if i in cache.keys:
                k, v = torch.cat([cache.keys[i], k], dim=2), torch.cat([cache.values[i], v], dim=2)
            cache.keys[i], cache.values[i] = k, v
        out = attend(q, k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1))
        out = out.transpose(1, 2).reshape(b, t, hq * d)
        if self.masked_o_proj:  # the whole o_proj on every rank: place this rank's heads in a zero-filled input
            full = out.new_zeros(b, t, self.dims.heads * d)
            full[..., self.heads.q_start * d:(self.heads.q_start + hq) * d] = out
            out = full
        return self.linear(i, self.arch.o_proj, out)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """This rank's partial down_proj (c_proj) output from its slice of the intermediate."""
        if self.arch.gated:
            gate, up = (self.linear(i, name, h) for name in self.arch.mlp_in)
            inner = F.silu(gate) * up
        else:
            inner = F.gelu(self.linear(i, self.arch.mlp_in[0], h), approximate="tanh")
        return self.linear(i, self.arch.mlp_out, inner)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding, HF Llama convention (halves rotated, not interleaved pairs)."""
        d = x.shape[-1]
        angles = rope_angles(self.config, positions, d)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_theta(config: dict) -> float:
    """RoPE's base from a HF config: top-level `rope_theta` (transformers 4) or `rope_parameters` (transformers 5)."""
    params = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or params.get("rope_type", "default") != "default":
        raise NotImplementedError("scaled RoPE (rope_scaling / rope_type other than default) is not supported yet")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def rope_angles(config: dict, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """RoPE angles [len(positions), head_dim] in fp64, each half repeated (the HF Llama layout)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    angles = positions.to(torch.float64)[:, None] / rope_theta(config) ** exponents[None, :]
    return torch.cat([angles, angles], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of T new queries over S keys (the last T of which are theirs); any dtype, fp64 included."""
    t, s = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~mask, float("-inf")).to(_at_least_fp32(q.dtype))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
