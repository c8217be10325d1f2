"""One rank's forward pass of a Llama-family or GPTBigCode model, with a KV cache: `KVCache` grows by concatenation,
`StaticKVCache` is preallocated so that a decode step can be captured in a CUDA graph; attention is the same for both.

The same code runs the unpermuted reference (tp=1, dense weights) and every rank of a converted model: a rank holds
its heads' share of q/k/v and its slice of the MLP, and the only communication is `comm.all_reduce` after o_proj and
after down_proj (c_proj). Under the TP-aware plan nothing is ever gathered; the naive baseline's AllGather lives in
its down linear (`pipeline.runtime.linear.GatheredLinear`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline.arch import GPT_BIGCODE, Arch, Dims, layer_name
from pipeline.plan import RankHeads
from pipeline.runtime.comm import Comm

LinearFn = Callable[[torch.Tensor], torch.Tensor]
SplitFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # layers fused side by side: one output per layer


def fused_name(names: tuple[str, ...]) -> str:
    """The key under which the loader stores layers fused side by side."""
    return "+".join(names)


class Cache(Protocol):
    """What the attention asks of a KV cache; the model has one attention path whichever cache it is given."""

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        """Positions [t] of the next t tokens."""

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[t, S]: which of the keys that `update` will return the queries at `positions` (the next t) may see; asked
        once per forward, before any layer stores its keys."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values [B, kv_heads, t, head_dim] at `positions`; return every key and value to
        attend over."""

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's key and value buffers [B, kv_heads, S, head_dim], contiguous, where the token at position p
        goes to slot p, for a kernel that writes them in place (`plugins.fused.rope_store`); None if the cache has
        none."""

    def advance(self, t: int) -> None:
        """Called once per forward, after every layer has stored its t new tokens."""


@dataclass
class KVCache:
    """Keys and values per layer, [B, kv_heads, S, head_dim], grown by concatenation (so shapes change each step)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + t, device=device)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        return causal_mask(positions, self.length + len(positions))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def buffers(self, layer: int) -> None:
        """None: a growing cache has no slots to write into."""

    def advance(self, t: int) -> None:
        """Nothing to do: the length is that of the stored keys."""


class StaticKVCache:
    """Keys and values preallocated as [layers, B, kv_heads, max_len, head_dim], for CUDA-graph capture.

    Nothing changes shape from step to step and the next position lives in a device tensor, written in place, so one
    decode step can be captured once and replayed for every token. New keys are copied into their slots; attention
    runs over the whole buffer, masked to the slots at or before each query's position (unwritten slots included, so
    their contents never matter). Writing past `max_len` is out of bounds: size it for prompt plus every new token.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)  # tokens stored so far

    @classmethod
    def for_model(cls, model: Transformer, batch: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> StaticKVCache:
        """A cache for this rank's kv heads of `model`."""
        return cls(model.dims.layers, batch, model.heads.kv_count, max_len, model.dims.head_dim, dtype, device)

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return self.position + torch.arange(t, device=device)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        return causal_mask(positions, self.keys.shape[3])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.buffers(layer)
        keys.index_copy_(2, positions, k)
        values.index_copy_(2, positions, v)
        return keys, values

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def advance(self, t: int) -> None:
        self.position += t  # in place: a captured step advances it on every replay


class Transformer:
    def __init__(self, arch: Arch, dims: Dims, config: dict, heads: RankHeads, dense: dict[str, torch.Tensor],
                 linears: dict[str, LinearFn | SplitFn], comm: Comm, masked_o_proj: bool = False,
                 kernels: bool = True):
        """`kernels`: RMSNorm, RoPE (with the KV-cache write, into a static cache) and SiLU-and-multiply of fp16/bf16
        activations on a GPU as one Triton kernel each (`plugins.fused`, where Triton imports); False keeps PyTorch's
        ops everywhere."""
        self.arch, self.dims, self.config, self.heads = arch, dims, config, heads
        self.dense, self.linears, self.comm, self.masked_o_proj = dense, linears, comm, masked_o_proj
        self.fused = fused_kernels() if kernels else None
        self.lm_head = dense.get(f"{arch.lm_head}.weight", dense[f"{arch.embed}.weight"])  # tied embeddings

    def __call__(self, ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T], continuing `cache` when given."""
        cache = KVCache() if cache is None else cache
        positions = cache.positions(ids.shape[1], ids.device)
        x = F.embedding(ids, self.dense[f"{self.arch.embed}.weight"])
        if self.arch.positions:
            x = x + self.dense[f"{self.arch.positions}.weight"][positions]
        step = self.step(positions, cache, x.dtype)
        h = self.norm(0, 0, x)
        for i in range(self.dims.layers):  # x: the residual stream; h: its norm, the input of the next block
            x, h = self.add_norm(x, self.comm.all_reduce(self.attention(i, h, step)), self.norm_name(i, 1))
            x, h = self.add_norm(x, self.comm.all_reduce(self.mlp(i, h)), self.norm_name(i + 1, 0))
        cache.advance(ids.shape[1])
        return h @ self.lm_head.T

    def step(self, positions: torch.Tensor, cache: Cache, dtype: torch.dtype) -> Step:
        """What every layer's attention shares in one forward, computed once (a decode step is mostly small kernels):
        the mask, as the additive bias attention takes (0 where visible, -inf elsewhere; one row per folded query row,
        see `attend`), and the RoPE tables, both in the activations' dtype."""
        rope = None if self.arch is GPT_BIGCODE else rope_tables(self.config, positions, self.dims.head_dim, dtype)
        group = self.heads.q_count // self.heads.kv_count
        return Step(positions, cache, attention_bias(cache.mask(positions), dtype, group), rope)

    def _fuses(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through the fused kernels: a GPU tensor in fp16/bf16, with the kernels on."""
        return self.fused is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)

    def norm_name(self, i: int, which: int) -> str:
        """Layer i's norm before attention (0) or before the MLP (1); past the last layer, the final norm."""
        return self.arch.final_norm if i == self.dims.layers else layer_name(self.arch, i, self.arch.norms[which])

    def norm(self, i: int, which: int, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.norm_name(i, which), x)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream plus a block's output, and the norm `name` of the sum: one kernel where they fuse."""
        if self.arch is not GPT_BIGCODE and self._fuses(x):
            return self.fused.add_rms_norm(x, delta, self.dense[f"{name}.weight"], self.rms_eps)
        x = x + delta
        return x, self._norm(name, x)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm or RMSNorm, computed in at least fp32 (as HF does): a squared fp16 activation overflows."""
        weight = self.dense[f"{name}.weight"]
        if self.arch is GPT_BIGCODE:
            wide, eps = x.to(_at_least_fp32(x.dtype)), self.config.get("layer_norm_epsilon", 1e-5)
            bias = self.dense[f"{name}.bias"]
            return F.layer_norm(wide, (x.shape[-1],), weight.to(wide.dtype), bias.to(wide.dtype), eps).to(x.dtype)
        if self._fuses(x):
            return self.fused.rms_norm(x, weight, self.rms_eps)
        return F.rms_norm(x.to(_at_least_fp32(x.dtype)), (x.shape[-1],), eps=self.rms_eps).to(x.dtype) * weight

    @property
    def rms_eps(self) -> float:
        return self.config.get("rms_norm_eps", 1e-6)

    def linear(self, i: int, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.linears[layer_name(self.arch, i, name)](x)

    def linear_group(self, i: int, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of layers that read `x`: one fused matmul when the loader could fuse them."""
        fused = self.linears.get(fused_name(tuple(layer_name(self.arch, i, name) for name in names)))
        return fused(x) if fused is not None else tuple(self.linear(i, name, x) for name in names)

    def attention(self, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """This rank's partial o_proj output for its heads (`step`: see `Transformer.step`)."""
        b, t, _ = h.shape
        d, hq, hkv = self.dims.head_dim, self.heads.q_count, self.heads.kv_count
        if len(self.arch.qkv) == 1:
            q, k, v = self.linear(i, self.arch.qkv[0], h).split([hq * d, hkv * d, hkv * d], dim=-1)
        else:
            q, k, v = self.linear_group(i, self.arch.qkv, h)
        q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))
        buffers = step.cache.buffers(i) if step.rope is not None and self._fuses(q) else None
        if buffers is not None:  # rotate q and k and store k and v in one kernel
            q = self.fused.rope_store(q, k, v, *step.rope, *buffers, step.positions)
            k, v = buffers
        else:
            if step.rope is not None:
                rope = self.fused.rope if self._fuses(q) else rotate
                q, k = rope(q, *step.rope), rope(k, *step.rope)
            k, v = step.cache.update(i, k, v, step.positions)
        out = attend(q, k, v, step.bias)
        out = out.transpose(1, 2).reshape(b, t, hq * d)
        if self.masked_o_proj:  # the whole o_proj on every rank: place this rank's heads in a zero-filled input
            full = out.new_zeros(b, t, self.dims.heads * d)
            full[..., self.heads.q_start * d:(self.heads.q_start + hq) * d] = out
            out = full
        return self.linear(i, self.arch.o_proj, out)

    def mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """This rank's partial down_proj (c_proj) output from its slice of the intermediate."""
        if self.arch.gated:
            gate, up = self.linear_group(i, self.arch.mlp_in, h)
            inner = self.fused.silu_mul(gate, up) if self._fuses(gate) else F.silu(gate) * up
        else:
            inner = F.gelu(self.linear(i, self.arch.mlp_in[0], h), approximate="tanh")
        return self.linear(i, self.arch.mlp_out, inner)


@dataclass(frozen=True)
class Step:
    """One forward's positions, cache, attention bias [group T, S] and RoPE (cos, sin) [T, head_dim] (None without
    RoPE)."""

    positions: torch.Tensor
    cache: Cache
    bias: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, HF Llama convention (halves rotated, not interleaved pairs)."""
    d = x.shape[-1]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_tables(config: dict, positions: torch.Tensor, head_dim: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [len(positions), head_dim] of the RoPE angles, in `dtype` (the angles in fp64, as HF's reference)."""
    angles = rope_angles(config, positions, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


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


def causal_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[T, length] bool: cache slot j holds position j, visible to the query at position p when j <= p."""
    return torch.arange(length, device=positions.device)[None, :] <= positions[:, None]


def attention_bias(visible: torch.Tensor, dtype: torch.dtype, group: int) -> torch.Tensor:
    """The additive form of a [T, S] mask that `attend` takes for `group` q heads per kv head: 0 where visible, -inf
    elsewhere, its rows repeated once per q head of the group ([group T, S]; made once per forward, not per layer)."""
    visible = visible.repeat(group, 1)
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of T queries [B, Hq, T, d] over S keys [B, Hkv, S, d], q heads h g .. h g + g - 1 sharing kv head h
    (g = Hq / Hkv), `bias` [g T, S] (0 or -inf, from `attention_bias`) added to the scores; any dtype, fp64 included.

    The g query heads of a kv head attend as g T query rows of that one head, so the cache is read once per kv head
    and never copied out per q head (that copy was a third of a batch-16 decode step of the Llama-70B shapes on
    H100).  PyTorch's fused kernel on GPUs (scores and softmax in fp32 inside it), where writing the scores, mask,
    softmax and casts out as separate ops made them most of a decode step's kernels; its plain math on the CPU."""
    out = F.scaled_dot_product_attention(q.reshape(q.shape[0], k.shape[1], -1, q.shape[-1]), k, v, attn_mask=bias)
    return out.reshape(q.shape)


def fused_kernels():
    """`plugins.fused` (RMSNorm, RoPE and SiLU-and-multiply kernels), or None where Triton or the plugin package is
    absent."""
    try:
        from plugins import fused
    except ImportError:
        return None
    return fused


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
