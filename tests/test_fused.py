"""The fused RMSNorm, RoPE (alone and with the KV-cache write) and SiLU-and-multiply kernels (`plugins.fused`) against
the PyTorch ops they replace, and the model with them.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py).  Outputs are poisoned with NaN first, inputs
are fresh random draws, and the references are computed in fp64 and rounded once.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.runtime.comm import ThreadGroup
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import KVCache, StaticKVCache, Transformer, rotate
from pipeline.shard import convert

fused = pytest.importorskip("plugins.fused")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # relative spacing of the dtype's numbers near 1


def _poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _within_ulps(got: torch.Tensor, want64: torch.Tensor, dtype: torch.dtype, ulps: float) -> None:
    """Every element within `ulps` units in the last place (relative to its size, floored at the tensor's scale)."""
    assert not got.isnan().any(), "an output element was never written"
    err = (got.double().cpu() - want64).abs()
    bound = ulps * ULP[dtype] * want64.abs().clamp_min(want64.abs().mean())
    assert (err <= bound).all(), f"max error {err.max():.3g}, where the bound is {bound[err > bound][0]:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 200), (2, 5, 256)])
def test_rms_norm_matches_fp64_rounded_where_pytorch_rounds(dtype, shape):
    """Widths that are and are not a power of two (masked tail); rows read with a stride wider than the row."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    h = shape[-1]
    wide = torch.randn(*shape[:-1], h + 24, generator=gen).to(dtype)
    x = wide[..., :h]  # rows h + 24 apart
    weight = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    eps = 1e-5
    x64 = x.double()
    normed = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)  # rounded here, as HF does
    want = normed.double() * weight.double()
    out = _poisoned(shape, dtype)
    got = fused.rms_norm(x.to(DEVICE), weight.to(DEVICE), eps, out=out)
    assert got is out
    _within_ulps(got, want, dtype, ulps=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 200), (2, 5, 256)])
def test_add_rms_norm_rounds_the_sum_then_matches_rms_norm(dtype, shape):
    """The residual update and the next norm in one kernel: the sum exactly as PyTorch's add rounds it, its norm as
    `rms_norm` computes it (both outputs fresh tensors, every element checked); delta a strided view, as a slice of a
    wider tensor is."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    h = shape[-1]
    x = (4 * torch.randn(*shape, generator=gen)).to(dtype)
    delta = torch.randn(*shape[:-1], h + 8, generator=gen).to(dtype)[..., :h]
    weight = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    total, out = fused.add_rms_norm(x.to(DEVICE), delta.to(DEVICE), weight.to(DEVICE), 1e-5)
    if DEVICE == "cuda" or dtype == torch.float16:  # PyTorch adds in fp32 and rounds once, as the kernel does
        assert torch.equal(total.cpu(), x + delta)
    else:  # Triton's interpreter truncates fp32 to bf16 where the GPU rounds to nearest: one unit in the last place
        _within_ulps(total, (x + delta).double(), dtype, ulps=1.0)
    s64 = total.cpu().double()  # the norm of the sum as stored
    want = (s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype).double() * weight.double()
    _within_ulps(out, want, dtype, ulps=2.0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused.add_rms_norm(x, x[..., :-1], weight, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,t,d", [(1, 10, 1, 64), (2, 3, 5, 96)])
def test_rope_of_a_strided_view_matches_fp64(dtype, batch, heads, t, d):
    """q as the model gets it: a transposed view of the fused q/k/v output, heads not a multiple of the kernel's
    head block, head sizes that are and are not a power of two; cos/sin from real RoPE angles at scattered
    positions."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    kv = 2
    qkv = torch.randn(batch, t, (heads + 2 * kv) * d, generator=gen).to(dtype)
    q = qkv[..., : heads * d].view(batch, t, heads, d).transpose(1, 2)
    cos, sin = _rope_tables(t, d, dtype, gen)
    want = rotate(q.double(), cos.double(), sin.double())
    out = _poisoned((batch, heads, t, d), dtype)
    got = fused.rope(q.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), out=out)
    assert got is out
    _within_ulps(got, want, dtype, ulps=1.0)


def _rope_tables(t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [t, d] of real RoPE angles at scattered positions."""
    positions = torch.randint(0, 4096, (t,), generator=gen).double()
    angles = positions[:, None] / 10000.0 ** (torch.arange(0, d, 2).double() / d)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,hq,hkv,t,d",
                         [(1, 10, 2, 1, 64), (2, 4, 4, 3, 96), (1, 17, 9, 2, 32), (1, 16, 8, 8, 128)])
def test_rope_store_rotates_q_and_k_and_writes_only_the_new_slots(dtype, batch, hq, hkv, t, d):
    """q, k and v as the model gets them (transposed views of one fused q/k/v output; head counts that do and do not
    fill the kernel's head block, q's and k's different), new tokens going to scattered, unordered cache slots: q and
    the stored k match the fp64 rotation, the stored v is v bit for bit, and every other slot keeps what it held."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    qkv = torch.randn(batch, t, (hq + 2 * hkv) * d, generator=gen).to(dtype).to(DEVICE)
    q, k, v = (z.view(batch, t, -1, d).transpose(1, 2) for z in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    cos, sin = _rope_tables(t, d, dtype, gen)
    slots_count = 11
    slots = torch.randperm(slots_count, generator=gen)[:t]
    k_dst, v_dst = (torch.randn(batch, hkv, slots_count, d, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    k_before, v_before = k_dst.clone(), v_dst.clone()
    got_q = fused.rope_store(q, k, v, cos.to(DEVICE), sin.to(DEVICE), k_dst, v_dst, slots.to(DEVICE))
    _within_ulps(got_q, rotate(q.double().cpu(), cos.double(), sin.double()), dtype, ulps=1.0)
    _within_ulps(k_dst[:, :, slots], rotate(k.double().cpu(), cos.double(), sin.double()), dtype, ulps=1.0)
    assert torch.equal(v_dst[:, :, slots], v)
    kept = torch.ones(slots_count, dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(k_dst[:, :, kept.to(DEVICE)], k_before[:, :, kept.to(DEVICE)])
    assert torch.equal(v_dst[:, :, kept.to(DEVICE)], v_before[:, :, kept.to(DEVICE)])


def test_rope_store_refuses_a_cache_that_does_not_fit():
    q = torch.zeros(1, 4, 1, 16, dtype=torch.float16, device=DEVICE)
    k = torch.zeros(1, 2, 1, 16, dtype=torch.float16, device=DEVICE)
    cos, slots = torch.zeros(1, 16, dtype=torch.float16, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="rope_store takes"):
        fused.rope_store(q, k, k, cos, cos, torch.zeros(1, 3, 8, 16, dtype=torch.float16, device=DEVICE),
                         torch.zeros(1, 3, 8, 16, dtype=torch.float16, device=DEVICE), slots)
    cache = torch.zeros(1, 2, 16, 8, dtype=torch.float16, device=DEVICE).transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        fused.rope_store(q, k, k, cos, cos, cache, cache, slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,t,width", [(1, 1, 14336), (2, 3, 700)])
def test_silu_mul_of_the_fused_gate_up_halves_matches_fp64(dtype, batch, t, width):
    """gate and up as the model gets them: the two halves of one gate/up output (row stride twice the width), widths a
    multiple of the kernel's block and not; values out to where silu saturates."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    gate_up = (torch.randn(batch, t, 2 * width, generator=gen) * 4).to(dtype).to(DEVICE)
    gate, up = gate_up.split(width, dim=-1)
    want = torch.nn.functional.silu(gate.double().cpu()) * up.double().cpu()
    out = _poisoned((batch, t, width), dtype)
    got = fused.silu_mul(gate, up, out=out)
    assert got is out
    _within_ulps(got, want, dtype, ulps=1.0)


def test_silu_mul_refuses_halves_that_do_not_match():
    gate = torch.zeros(2, 8, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused.silu_mul(gate, gate[:, :4])
    with pytest.raises(ValueError, match="one shape and dtype"):
        fused.silu_mul(gate, gate.float())


def test_rope_refuses_an_odd_head_size():
    x = torch.zeros(1, 2, 1, 63, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="D even"):
        fused.rope(x, x[0, 0], x[0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True], ids=["growing-cache", "static-cache"])
def test_model_with_fused_kernels_gives_pytorchs_logits(dtype, static, tiny_checkpoint, tmp_path, monkeypatch):
    """The tiny Llama at tp=1, prefill then a decode step: every norm (all but the first after its residual add), the
    rotations (with the cache write where the cache is static) and the gated MLP's SiLU through the kernels (forced on
    the CPU, where the model would keep PyTorch's ops) against the model without them."""
    convert(tiny_checkpoint("llama"), 1, tmp_path / "engine")
    comm = ThreadGroup(1).comm(0)
    with_kernels = load_rank_model(tmp_path / "engine", comm, dtype, DEVICE)
    without = load_rank_model(tmp_path / "engine", comm, dtype, DEVICE, kernel=False)
    assert with_kernels.fused is not None and without.fused is None
    calls = {"rms_norm": 0, "add_rms_norm": 0, "rope": 0, "rope_store": 0, "silu_mul": 0}

    def counted(name):
        real = getattr(fused, name)

        def call(*args):
            calls[name] += 1
            return real(*args)
        return call

    def prefill_and_step(model: Transformer) -> torch.Tensor:
        cache = StaticKVCache.for_model(model, 2, 8, dtype, DEVICE) if static else KVCache()
        return torch.cat([model(ids[:, :6], cache), model(ids[:, 6:], cache)], dim=1).double()

    monkeypatch.setattr(Transformer, "_fuses", lambda self, x: self.fused is not None and x.dtype == dtype)
    for name in calls:
        monkeypatch.setattr(fused, name, counted(name))
    ids = torch.randint(0, with_kernels.lm_head.shape[0], (2, 7), generator=torch.Generator().manual_seed(0))
    ids = ids.to(DEVICE)
    got, want = prefill_and_step(with_kernels), prefill_and_step(without)
    layers, forwards = with_kernels.dims.layers, 2
    rotations = {"rope": 0, "rope_store": forwards * layers} if static else {"rope": 2 * forwards * layers,
                                                                             "rope_store": 0}
    assert calls == {"rms_norm": forwards, "add_rms_norm": 2 * layers * forwards, **rotations,
                     "silu_mul": layers * forwards}
    assert ((got - want).norm() / want.norm()).item() < 4 * ULP[dtype]
