"""A rank's quantized linear as ONNX nodes, in the INT4 weight-only form TensorRT accepts.

TensorRT takes INT4 weights only as `DequantizeLinear` of an INT4 constant with blocks of 64 or 128 rows and **no
zero point** (symmetric). GPTQ has a zero point per group, so the weight is split exactly:

    x_perm @ ((q - z) * s)  =  x_perm @ ((q - 8) * s)  +  groupsum(x_perm) @ (s * (8 - z))

The first term is a zero-free INT4 dequantize; the second is a tiny fp32 matmul of the per-block input sums with
`C = s * (8 - z)` (TensorRT-LLM's additive `zero` tensor). Both products are exact in fp32 (fp16 scale times a small
integer), so the split loses nothing; symmetric checkpoints (z = 8) drop the second term.

Rows must sit in blocks of one group each. A rank's shard can hold partial groups (local-sort of a row-parallel
layer) or rows in act order (g_idx present), so the weight is laid out in *slots*: every group gets whole blocks, its
rows first, then zero padding, and the input is gathered into the same slots from `[x, 0]`. That one `Gather` is the
layer's input permutation (`x[..., in_perm]`) and the padding at once; it is local to the rank. Padding costs up to
one block per group: a local-sort o_proj at tp=2 holds about half of each group, so its weight roughly doubles
(`--attn-policy masked` keeps whole groups instead, at the price of a full o_proj per rank).

Group sizes that are not a multiple of 64 (32) cannot take TensorRT's blocks without doubling the weight, so those
layers use onnxruntime's `com.microsoft::MatMulNBits` (any power-of-two block) on the same slot layout, with packed
uint8 zero points and no `g_idx` input (onnxruntime 1.32 ignores packed zeros when given `g_idx`): onnxruntime only.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import torch

from pipeline.errors import InputError
from pipeline.export.graph import MS_DOMAIN, GraphBuilder
from pipeline.gptq.layer import QuantLinear, pad_groups

TRT_BLOCKS = (128, 64)  # TensorRT's INT4 block sizes, largest first
SYMMETRIC_ZERO = 8


@dataclass(frozen=True)
class SlotLayout:
    """A layer's weight in slots: `block` consecutive slots per block, one group per block.

    Slot j multiplies input column `source[j]` of the layer's (unpermuted) input; `source[j] == in_features` is a
    padding slot that reads a zero.
    """

    q: torch.Tensor  # uint8 [S, N]; padding rows hold their group's zero point (and read a zero input)
    scales: torch.Tensor  # float32 [S / block, N]
    zeros: torch.Tensor  # uint8 [S / block, N]
    source: torch.Tensor  # int64 [S]
    block: int
    in_features: int

    @property
    def padded(self) -> bool:
        return bool((self.source == self.in_features).any())

    @property
    def gathers(self) -> bool:
        """Whether the layer needs an input Gather at all (not when slots are exactly the input columns in order)."""
        return not torch.equal(self.source, torch.arange(self.in_features))


def trt_blocks(group_size: int) -> list[int]:
    """TensorRT's block sizes that divide `group_size`, largest first; none (onnxruntime only) for group size 32."""
    return [b for b in TRT_BLOCKS if group_size % b == 0]


def block_size(layer: QuantLinear) -> int:
    """The block the export uses for `layer`: the largest TensorRT block that needs no padding (every group's row
    count a multiple of it), else the smallest (least padding); without one, the group size (MatMulNBits' rules)."""
    blocks = trt_blocks(layer.group_size)
    if blocks:
        counts = torch.bincount(layer.g_idx.long())
        return next((b for b in blocks if bool((counts % b == 0).all())), blocks[-1])
    group_size = layer.group_size
    if group_size < 16 or group_size & (group_size - 1):
        raise InputError(f"group_size={group_size}: ONNX export needs a multiple of 64 (TensorRT) or a power of two "
                         "of at least 16 (onnxruntime MatMulNBits)")
    return group_size


def slot_layout(layer: QuantLinear, in_perm: torch.Tensor | None, block: int) -> SlotLayout:
    """Lay the stored rows of `layer` out in slots of whole blocks per group (`pad_groups`), fp32 scales."""
    padded, source = pad_groups(layer, in_perm, block)
    return SlotLayout(q=padded.q, scales=padded.scales.float(), zeros=padded.zeros, source=source, block=block,
                      in_features=layer.in_features)


def dequantize_slots(layout: SlotLayout, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The slot weight [S, N] the ONNX graph computes with, in `dtype`; for tests against the layer's `dequantize`."""
    rows = torch.arange(layout.q.shape[0]) // layout.block
    return (layout.q.to(dtype) - layout.zeros[rows].to(dtype)) * layout.scales[rows].to(dtype)


def emit_linear(g: GraphBuilder, x: str, layer: QuantLinear, in_perm: torch.Tensor | None, name: str) -> str:
    """Nodes computing `x[..., in_perm] @ W + bias` for the rank's layer `layer`; returns the output tensor name."""
    layout = slot_layout(layer, in_perm, block_size(layer))
    x = _gather_slots(g, x, layout, name)
    if trt_blocks(layer.group_size):
        y = _dequantize_matmul(g, x, layout, name)
    else:
        y = _matmul_nbits(g, x, layout, name)
    if layer.bias is not None:
        y = g.op("Add", y, g.const(layer.bias.float().numpy(), f"{name}.bias"), hint=f"{name}.out")
    return y


def _gather_slots(g: GraphBuilder, x: str, layout: SlotLayout, name: str) -> str:
    """`[x, 0][..., source]` for x [batch, seq, K]: the input permutation, plus zeros for padding slots; nothing when
    slots are in order. Pads list every axis (no `axes` input) for the widest importer support."""
    if not layout.gathers:
        return x
    if layout.padded:
        x = g.op("Pad", x, g.ints([0, 0, 0, 0, 0, 1]), g.scalar(0.0), hint=f"{name}.x_padded")  # [batch, seq, K+1]
    return g.op("Gather", x, g.const(layout.source.numpy(), f"{name}.in_perm"), axis=-1, hint=f"{name}.x_perm")


def _dequantize_matmul(g: GraphBuilder, x: str, layout: SlotLayout, name: str) -> str:
    """TensorRT's form: zero-free INT4 DequantizeLinear + MatMul, plus the exact zero-point correction."""
    values = (layout.q.to(torch.int8) - SYMMETRIC_ZERO).numpy().astype(ml_dtypes.int4)
    weight = g.op("DequantizeLinear", g.const(values, f"{name}.qweight"),
                  g.const(layout.scales.numpy(), f"{name}.scales"), axis=0, block_size=layout.block,
                  hint=f"{name}.weight")
    y = g.op("MatMul", x, weight, hint=f"{name}.xw")
    if bool((layout.zeros == SYMMETRIC_ZERO).all()):
        return y
    correction = layout.scales * (SYMMETRIC_ZERO - layout.zeros.float())
    blocks = layout.q.shape[0] // layout.block
    sums = g.op("ReduceSum", g.op("Reshape", x, g.ints([0, 0, blocks, layout.block])), g.ints([-1]),
                keepdims=0, hint=f"{name}.block_sums")
    return g.op("Add", y, g.op("MatMul", sums, g.const(correction.numpy(), f"{name}.zero_correction")),
                hint=f"{name}.y")


def _matmul_nbits(g: GraphBuilder, x: str, layout: SlotLayout, name: str) -> str:
    """onnxruntime's MatMulNBits on the slot layout: B [N, blocks, block/2] low nibble first, packed uint8 zeros."""
    slots, n = layout.q.shape
    blocks = slots // layout.block
    q = layout.q.T.reshape(n, blocks, layout.block // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).numpy()
    zeros = layout.zeros.T  # [N, blocks]
    if blocks % 2:
        zeros = torch.cat([zeros, torch.full((n, 1), SYMMETRIC_ZERO, dtype=torch.uint8)], dim=1)
    packed_zeros = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).numpy()
    return g.op("MatMulNBits", x, g.const(packed, f"{name}.qweight"),
                g.const(layout.scales.T.contiguous().numpy(), f"{name}.scales"),
                g.const(packed_zeros, f"{name}.qzeros"), domain=MS_DOMAIN, K=slots, N=n, bits=4,
                block_size=layout.block, accuracy_level=0, hint=f"{name}.y")
