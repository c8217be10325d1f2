"""`torch.ops.tpaware.w4a16_gemm`: one op for every device, usable under torch.compile and CUDA graphs.

* CPU (and any non-CUDA device): the exact reference, dequantize in fp32 and matmul in fp32.
* CUDA: the Triton kernel for 1 <= M <= 64 (Triton is imported on first CUDA use only, so this
  module imports on machines without it), or on Hopper its warp-specialized Gluon form where the tuner timed it
  faster; dequantize + cuBLAS above that or for fp32 inputs.
* Fake: shape and dtype only, for tracing.

Before CUDA-graph capture, run each shape once: that compiles the kernel, settles the tuned
choice and allocates the split-K counters, none of which may happen inside a capture.
"""

from __future__ import annotations

import functools

import torch

from plugins.layout import NIBBLES, dequantize

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, qweight: torch.Tensor, in_perm: torch.Tensor | None) -> None:
    """x is [M, K]; or, gathered through `in_perm` (one input column per weight row), [M, any width]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    k = qweight.shape[0] * NIBBLES
    if in_perm is not None and in_perm.shape != (k,):
        raise ValueError(f"in_perm has shape {tuple(in_perm.shape)} but qweight holds K={k}")
    if in_perm is None and x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but qweight holds K={k}")


def _reference_matmul(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    group_size: int,
    in_perm: torch.Tensor | None,
    g_idx: torch.Tensor | None,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """X[:, in_perm] @ dequant(W) in `compute_dtype`, returned in x's dtype."""
    if in_perm is not None:
        x = x[:, in_perm.to(dtype=torch.long)]
    w = dequantize(weights, group_size, g_idx, dtype=compute_dtype)
    return (x.to(compute_dtype) @ w).to(x.dtype)


@torch.library.custom_op("tpaware::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y[M, N] = X[:, in_perm] @ ((q - z) * s); reference implementation (fp32) for non-CUDA devices.

    With `in_perm` (int [K], one input column per weight row) x may have any width: a layer padded to whole groups
    reads more rows than its input has columns."""
    _check(x, qweight, in_perm)
    weights = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    return _reference_matmul(x, weights, group_size, in_perm, g_idx, torch.float32)


@w4a16_gemm.register_kernel("cuda")
def _w4a16_gemm_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(x, qweight, in_perm)
    weights = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    from plugins import tuning  # imports Triton

    m, k, n = x.shape[0], qweight.shape[0] * NIBBLES, qweight.shape[1]
    if m == 0:
        return x.new_empty(0, n)
    if m > tuning.MAX_M or x.dtype not in KERNEL_DTYPES:
        return _reference_matmul(x, weights, group_size, in_perm, g_idx, x.dtype)
    from plugins.w4a16 import gluon_kernel_for, w4a16_matmul

    x = x.contiguous()
    variant = "gidx" if g_idx is not None else "perm" if in_perm is not None else "contig"
    name, sms = _device_info(x.device.index)
    key = tuning.cache_key(name, variant, x.dtype, group_size, m, n, k)
    config = tuning.lookup_call(name, variant, x.dtype, group_size, m, n, k)
    if config is None:
        with torch.cuda.device(x.device):  # timing events and weight copies on x's device
            copies = tuning.weight_copies(weights)
            config = tuning.choose(
                key,
                tuning.candidates(m, n, k, sms, permuted=in_perm is not None,
                                  warp_specialized=gluon_kernel_for(x, weights, group_size, g_idx is not None)
                                  is not None),
                lambda c, i: w4a16_matmul(x, copies[i], group_size, c, in_perm, g_idx),
                len(copies),
            )
            del copies
    return w4a16_matmul(x, weights, group_size, config, in_perm, g_idx)


@functools.cache
def _device_info(index: int | None) -> tuple[str, int]:
    """(name, multiprocessor count) of a CUDA device, cached: the op runs once per layer per token."""
    props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    return props.name, props.multi_processor_count


@w4a16_gemm.register_fake
def _w4a16_gemm_fake(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(x, qweight, in_perm)
    return x.new_empty(x.shape[0], qweight.shape[1])


def w4a16_linear(
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    group_size: int,
    in_perm: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Linear layer on `to_kernel_layout` weights; x is [..., K], the result [..., N]."""
    lead = x.shape[:-1]
    y = torch.ops.tpaware.w4a16_gemm(
        x.reshape(-1, x.shape[-1]), weights["qweight"], weights["qzeros"], weights["scales"],
        group_size, in_perm, g_idx,
    )
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])
