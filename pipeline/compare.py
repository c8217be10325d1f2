"""`tpaware compare`: onnxruntime on the exported graphs against the PyTorch rank model, through Polygraphy.

The reference is our own runtime (`Transformer` loaded from the per-rank folder, fp32): an exported graph must compute
what its rank computes, so every per-layer check runs rank r's `attention`/`mlp` (with the layer's norm) against
`rank<r>/layer<i>.<part>.onnx`, and the end-to-end check runs all ranks with their all-reduces (`simulate_tp`) against
the ONNX graphs with the ranks' partial outputs summed on the host (or `model.onnx` at tp=1). The runtime itself is
proven against the unpermuted fp64 checkpoint by its own tests; this closes the loop for the ONNX side.

Tolerances: both sides are fp32 (INT4 dequantization is exact in fp32 on both) and differ only in summation order and
kernels (rsqrt vs 1/sqrt, exp), about sqrt(K) * 6e-8 ~ 3e-6 relative for K <= 2048 per layer. Measured on a
SmolLM2-135M-shaped synthetic model (30 layers, hidden 576): worst per-layer error 1.6e-6 of the output's largest
magnitude, end-to-end logits 2.4e-6. An element passes when its absolute error is within `atol` or its relative error
within `rtol` (Polygraphy's elementwise rule; `SimpleCompareFunc` is the current name of `CompareFunc.simple`):
1e-4 each for layers (outputs of order 1), 1e-3 for logits (order 10, every layer's error accumulated), a margin of
40x or more. A wrong permutation or zero point shows up as errors of order 1e-1 to 1, far above either.

onnxruntime would otherwise fuse DequantizeLinear + MatMul into MatMulNBits with int8 activations (~1 % error), so
sessions set `session.qdq_matmulnbits_accuracy_level=0`; the saved shell command uses `ORT_ENABLE_BASIC` instead,
since the CLI cannot set session config entries.
"""

from __future__ import annotations

import shlex
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, RunResults
from polygraphy.comparator.compare import SimpleCompareFunc
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

from pipeline.atomic import atomic_directory
from pipeline.export.onnx import rank_graphs, read_export, read_rank_source
from pipeline.rankfolder import read_manifest
from pipeline.reference import simulate_tp
from pipeline.runtime.comm import Comm
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import KVCache, Transformer

LAYER_TOLERANCE = (1e-4, 1e-4)  # (atol, rtol)
LOGITS_TOLERANCE = (1e-3, 1e-3)
OUTPUT_DIR = "polygraphy"
COMMANDS_FILE = "commands.sh"
POLYGRAPHY_ORT_FLAGS = "--onnxrt --graph-optimization-level ORT_ENABLE_BASIC"

Feed = dict[str, np.ndarray]
TorchFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class TorchRunner(BaseRunner):
    """A PyTorch function on CPU as a Polygraphy runner (the stock PytRunner moves inputs to CUDA and returns a tuple).

    `fn` takes and returns name -> tensor dicts; this class only converts to and from numpy and times the call.
    """

    def __init__(self, fn: TorchFn, metadata: TensorMetadata, name: str = "pytorch"):
        super().__init__(name=name)
        self.fn, self.metadata = fn, metadata

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        return self.metadata

    def infer_impl(self, feed_dict: Feed) -> OrderedDict:
        start = time.perf_counter()
        with torch.no_grad():
            out = self.fn({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((k, v.numpy()) for k, v in out.items())


class OnnxChainRunner(BaseRunner):
    """tp > 1 end to end: each rank's graphs in turn, the host summing the ranks' partial outputs (the all-reduce)
    and adding the residual, as the runtime does between its collectives."""

    def __init__(self, onnx_dir: Path, graphs: list[str], tp: int, name: str = "onnxrt-ranks"):
        super().__init__(name=name)
        self.onnx_dir, self.graphs, self.tp = Path(onnx_dir), graphs, tp

    def activate_impl(self) -> None:
        self.sessions = {g: ort_session(self.onnx_dir / g) for g in self.graphs}

    def deactivate_impl(self) -> None:
        del self.sessions

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add("input_ids", np.int64, ("batch", "seq"))

    def infer_impl(self, feed_dict: Feed) -> OrderedDict:
        start = time.perf_counter()
        logits = chain_logits(lambda graph, feed: self.sessions[graph].run(None, feed)[0], self.graphs, self.tp,
                              feed_dict["input_ids"])
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits)


def chain_logits(run: Callable[[str, Feed], np.ndarray], graphs: list[str], tp: int, ids: np.ndarray) -> np.ndarray:
    """Logits from per-rank graphs: `run(graph, feed)` runs one; the ranks' partial outputs are summed (all-reduce)
    and added to the residual stream between graphs. Embedding and head are replicated: rank 0's are used."""
    x = run("rank0/embed.onnx", {"input_ids": ids})
    for part in [g.split("/", 1)[1] for g in graphs if g.startswith("rank0/layer")]:
        x = x + sum(run(f"rank{r}/{part}", {"hidden": x}) for r in range(tp))
    return run("rank0/head.onnx", {"hidden": x})


def ort_session(model: Path | bytes) -> ort.InferenceSession:
    """A CPU session that keeps INT4 matmuls exact (no int8 activations in the fused MatMulNBits)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    max_abs: float  # worst absolute error
    scale: float  # largest reference magnitude, so max_abs / scale is the error relative to the output's size
    atol: float
    rtol: float
    command: str | None  # the shell reproduction, when the graph is a file


def compare(engine_dir: Path, onnx_dir: Path, batch: int = 1, seq: int = 16, iterations: int = 2, seed: int = 0,
            layer_tolerance: tuple[float, float] = LAYER_TOLERANCE,
            logits_tolerance: tuple[float, float] = LOGITS_TOLERANCE) -> list[Check]:
    """Every per-layer check (each rank, each layer's attention and MLP) and the end-to-end logits check.

    Inputs and the reference's outputs go to `<onnx_dir>/polygraphy/` as Polygraphy JSON, with the `polygraphy run`
    command that repeats each file-backed check from the shell.
    """
    engine_dir, onnx_dir = Path(engine_dir), Path(onnx_dir)
    info = read_export(onnx_dir, engine_dir)
    tp, vocab = info["tp"], read_manifest(engine_dir)["dims"]["vocab"]
    rng = np.random.default_rng(seed)
    checks: list[Check] = []
    with atomic_directory(onnx_dir / OUTPUT_DIR) as out, G_LOGGER.verbosity(G_LOGGER.ERROR):
        for r in range(tp):
            model = load_rank_model(engine_dir, Comm(r, tp), torch.float32)
            shape = (batch, seq, model.dims.hidden)
            hidden = [{"hidden": rng.standard_normal(shape).astype(np.float32)} for _ in range(iterations)]
            for i, part, graph in _layer_pieces(engine_dir, model.dims.layers, r, tp):
                reference = TorchRunner(_layer_reference(model, i, part),
                                        TensorMetadata().add("hidden", np.float32, shape))
                name = f"layer{i}.{part}" if tp == 1 else f"rank{r}.layer{i}.{part}"
                checks.append(_compare(name, reference, graph, onnx_dir, hidden, layer_tolerance, out))
        ids = [{"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64)}
               for _ in range(iterations)]
        reference = TorchRunner(lambda feed: {"logits": _all_ranks(engine_dir, feed["input_ids"])},
                                TensorMetadata().add("input_ids", np.int64, (batch, seq)))
        graph = "model.onnx" if tp == 1 else OnnxChainRunner(onnx_dir, info["graphs"], tp)
        checks.append(_compare("end-to-end logits", reference, graph, onnx_dir, ids, logits_tolerance, out))
        commands = [c.command for c in checks if c.command]
        header = "#!/bin/sh\n# Repeat tpaware compare's checks with the polygraphy CLI.\nset -e\n"
        (out / COMMANDS_FILE).write_text(header + "".join(f"{c}\n" for c in commands))
    return checks


def _all_ranks(engine_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the runtime with every rank and its all-reduces (threads, fp32); every rank holds the same."""
    return simulate_tp(engine_dir, ids, torch.float32)[0][0]


def _layer_reference(model: Transformer, i: int, part: str) -> TorchFn:
    """Rank `model`'s share of layer i's attention or MLP (norm included), before the all-reduce."""
    def attn(feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = feed["hidden"]
        step = model.step(torch.arange(x.shape[1]), KVCache(), x.dtype)  # causal attention over `hidden` alone
        return {"attn_partial": model.attention(i, model.norm(i, 0, x), step)}

    def mlp(feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"mlp_partial": model.mlp(i, model.norm(i, 1, feed["hidden"]))}

    return attn if part == "attn" else mlp


def _layer_pieces(engine_dir: Path, layers: int, r: int, tp: int) -> list[tuple[int, str, str | bytes]]:
    """(layer, "attn" | "mlp", graph) of rank r: the exported file at tp > 1; at tp = 1, where only the whole model is
    exported, the same builder's per-layer graphs, in memory."""
    parts = [(i, part) for i in range(layers) for part in ("attn", "mlp")]
    if tp > 1:
        return [(i, part, f"rank{r}/layer{i}.{part}.onnx") for i, part in parts]
    graphs = rank_graphs(read_rank_source(engine_dir, 0))
    return [(i, part, graphs[f"layer{i}.{part}"].SerializeToString()) for i, part in parts]


def _compare(name: str, reference: TorchRunner, graph: str | bytes | BaseRunner, onnx_dir: Path, feeds: list[Feed],
             tolerance: tuple[float, float], out: Path) -> Check:
    """One Polygraphy comparison of `graph` (a file under onnx_dir, serialized bytes, or a runner) to `reference`."""
    atol, rtol = tolerance
    if isinstance(graph, BaseRunner):
        runner = graph
    else:
        source = onnx_dir / graph if isinstance(graph, str) else graph
        runner = OnnxrtRunner(lambda: ort_session(source), name="onnxrt")
    results = Comparator.run([reference, runner], data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    max_abs, scale = _errors(results)
    command = None
    if isinstance(graph, str):
        stem = name.replace(" ", "-")
        inputs, expected = out / f"{stem}.inputs.json", out / f"{stem}.reference.json"
        save_json(feeds, str(inputs))
        RunResults([results[0]]).save(str(expected))
        final = onnx_dir / OUTPUT_DIR
        command = shlex.join(["polygraphy", "run", str(onnx_dir / graph), *POLYGRAPHY_ORT_FLAGS.split(),
                              "--load-inputs", str(final / inputs.name), "--load-outputs", str(final / expected.name),
                              "--atol", str(atol), "--rtol", str(rtol)])
    return Check(name, bool(accuracy), max_abs, scale, atol, rtol, command)


def _errors(results: RunResults) -> tuple[float, float]:
    """Worst absolute error of the second runner against the first, and the largest reference magnitude."""
    (_, expected), (_, actual) = results.items()
    max_abs = scale = 0.0
    for want, got in zip(expected, actual):
        for key, ref in want.items():
            max_abs = max(max_abs, float(np.abs(np.asarray(got[key], np.float64) - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
    return max_abs, scale

