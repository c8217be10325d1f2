"""Programmatic dependent launch (PDL, Hopper and later) for the plugin's kernels.

A decode step is a chain of short kernels (X preparation, GEMM, X preparation, GEMM, all-reduce), and inside a CUDA
graph every boundary between two of them costs about a microsecond of launch and drain.  Launched with PDL, a kernel
may be scheduled while the previous one finishes: each of ours first waits (`griddepcontrol.wait`) until the
previous kernel has completed and its writes are visible, so it never reads or writes early, and the GEMM lets the
next kernel launch as soon as all its programs have started (`griddepcontrol.launch_dependents`).  What is saved is
the launch latency, on SMs the GEMM's last programs leave idle: the two-layer tp=2 MLP shard chain on H100 took
68.3 instead of 70.4 µs at M=16 (plugins/NOTES.md).  A kernel not launched with PDL treats both instructions as no-ops.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: a CUDA device of compute capability 9.0 or later, not Triton's interpreter
    (which runs no PTX)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With PDL: block until the previous kernel on the stream has completed and its memory is visible."""
    if PDL:
        gdc_wait()


@triton.jit
def let_next_kernel_launch(PDL: tl.constexpr):
    """With PDL: the next kernel may launch once every program of this one has passed here (or exited)."""
    if PDL:
        gdc_launch_dependents()
