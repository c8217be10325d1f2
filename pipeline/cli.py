"""The `tpaware` command line: one thin command per stage; the work lives in the modules it calls."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from pipeline.errors import InputError

app = typer.Typer(
    help="Make act-order GPTQ models exact and fast under tensor parallelism: reorder offline, shard TP-aware, "
    "run, validate, export, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
ENGINES = Path("engines")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _run(fn, *args, **kwargs):
    """Call a stage; bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        _fail(str(e))


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Hugging Face GPTQ model folder (config.json + safetensors).")],
) -> None:
    """Show every quantized layer: shape, groups, act order, and which TP degrees take the MLP trick."""
    from pipeline.gptq.checkpoint import read_checkpoint
    from pipeline.inspect import inspect_checkpoint

    ckpt = _run(read_checkpoint, checkpoint)
    q = ckpt.quant
    console.print(f"[bold]{checkpoint}[/]  model_type={ckpt.config.get('model_type')}  bits={q.bits}  "
                  f"group_size={q.group_size}  sym={q.sym}  desc_act={q.desc_act}  format={q.checkpoint_format}")
    table = Table()
    table.add_column("layer", no_wrap=True)
    for column in ("K", "N", "groups", "act-order", "whole groups", "MLP trick at tp"):
        table.add_column(column)
    for row in _run(inspect_checkpoint, ckpt):
        table.add_row(row.name, str(row.in_features), str(row.out_features), str(row.groups),
                      "yes" if row.act_order else "no", "yes" if row.whole_groups else "[yellow]no[/]",
                      ",".join(map(str, row.mlp_trick_tp)) if row.mlp_trick_tp else "")
    console.print(table)


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Hugging Face GPTQ model folder.")],
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree (ranks).")] = 1,
    out: Annotated[Path | None, typer.Option(help="Output folder [default: engines/<name>-tp<N>].")] = None,
    attn_policy: Annotated[str, typer.Option(
        help="o_proj under TP: 'local' (each rank sorts its own rows, keeps only its groups) or 'masked' "
             "(o_proj unsharded, zero-filled full-width input).")] = "local",
) -> None:
    """Reorder every layer by act order, permute the MLP TP-aware, shard per rank, and write the per-rank folder."""
    from pipeline.shard import convert as convert_stage

    out = out or ENGINES / f"{checkpoint.resolve().name}-tp{tp}"
    start = time.perf_counter()
    manifest = _run(convert_stage, checkpoint, tp, out, attn_policy,
                    track=lambda it: track(it, description=f"writing {tp} rank file(s)", total=tp, console=console))
    policies: dict[str, int] = {}
    for info in manifest["layers"].values():
        policies[info["policy"]] = policies.get(info["policy"], 0) + 1
    for warning in manifest["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"wrote [bold]{out}[/] in {time.perf_counter() - start:.1f} s: tp={tp}, layers by policy "
                  + ", ".join(f"{k}={v}" for k, v in sorted(policies.items())))


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the checkpoint to.")],
    arch: Annotated[str, typer.Option(help="llama or gpt_bigcode.")] = "llama",
    hidden: int = 256, intermediate: int = 512, layers: int = 2, heads: int = 4,
    kv_heads: Annotated[int, typer.Option(help="KV heads (gpt_bigcode: 1, multi-query).")] = 2,
    vocab: int = 512,
    group_size: int = 64,
    sym: bool = False,
    checkpoint_format: Annotated[str, typer.Option(help="gptq (v1 zeros) or gptq_v2.")] = "gptq",
    seed: int = 0,
) -> None:
    """Write a random act-order GPTQ checkpoint of any shape (round-to-nearest in a random act order, real g_idx)."""
    from pipeline.arch import Dims
    from pipeline.gptq.checkpoint import write_checkpoint
    from pipeline.synth import synth_checkpoint

    if arch not in ("llama", "gpt_bigcode"):
        _fail(f"--arch {arch!r} must be llama or gpt_bigcode")
    dims = Dims(hidden, intermediate, layers, heads, 1 if arch == "gpt_bigcode" else kv_heads, vocab)
    ckpt = synth_checkpoint(arch, dims, group_size, sym, checkpoint_format, seed=seed)
    _run(write_checkpoint, out, ckpt)
    console.print(f"wrote [bold]{out}[/]: {arch} {dims}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
