"""Weight layout of the W4A16 kernel, and the pure-PyTorch (de)quantization helpers.

The kernel reads the canonical GPTQ tensors unchanged, so `to_kernel_layout` is the identity
after validation. Why no reshuffle (see plugins/NOTES.md for the numbers):

* `qweight` int32 [K/8, N] is row-major with N fastest, so a thread that owns 4 adjacent output
  columns reads one 16-byte vector and a warp reads 512 contiguous bytes: the loads are already
  full-width and coalesced.  A Marlin-style interleave only pays off with hand-written PTX that
  turns two nibbles into a half2 in one instruction; Triton cannot express that portably.
* The 8 nibbles of one int32 are 8 consecutive K rows.  The kernel splits a [BLOCK_K/8, BLOCK_N]
  tile into 8 sub-matrices (nibble i = rows 8r+i) and multiplies each with the matching strided
  slice of X, so no nibble ever has to move between threads.
* Zero points stay packed (0.5 byte per group and column).  The kernel unpacks them once per tile
  row, which is amortized over 8 (or group_size) weights; replacing them by fp16 `z*s` would
  quadruple their bytes and round the product.
"""

from __future__ import annotations

import torch

from pipeline.gptq.int4 import unpack_cols, unpack_rows

NIBBLES = 8  # 4-bit values per int32 word
# The group sizes the kernel takes (groups along K, contiguous), with its bytes per µs at each relative to 128-row
# groups: Llama-70B's tp=2 down shard padded to each (`pipeline.runtime.linear.kernel_groups`), 1 x H100, M 1..16:
# shorter K steps stream less well (plugins/NOTES.md "Session 13").
GROUP_SPEED = {32: 0.7, 64: 0.8, 128: 1.0}
GROUP_SIZES = tuple(GROUP_SPEED)
_FP32_CHUNK_ROWS = 4096  # rows dequantized at once in fp32, bounding the transient memory


def to_kernel_layout(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> dict[str, torch.Tensor]:
    """Validate the canonical tensors and return the dict the kernel reads (the identity layout).

    Keys: `qweight` int32 [K/8, N], `qzeros` int32 [G, N/8], `scales` fp16 [G, N], all contiguous.
    """
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise TypeError("qweight and qzeros must be int32")
    if scales.dtype != torch.float16:
        raise TypeError(f"scales must be float16, got {scales.dtype}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    k8, n = qweight.shape
    g = scales.shape[0]
    if scales.shape != (g, n) or qzeros.shape != (g, n // NIBBLES) or n % NIBBLES:
        raise ValueError(
            f"inconsistent shapes: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    if g * group_size < k8 * NIBBLES:
        raise ValueError(f"{g} groups of {group_size} cannot cover K={k8 * NIBBLES}")
    return {
        "qweight": qweight.contiguous(),
        "qzeros": qzeros.contiguous(),
        "scales": scales.contiguous(),
    }


def row_groups(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Group index of every input row: `g_idx` when given, else contiguous groups k // group_size."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(k, device=device) // group_size


def dequantize(
    weights: dict[str, torch.Tensor],
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense [K, N] weight (q - z) * s, computed in fp32 and rounded once to `dtype`.

    Works in row chunks so the fp32 intermediate stays bounded when used as the M > 64 fallback.
    """
    qweight, scales = weights["qweight"], weights["scales"]
    zeros = unpack_cols(weights["qzeros"])
    k = qweight.shape[0] * NIBBLES
    groups = row_groups(k, group_size, g_idx, qweight.device)
    out = torch.empty(k, qweight.shape[1], dtype=dtype, device=qweight.device)
    rows8 = _FP32_CHUNK_ROWS // NIBBLES
    for r0 in range(0, qweight.shape[0], rows8):
        q = unpack_rows(qweight[r0 : r0 + rows8]).to(torch.float32)
        g = groups[r0 * NIBBLES : r0 * NIBBLES + q.shape[0]]
        w = (q - zeros[g].to(torch.float32)) * scales[g].to(torch.float32)
        out[r0 * NIBBLES : r0 * NIBBLES + q.shape[0]] = w.to(dtype)
    return out
