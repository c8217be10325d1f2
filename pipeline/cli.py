"""The `tpaware` command line: one thin command per stage; the work lives in the modules it calls."""

from __future__ import annotations

import logging
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


@app.callback()
def _quiet_imports() -> None:
    # torchao (pulled in by GPTQModel) warns about CUDA-only extensions when transformers imports it, and torch logs
    # deprecations of torchao's pytree registrations: noise on every command that loads a transformers model.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    out: Annotated[Path | None, typer.Option(help="Output folder (default: engines/<name>-tp<N>).")] = None,
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


_KERNEL_HELP = ("On CUDA, quantized matmuls use the W4A16 kernel and RMSNorm/RoPE fused kernels (plugins); --no-kernel: "
                "dequantize + matmul and PyTorch's ops.")
_MODE_HELP = ("tpaware (no gathers of activations), naive (AllGather the MLP intermediate, reorder, take the local "
              "chunk) or local-sort (down rows in checkpoint order, sorted per rank).")


@app.command()
def run(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    prompt_ids: Annotated[str | None, typer.Option(help="Token ids, comma-separated; ';' between prompts.")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text prompt (needs tokenizer files in the folder).")] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt; the step time is reported from 4.")] = 16,
    mode: Annotated[str, typer.Option(help=_MODE_HELP)] = "tpaware",
    device: Annotated[str, typer.Option(help="cpu (gloo) or cuda (NCCL, one GPU per rank).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or float64.")] = "float32",
    kernel: Annotated[bool, typer.Option(help=_KERNEL_HELP)] = True,
    timeout: Annotated[float, typer.Option(help="Seconds before every rank is stopped.")] = 600.0,
) -> None:
    """Greedy generation at the folder's tp, one process per rank.

    Prints the tokens, the time per decode step (on GPUs each step replays one CUDA graph) and the collectives
    issued."""
    from pipeline.rankfolder import read_manifest
    from pipeline.runtime.generate import parse_ids, tokenizer
    from pipeline.runtime.launch import RankSetup, dtype_of, generate

    if (prompt is None) == (prompt_ids is None):
        _fail("give exactly one of --prompt-ids and --prompt")
    manifest = _run(read_manifest, engine)
    tok = _run(tokenizer, engine) if prompt is not None else None
    ids = tok(prompt, return_tensors="pt").input_ids if tok else _run(parse_ids, prompt_ids, manifest["dims"]["vocab"])
    start = time.perf_counter()
    setup = RankSetup(str(engine), mode, device, _run(dtype_of, dtype), kernel)
    gen, counts = _run(generate, setup, ids, max_tokens, timeout)
    for row in gen.tokens.tolist():
        console.print(repr(tok.decode(row)) if tok else " ".join(map(str, row)), highlight=False)
    per_token = "" if gen.step_seconds is None else f", {gen.step_seconds * 1e3:.2f} ms per decode step"
    console.print(f"tp={manifest['tp']} mode={mode} device={device}: {max_tokens} tokens in "
                  f"{time.perf_counter() - start:.1f} s (with start-up){per_token}; collectives on rank 0: "
                  f"{dict(counts[0])}")


@app.command()
def validate(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    mode: Annotated[str, typer.Option(help=_MODE_HELP)] = "tpaware",
    device: Annotated[str, typer.Option(help="cpu (gloo) or cuda (NCCL, one GPU per rank).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Runtime dtype: float32, float16, bfloat16 or float64.")] = "float32",
    ref_dtype: Annotated[str, typer.Option(help="dtype of the transformers reference (on the CPU).")] = "float64",
    prompt_ids: Annotated[str | None, typer.Option(help="Token ids (default: 2 random prompts of 16).")] = None,
    max_tokens: int = 8,
    max_abs_err: Annotated[float | None, typer.Option(help="Largest |logit error| (default: by dtype).")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Smallest per-position cosine (default: by dtype).")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Top-1 agreement (default: by dtype).")] = None,
    max_tie_margin: Annotated[float | None, typer.Option(
        help="Greedy tokens may differ only where the reference's top two logits are this close "
             "(default: 2 x max-abs-err; 0: identical).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="(default: <engine>/validate.json).")] = None,
    kernel: Annotated[bool, typer.Option(help=_KERNEL_HELP)] = True,
    timeout: Annotated[float, typer.Option(help="Seconds before every rank is stopped.")] = 600.0,
) -> None:
    """Run the folder at its tp and compare with transformers' own model on the unpermuted dequantized weights."""
    from pipeline.rankfolder import read_manifest
    from pipeline.runtime.generate import parse_ids
    from pipeline.runtime.launch import dtype_of
    from pipeline.validate import thresholds_for, validate as validate_stage, write_report

    manifest = _run(read_manifest, engine)
    ids = None if prompt_ids is None else _run(parse_ids, prompt_ids, manifest["dims"]["vocab"])
    run_dtype = _run(dtype_of, dtype)
    limits = thresholds_for(run_dtype, max_abs_err, min_cosine, min_top1, max_tie_margin)
    report = _run(validate_stage, engine, mode=mode, device=device, dtype=run_dtype, ids=ids, max_tokens=max_tokens,
                  ref_dtype=_run(dtype_of, ref_dtype), thresholds=limits, timeout=timeout, kernel=kernel)
    console.print(_report_table(report))
    out = json_path or engine / "validate.json"
    _run(write_report, report, out)
    verdict = "[green]passed[/]" if report.passed else "[red]FAILED[/]: " + "; ".join(report.failures)
    console.print(f"wrote {out}: {verdict}")
    if not report.passed:
        raise typer.Exit(1)


def _report_table(report) -> Table:
    """A validation report as a table: one row per check, then the collectives the run issued."""
    matmul = "W4A16 kernel" if report.kernel else "dequantize+matmul"
    table = Table(title=f"{report.folder}  tp={report.tp}  mode={report.mode}  {report.device} {report.dtype} "
                        f"({matmul})  vs transformers ({report.ref_dtype})")
    for column in ("check", "value", "bound", "result"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check.name, check.value, check.bound, "[green]pass[/]" if check.ok else "[red]FAIL[/]")
    per_layer = ", ".join(f"{k} {v:g}" for k, v in report.collectives_per_layer.items())
    table.add_row("collectives per layer per forward", per_layer, "", "")
    return table


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="'smollm2' (embedded SmolLM2-135M-Instruct) or a HF fp model folder.")
                     ] = "smollm2",
    tp: Annotated[int, typer.Option(help="Ranks; SmolLM2's 9 heads and 3 kv heads allow 1 and 3.")] = 3,
    device: Annotated[str, typer.Option(help="cpu (gloo) or cuda (NCCL, one GPU per rank).")] = "cpu",
    prompt: str = "The capital of France is",
    max_tokens: int = 16,
) -> None:
    """The whole pipeline on a real model: quantize (GPTQModel, act order) -> convert -> run tp ranks -> validate."""
    from pipeline.demo import run_demo, write_summary

    demo_run = _run(run_demo, model, tp, device, ENGINES, prompt, max_tokens,
                    progress=lambda stage: console.print(f"[bold cyan]>[/] {stage}"))
    console.print(f"\n[bold]prompt[/]      {demo_run.prompt!r}")
    console.print(f"[bold]reference[/]   {demo_run.ref_text!r}   (transformers, unpermuted dequantized weights)")
    console.print(f"[bold]tpaware[/]     {demo_run.text!r}   (tp={tp}, {device}, TP-aware per-rank files)\n")
    console.print(_report_table(demo_run.report))
    timings = Table("stage", "seconds", "")
    for stage, seconds in demo_run.seconds.items():
        timings.add_row(stage, f"{seconds:.1f}", "cached" if demo_run.cached.get(stage) else "")
    console.print(timings)
    summary = write_summary(demo_run)
    console.print(f"GPTQ checkpoint: {demo_run.checkpoint}\nper-rank folder: {demo_run.engine}\nsummary: {summary}")
    if not demo_run.report.passed:
        _fail("the TP-aware engine does not match the reference: " + "; ".join(demo_run.report.failures))


export_app = typer.Typer(help="Export a per-rank folder for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")


def _onnx_dir(engine: Path, onnx: Path | None) -> Path:
    from pipeline.export.onnx import default_onnx_dir

    return onnx or default_onnx_dir(engine)


@export_app.command("onnx")
def export_onnx(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <ENGINE>-onnx beside it).")] = None,
) -> None:
    """ONNX graphs (opset 21, fp32 activations, INT4 weights): the whole model at tp=1, per rank and layer at tp>1."""
    from pipeline.export.onnx import export_onnx as export_stage

    out = _onnx_dir(engine, out)
    info = _run(export_stage, engine, out)
    if info["tensorrt_problem"]:
        console.print(f"[yellow]warning:[/] exported for onnxruntime only, TensorRT cannot take it: "
                      f"{info['tensorrt_problem']}", highlight=False)
    console.print(f"wrote [bold]{out}[/]: {len(info['graphs'])} graph(s), tp={info['tp']}, for "
                  f"{' and '.join(info['backends'])}; collectives per rank: {info['collectives_per_rank'] or 'none'}")


@app.command()
def compare(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    onnx: Annotated[Path | None, typer.Option(help="Export folder (default: <ENGINE>-onnx beside it).")] = None,
    batch: int = 1,
    seq: int = 16,
    iterations: int = 2,
    seed: int = 0,
) -> None:
    """Polygraphy: onnxruntime on the exported graphs vs the PyTorch rank model, per layer and end to end."""
    from pipeline.compare import COMMANDS_FILE, OUTPUT_DIR, compare as compare_stage

    onnx = _onnx_dir(engine, onnx)
    checks = _run(compare_stage, engine, onnx, batch=batch, seq=seq, iterations=iterations, seed=seed)
    table = Table(title=f"{onnx} (onnxruntime) vs {engine} (PyTorch, fp32)")
    for column in ("check", "max |error|", "relative to max |ref|", "atol / rtol", "result"):
        table.add_column(column)
    for c in checks:
        table.add_row(c.name, f"{c.max_abs:.2e}", f"{c.max_abs / c.scale:.2e}", f"{c.atol:g} / {c.rtol:g}",
                      "[green]pass[/]" if c.passed else "[red]FAIL[/]")
    console.print(table)
    console.print(f"from the shell: sh {onnx / OUTPUT_DIR / COMMANDS_FILE}", highlight=False)
    if not all(c.passed for c in checks):
        raise typer.Exit(1)


@app.command()
def build(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    backend: Annotated[str, typer.Option(help="tensorrt (from the ONNX export) or trtllm.")] = "tensorrt",
    onnx: Annotated[Path | None, typer.Option(help="ONNX export (default: <ENGINE>-onnx beside it).")] = None,
    out: Annotated[Path | None, typer.Option(help="Engine folder (default: the backend's, beside ENGINE).")] = None,
    max_batch: int = 8,
    max_seq: int = 2048,
) -> None:
    """Build engines: one TensorRT engine per exported graph (needs TensorRT 10 and a GPU), or TensorRT-LLM's."""
    from pipeline.build import build as build_stage

    built = _run(build_stage, engine, backend, _onnx_dir(engine, onnx), out, max_batch=max_batch, max_seq=max_seq)
    console.print(f"wrote [bold]{built}[/]")


@export_app.command("trtllm")
def export_trtllm(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    sm: Annotated[int | None, typer.Option(help="GPU architecture the weights are laid out for (90: H100).")] = None,
    no_preprocess: Annotated[bool, typer.Option(
        "--no-preprocess", help="Plain int8 [K, N/2] packing, for inspection (trtllm-build cannot load it).")] = False,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <ENGINE>-trtllm-ckpt beside it).")] = None,
) -> None:
    """TensorRT-LLM unified checkpoint (engine-era releases 0.2x-1.2.x) per rank, with the gathering model class."""
    from pipeline.export.trtllm import default_checkpoint_dir, export_trtllm as export_stage

    if (sm is None) != no_preprocess:
        _fail("pass one of --sm <SM> (e.g. 90 for H100; needs tensorrt_llm importable) and --no-preprocess")
    out = out or default_checkpoint_dir(engine)
    config = _run(export_stage, engine, out, sm,
                  track=lambda it: track(it, description="writing rank file(s)", console=console))
    console.print(f"wrote [bold]{out}[/]: {config['architecture']} tp={config['mapping']['tp_size']}, "
                  f"{len(config['tpaware']['gather'])} gathering linear(s), weights for "
                  f"{'SM ' + str(sm) if sm else 'inspection only (--no-preprocess)'}")


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(
        help="Hugging Face fp model folder, or 'smollm2' for the embedded SmolLM2-135M-Instruct.")],
    bits: Annotated[int, typer.Option(help="Weight bits (tpaware reads 4).")] = 4,
    group_size: Annotated[int, typer.Option(help="Rows per quantization group; 64 divides every SmolLM2 shard.")] = 64,
    desc_act: Annotated[bool, typer.Option(help="Act order: quantize rows by decreasing activation energy.")] = True,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric (v1 'gptq' file) or asymmetric (written as "
                                                           "'gptq_v2'; the closer model).")] = False,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default: engines/<name>-gptq-w<bits>g<group>[-act]-<sym|asym>).")] = None,
) -> None:
    """Quantize to act-order GPTQ with GPTQModel on CPU; a cached result with the same inputs is reused."""
    from pipeline.quantize import quantize_model

    start = time.perf_counter()
    folder, stamp = _run(quantize_model, model, ENGINES, out, bits, group_size, desc_act, sym)
    calib = stamp["calibration"]
    console.print(f"{'reused cached' if stamp['cached'] else 'wrote'} [bold]{folder}[/] in "
                  f"{time.perf_counter() - start:.1f} s: GPTQModel {stamp['gptqmodel']}, "
                  f"{stamp['settings']['checkpoint_format']} format, calibration {calib['samples']} x "
                  f"{calib['tokens'] // calib['samples']} tokens")


bench_app = typer.Typer(help="Benchmarks on GPUs (one process per GPU, NCCL); results go to benchmarks/.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("mlp", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_mlp(ctx: typer.Context) -> None:
    """MLP latency, naive vs local-sort vs TP-aware vs dense fp16.

    Runs scripts/bench_mlp.py with these arguments (see `python scripts/bench_mlp.py --help`)."""
    _bench_script("bench_mlp.py", ctx.args)


@bench_app.command("gemm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_gemm(ctx: typer.Context) -> None:
    """The W4A16 kernel alone at Llama-70B / Granite-20B shards vs fp16 cuBLAS and PyTorch's int4 kernel, one GPU.

    Runs scripts/bench_gemm.py with these arguments (see `python scripts/bench_gemm.py --help`; `--check` verifies
    every shape against fp64 first)."""
    _bench_script("bench_gemm.py", ctx.args)


@bench_app.command("decode", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_decode(ctx: typer.Context) -> None:
    """Time per generated token of a Llama-70B-shaped model cut to a few layers, in every mode.

    The decode step runs in a CUDA graph: tpaware vs naive vs local-sort vs dense fp16. Runs scripts/bench_decode.py
    with these arguments (see `python scripts/bench_decode.py --help`; `--device cpu` checks the modes without a
    GPU)."""
    _bench_script("bench_decode.py", ctx.args)


@bench_app.command("allreduce", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_allreduce(ctx: typer.Context) -> None:
    """All-reduce latency of decode-sized fp16 tensors: NCCL vs PyTorch's one-shot vs tpaware's (the default).

    In CUDA graphs; runs scripts/bench_allreduce.py with these arguments (needs 2+ GPUs)."""
    _bench_script("bench_allreduce.py", ctx.args)


def _bench_script(name: str, args: list[str]) -> None:
    """Run scripts/<name> in this Python: the scripts stay runnable where typer is not installed (GPU images)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / name
    if not script.is_file():
        _fail(f"{script} not found: `tpaware bench` runs from a source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *args]))


_SERVE_DEVICE_HELP = "cpu (a process per rank, gloo) or cuda (rank r on cuda:r, NCCL)."
_SERVE_DTYPE_HELP = "float32, float16 or bfloat16."


@app.command()
def serve(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    host: Annotated[str, typer.Option(help="Address Triton listens on (HTTP and gRPC).")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="KServe v2 HTTP port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="KServe v2 gRPC port.")] = 8001,
    device: Annotated[str, typer.Option(help=_SERVE_DEVICE_HELP)] = "cpu",
    dtype: Annotated[str, typer.Option(help=_SERVE_DTYPE_HELP)] = "float32",
    exit_timeout: Annotated[int, typer.Option(help="Seconds Triton lets requests finish on shutdown.")] = 30,
) -> None:
    """Triton Inference Server serving the model 'tpaware' with every TP rank; Ctrl-C or SIGTERM stops it.

    The server is the one bundled in nvidia-pytriton, run from .venv-serve; stopping it stops all its processes."""
    from pipeline.rankfolder import read_manifest
    from pipeline.serve.frontend import Settings
    from pipeline.serve.server import Ports, serve as serve_stage

    ports = Ports(host, http_port, grpc_port)
    tp = _run(read_manifest, engine)["tp"]
    code = _run(serve_stage, engine, ports, Settings(device=device, dtype=dtype),
                on_ready=lambda url: console.print(f"serving [bold]{engine}[/] (tp={tp}) as model 'tpaware': HTTP "
                                                   f"{url}, gRPC {host}:{grpc_port}; Ctrl-C stops", highlight=False),
                exit_timeout=exit_timeout)
    raise typer.Exit(code)


@app.command("triton-repo")
def triton_repo(
    engine: Annotated[Path, typer.Argument(help="Per-rank folder written by `tpaware convert`.")],
    out: Annotated[Path, typer.Option(help="Model repository folder to write.")],
    device: Annotated[str, typer.Option(help=_SERVE_DEVICE_HELP)] = "cpu",
    dtype: Annotated[str, typer.Option(help=_SERVE_DTYPE_HELP)] = "float32",
) -> None:
    """A standalone Triton model repository for any `tritonserver --model-repository OUT`.

    It holds the Python backend's model.py, config.pbtxt, the code and the engine; the server's Python needs torch,
    numpy and safetensors."""
    from pipeline.serve.frontend import Settings
    from pipeline.serve.repository import write_repository

    model = _run(write_repository, engine, out, Settings(device=device, dtype=dtype))
    console.print(f"wrote [bold]{out}[/]: model '{model.name}' ({model / 'config.pbtxt'}); serve it with "
                  f"tritonserver --model-repository {out.resolve()}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
