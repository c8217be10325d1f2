"""RMSNorm (alone, or after the residual add), rotary embedding (alone, or with the KV-cache write) and the gated MLP's
SiLU-and-multiply as one Triton kernel each, for the decode step's glue around the GEMMs.

At batch 1 a decode step is mostly small kernels: a 2-layer Llama-70B-shaped step at tp=1 on H100 launched 109, of
which 14 were GEMMs (benchmarks/decode_h100x2.md as of commit aebe954).  PyTorch runs an fp16 RMSNorm as five (to
fp32, the norm, back to fp16, times the weight), a rotary embedding of a strided q or k as five more (two products, a
negation, a concatenation, a sum), and silu(gate) * up as two, each a launch and a pass over memory.  Here each is
one pass: read once, compute in fp32, write once.

Numerics: `rms_norm` rounds where PyTorch's sequence does (the normalised row to the activations' dtype, then the
product with the weight), so it matches it up to the last bit of an fp32 reciprocal square root (`add_rms_norm` rounds
the sum first, as the add does); `rope` computes x cos + rotate_half(x) sin in fp32 and rounds once (PyTorch's fp16
ops round three times), so it is the more exact; so is `silu_mul` (one rounding where PyTorch's two ops round twice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROPE_HEADS = 8  # heads per `_rope_kernel` program


@triton.jit
def _rms_norm_row(x, w_ptr, offs, mask, H, eps, dtype: tl.constexpr):
    """One row's (x / rms(x)) rounded to `dtype`, times w (rounded again); x in fp32, zero past H."""
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * scale).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (normed * w).to(dtype)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    """Row `program_id` of out = RMSNorm(x) (`_rms_norm_row`)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, _rms_norm_row(x, w_ptr, offs, mask, H, eps, out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, H, stride_x, stride_d, eps, BLOCK: tl.constexpr):
    """Row `program_id` of sum = x + d, rounded to the dtype (as PyTorch's add rounds), and out = RMSNorm(sum)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    total = (x + d).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * H + offs, total, mask=mask)
    tl.store(out_ptr + row * H + offs,
             _rms_norm_row(total.to(tl.float32), w_ptr, offs, mask, H, eps, out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dimension] with unit stride along it (a view where one exists: rows may be strided)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` (any leading shape), into `out` (contiguous, x's shape) if given."""
    h = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    block = triton.next_power_of_2(h)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, h, rows.stride(0), h, eps, BLOCK=block,
                                       num_warps=_norm_warps(block))
    return out


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) for x and delta of one shape and dtype: a decoder layer's residual update and
    the norm the next block reads, in one pass where PyTorch launches the add and then the norm."""
    if x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm takes x and delta of one shape and dtype, got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(delta.shape)} {delta.dtype}")
    h = x.shape[-1]
    x_rows, d_rows = _rows(x), _rows(delta)
    total, out = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))
    block = triton.next_power_of_2(h)
    _add_rms_norm_kernel[(x_rows.shape[0],)](x_rows, d_rows, weight, total, out, h, x_rows.stride(0),
                                             d_rows.stride(0), eps, BLOCK=block, num_warps=_norm_warps(block))
    return total, out


def _norm_warps(block: int) -> int:
    """Warps for one row of `block` elements: one per 512, 1 to 16."""
    return max(1, min(16, block // 512))


@triton.jit
def _rotated(row, stride_d, cos_ptr, sin_ptr, t, mask, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """x cos + rotate_half(x) sin in fp32 for the rows at pointers `row` [BLOCK_H, 1] (position t), where
    rotate_half(x) = (-x[D/2:], x[:D/2]) (the HF Llama convention: halves, not interleaved pairs)."""
    d = tl.arange(0, BLOCK_D)  # D padded to a power of two
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    x = tl.load(row + d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(row + partner[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + t * D + d, mask=d < D, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + d, mask=d < D, other=0.0).to(tl.float32)
    return x * cos[None, :] + sign[None, :] * x_partner * sin[None, :]


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, HEADS, T, sx_b, sx_h, sx_t, sx_d,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows (b, heads h0..h0+BLOCK_H-1, t) of out [B, HEADS, T, D] (contiguous) = `_rotated` x."""
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (heads < HEADS)[:, None] & (d < D)[None, :]
    out = _rotated(x_ptr + b * sx_b + heads[:, None] * sx_h + t * sx_t, sx_d, cos_ptr, sin_ptr, t, mask, D, BLOCK_D)
    offs = ((b * HEADS + heads[:, None]) * T + t) * D + d[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_dst_ptr, v_dst_ptr, slot_ptr, HQ, HKV, T,
                       S, sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows (b, a block of heads, t) of one of: q_out [B, HQ, T, D] = `_rotated` q; k_dst [B, HKV, S, D] at slot
    slot[t] = `_rotated` k; v_dst at that slot = v.  The second grid axis runs over q's head blocks, then k's, then
    v's."""
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    block = tl.program_id(1)
    q_blocks, kv_blocks = tl.cdiv(HQ, BLOCK_H), tl.cdiv(HKV, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    if block < q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < HQ)[:, None] & (d < D)[None, :]
        out = _rotated(q_ptr + b * sq_b + heads[:, None] * sq_h + t * sq_t, sq_d, cos_ptr, sin_ptr, t, mask, D,
                       BLOCK_D)
        tl.store(q_out_ptr + ((b * HQ + heads[:, None]) * T + t) * D + d[None, :], out.to(q_out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        heads = ((block - q_blocks) % kv_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (heads < HKV)[:, None] & (d < D)[None, :]
        slot = tl.load(slot_ptr + t)
        dst = ((b * HKV + heads[:, None]) * S + slot) * D + d[None, :]
        if block < q_blocks + kv_blocks:
            out = _rotated(k_ptr + b * sk_b + heads[:, None] * sk_h + t * sk_t, sk_d, cos_ptr, sin_ptr, t, mask, D,
                           BLOCK_D)
            tl.store(k_dst_ptr + dst, out.to(k_dst_ptr.dtype.element_ty), mask=mask)
        else:
            row = v_ptr + b * sv_b + heads[:, None] * sv_h + t * sv_t
            tl.store(v_dst_ptr + dst, tl.load(row + d[None, :] * sv_d, mask=mask), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary embedding of x [B, heads, T, D] (any strides, e.g. a view of the fused q/k/v output) with cos and sin
    [T, D], into `out` (contiguous, x's shape) if given, else a new tensor (D even)."""
    b, heads, t, d = x.shape
    if d % 2 or cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"rope takes x [B, H, T, D] with D even and cos/sin [T, D], got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    out = torch.empty((b, heads, t, d), dtype=x.dtype, device=x.device) if out is None else out
    grid = (b * t, triton.cdiv(heads, ROPE_HEADS))
    _rope_kernel[grid](x, cos.contiguous(), sin.contiguous(), out, heads, t, *x.stride(), D=d,
                       BLOCK_D=triton.next_power_of_2(d), BLOCK_H=ROPE_HEADS, num_warps=4)
    return out


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_dst: torch.Tensor, v_dst: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of q and k and the KV-cache write in one kernel, where a decode step otherwise launches four
    (q's and k's rotation, then the copies of k and v into the cache).

    q [B, Hq, T, D], k and v [B, Hkv, T, D] (any strides: views of the fused q/k/v output); cos and sin [T, D];
    k_dst and v_dst [B, Hkv, S, D] contiguous (a static cache's layer); slots [T] the cache slot of each new token.
    Writes rope(k) and v into slots[t] of k_dst and v_dst and returns rope(q) [B, Hq, T, D] (contiguous)."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k_dst.shape[2]
    if (d % 2 or k.shape != (b, hkv, t, d) or v.shape != k.shape or cos.shape != (t, d) or sin.shape != (t, d)
            or k_dst.shape != (b, hkv, s, d) or v_dst.shape != k_dst.shape or slots.shape != (t,)):
        raise ValueError(f"rope_store takes q [B, Hq, T, D] (D even), k and v [B, Hkv, T, D], cos/sin [T, D], "
                         f"k_dst and v_dst [B, Hkv, S, D] and slots [T], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(cos.shape)}, {tuple(k_dst.shape)}, {tuple(slots.shape)}")
    if not (k_dst.is_contiguous() and v_dst.is_contiguous()):
        raise ValueError("rope_store writes into contiguous cache buffers")
    q_out = torch.empty((b, hq, t, d), dtype=q.dtype, device=q.device)
    blocks = triton.cdiv(hq, ROPE_HEADS) + 2 * triton.cdiv(hkv, ROPE_HEADS)
    _rope_store_kernel[(b * t, blocks)](q, k, v, cos.contiguous(), sin.contiguous(), q_out, k_dst, v_dst, slots, hq,
                                        hkv, t, s, *q.stride(), *k.stride(), *v.stride(), D=d,
                                        BLOCK_D=triton.next_power_of_2(d), BLOCK_H=ROPE_HEADS, num_warps=4)
    return q_out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, N, stride_gate, stride_up, BLOCK: tl.constexpr):
    """Columns of row `program_id(0)` of out [rows, N] (contiguous) = silu(gate) * up, in fp32, rounded once."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * N + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate and up of one shape (any leading shape, unit stride along the last dimension, e.g. the
    two halves of the fused gate/up output), into `out` (contiguous, that shape) if given, else a new tensor."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"silu_mul takes gate and up of one shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
                         f"and {tuple(up.shape)} {up.dtype}")
    n = gate.shape[-1]
    gate_rows, up_rows = _rows(gate), _rows(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) if out is None else out
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(n, block))](gate_rows, up_rows, out, n, gate_rows.stride(0),
                                                                 up_rows.stride(0), BLOCK=block, num_warps=4)
    return out
