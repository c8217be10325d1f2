"""Compile `w4a16_kernel` for sm_90 without a GPU and report what the compiler made of it.

    python scripts/gemm_sass_report.py                      # the configs plugins/NOTES.md quotes
    python scripts/gemm_sass_report.py --config 1,64,128,4,fma,pf --perm
    python scripts/gemm_sass_report.py --config 2,64,128,4,fma,pf,px       # FMA path with prepared X

For each config: registers, stack (spill) bytes, the SASS instructions in the K loop, those
per weight each thread handles per loop trip, barriers, shared-memory stores and ldmatrix loads
(a tile converted between register layouts through shared memory), and the most common opcodes.
Uses the ptxas/cuobjdump that ship inside the triton wheel, so it runs on the CPU-only CI machine.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.w4a16 import Config, w4a16_kernel  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
DEFAULT = ("1,64,128,4,fma,pf", "1,128,128,8,fma", "16,128,128,4,dot", "16,128,128,8,dot")


def compile_sm90(block_m, block_n, block_k, warps, use_dot, prefetch, dtype, perm, gidx, group_size,
                 prep_x=False, stream_k=False):
    """Compile one specialisation the way the launcher would (16-byte aligned pointers)."""
    config = Config(block_m, block_n, block_k, 1, use_dot, prefetch, warps, 3, prep_x)
    prepared = config.prepares_x(perm, group_size, gidx)
    consts = dict(GROUP_SIZE=group_size, HAS_PERM=perm and not prepared, HAS_GIDX=gidx, PREPARED_X=prepared,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot, PREFETCH=prefetch,
                  STREAM_K=stream_k, PDL=True)  # launched with programmatic dependent launch, as on H100
    x = "fp32" if prepared and not use_dot else dtype  # the FMA path's prepared X is fp32
    pointers = {"x_ptr": x, "xsum_ptr": "fp32" if prepared else x, "out_ptr": dtype, "ws_ptr": "fp32",
                "lock_ptr": "i32", "scales_ptr": "fp16", "perm_ptr": "i64" if perm else "i32"}
    sig, attrs = {}, {}
    for i, name in enumerate(w4a16_kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "i32")
        else:
            sig[name] = "i32"
        if name.endswith("_ptr") or name in ("N", "K", "stride_xm", "stride_om", "magic"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(w4a16_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3,
                                                                          "launch_pdl": True})


def compile_ws_sm90(dtype: str, group_size: int, warpgroups: int = 1):
    """Compile the warp-specialized Gluon kernel (`plugins/w4a16_ws.py`) as `launch` would, at its tuner's ring depth
    and split-K by 4 (one consumer warpgroup), or with two consumer warpgroups, no split and their ring depth: the
    signature comes from real TMA descriptors over small CPU tensors."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from plugins import w4a16_ws

    k, n, act = 1024, 512, torch.float16 if dtype == "fp16" else torch.bfloat16
    weights = {"qweight": torch.zeros(k // 8, n, dtype=torch.int32), "qzeros": torch.zeros(k // 128, n // 8,
               dtype=torch.int32), "scales": torch.zeros(k // 128, n, dtype=torch.float16)}
    descs = w4a16_ws.descriptors(torch.zeros(16, k, dtype=act), weights)
    sig = {name: mangle_type(d) for name, d in zip(("w_desc", "x_desc", "s_desc", "z_desc"), descs)}
    sig.update(xsum_ptr="*fp32", out_ptr=f"*{dtype}", ws_ptr="*fp32", lock_ptr="*i32", M="i32", N="i32", K="i32",
               stride_om="i32", xsum_stride="i32", magic="i32", GROUP_SIZE="constexpr", STAGES="constexpr",
               SPLIT="constexpr", WARPGROUPS="constexpr", num_warps="constexpr")
    shared = warpgroups == 2
    consts = {"GROUP_SIZE": group_size, "STAGES": w4a16_ws.SHARED_STAGES if shared else w4a16_ws.STAGES,
              "SPLIT": 1 if shared else 4, "WARPGROUPS": warpgroups, "num_warps": 4}
    src = GluonASTSource(w4a16_ws.w4a16_ws_kernel, sig, constexprs=consts)
    maxnreg = w4a16_ws.SHARED_MAXNREG if shared else w4a16_ws.MAXNREG
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def loop_body(sass: str) -> list[str]:
    """Instructions of the K loop: the longest innermost loop (a backward branch and everything it jumps over, with
    no other loop inside it)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    loops = []
    for addr, ins in lines:
        branch = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", ins)
        if branch and int(branch.group(1), 16) < addr:
            loops.append((int(branch.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    bodies = [[i for addr, i in lines if a <= addr <= b] for a, b in innermost]
    return max(bodies, key=len, default=[])


def analyse(spec: str, dtype: str, perm: bool, gidx: bool, group_size: int) -> dict:
    """Compile one config (`--config` syntax) and measure its K loop."""
    parts = spec.split(",")
    block_m, block_n, block_k, warps = map(int, parts[:4])
    if parts[4] in ("ws", "ws2"):
        kernel = compile_ws_sm90(dtype, group_size, warpgroups=2 if parts[4] == "ws2" else 1)
    else:
        kernel = compile_sm90(block_m, block_n, block_k, warps, parts[4] == "dot", "pf" in parts[5:], dtype, perm,
                              gidx, group_size, prep_x="px" in parts[5:], stream_k="sk" in parts[5:])
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "w4a16.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", cubin], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    body = loop_body(sass)
    ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?(\S+)", i).group(1) for i in body)
    return {
        "config": spec, "registers": int(regs.group(1)), "stack_bytes": int(regs.group(2)),
        "shared_kib": kernel.metadata.shared >> 10, "loop_instructions": len(body),
        "per_weight": len(body) / (block_n * block_k / (32 * warps)),
        "barriers": ops["BAR.SYNC.DEFER_BLOCKING"],
        # shared-memory stores and ldmatrix loads in the loop: a layout conversion of a register tile
        "shared_stores": sum(n for op, n in ops.items() if op.startswith("STS")),
        "ldmatrix": sum(n for op, n in ops.items() if op.startswith("LDSM")),
        "opcodes": dict(ops.most_common()),
        "waits_before_reading": waits_before_reading(kernel),
    }


def waits_before_reading(kernel) -> bool:
    """Launched dependently (PDL), the kernel may start while the previous one (which writes X) still runs: it must
    execute `griddepcontrol.wait` before its first load from global memory (plain, cp.async or TMA)."""
    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    loads = [i for i in (ptx.find(op) for op in ("ld.global", "cp.async", "cp.async.bulk.tensor")) if i >= 0]
    return bool(kernel.metadata.launch_pdl) and 0 <= wait < min(loads, default=len(ptx))


def report(r: dict) -> str:
    top = ", ".join(f"{op} {n}" for op, n in list(r["opcodes"].items())[:8])
    return (f"{r['config']:22s} regs {r['registers']:3d} stack {r['stack_bytes']:3d} smem {r['shared_kib']:3d} KiB  "
            f"loop {r['loop_instructions']:4d} instr, {r['per_weight']:5.2f}/weight, {r['barriers']:2d} barriers, "
            f"{r['shared_stores']} STS, {r['ldmatrix']} LDSM | {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="block_m,block_n,block_k,warps,fma|dot|ws|ws2[,pf][,px][,sk] (pf: prefetch, px: FMA path "
                        "with prepared X, sk: stream-K schedule; ws: the warp-specialized Gluon kernel, "
                        "16,128,128,4,ws; ws2: the same with two consumer warpgroups)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--perm", action="store_true", help="fused X[:, perm] gather (FMA path: X prepared)")
    parser.add_argument("--gidx", action="store_true", help="general g_idx path")
    parser.add_argument("--json", action="store_true", help="one JSON object per config instead of a text line")
    args = parser.parse_args()
    for spec in args.config or DEFAULT:
        result = analyse(spec, args.dtype, args.perm, args.gidx, args.group_size)
        print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
