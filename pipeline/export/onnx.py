"""`tpaware export onnx`: a per-rank folder as ONNX graphs (prefill, fp32 activations, INT4 weights + fp32 scales).

- tp = 1: the whole model, `model.onnx`: `input_ids` [batch, seq] -> `logits` [batch, seq, vocab].
- tp > 1: per rank, `rank<r>/embed.onnx`, `rank<r>/layer<i>.attn.onnx`, `rank<r>/layer<i>.mlp.onnx`,
  `rank<r>/head.onnx`. ONNX has no collectives, so every all-reduce point is a graph output (`attn_partial`,
  `mlp_partial`, this rank's share); the host sums the ranks' outputs and adds the residual. A decoder layer is two
  graphs because its MLP reads the residual stream *after* the attention all-reduce.

Every graph computes what `pipeline.runtime.model.Transformer` computes for that rank (same norms, RoPE tables from
fp64 as the runtime builds them, causal attention from position 0). Activations stay fp32 because onnxruntime CPU is
the only runner we can check with; a TensorRT build may still choose fp16 kernels.

Quantized linears follow `pipeline.export.qlinear` (TensorRT's zero-free INT4 DequantizeLinear with 64/128 blocks and
an exact zero-point correction). The only gathers on activations are each layer's local input permutation; under the
TP-aware plan no graph needs anything from another rank, which `collective_points` counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline.arch import ARCHES, GPT_BIGCODE, Arch, Dims, layer_name
from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.export.checks import PARTIAL_SUFFIX, collective_points, tensorrt_violations
from pipeline.export.graph import FLOAT, INT64, OPSET, GraphBuilder
from pipeline.export.qlinear import emit_linear
from pipeline.gptq.checkpoint import sha256_file
from pipeline.plan import RankHeads
from pipeline.rankfolder import read_manifest, read_rank
from pipeline.runtime.linear import shard_layer
from pipeline.runtime.model import rope_angles

EXPORT_SCHEMA = 1
EXPORT_FILE = "export.json"
# Externalize weights past this size: a single protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class RankSource:
    """What one rank's graphs are built from: the manifest's model description and the rank file's tensors."""

    arch: Arch
    dims: Dims
    config: dict
    heads: RankHeads
    group_sizes: dict[str, int]
    tensors: dict[str, torch.Tensor]
    masked_o_proj: bool

    def dense(self, name: str) -> np.ndarray:
        return self.tensors[name].float().numpy()


def read_rank_source(folder: Path, rank: int) -> RankSource:
    manifest = read_manifest(folder)
    if manifest["arch"] not in ARCHES:
        raise InputError(f"arch {manifest['arch']!r} is not supported", file=Path(folder) / "manifest.json")
    if manifest["config"].get("rope_scaling"):
        raise InputError("rope_scaling is not supported by the runtime, so not exported either",
                         file=Path(folder) / "manifest.json")
    return RankSource(arch=ARCHES[manifest["arch"]], dims=Dims(**manifest["dims"]), config=manifest["config"],
                      heads=RankHeads(**manifest["heads"][rank]),
                      group_sizes={name: info["group_size"] for name, info in manifest["layers"].items()},
                      tensors=read_rank(folder, rank), masked_o_proj=manifest["attn_policy"] == "masked")


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the forward pass. Each takes tensor names and returns the name of its result.

def _seq_len(g: GraphBuilder, x: str) -> str:
    """The sequence length of `x` ([batch, seq, ...]) as a 1-element int64 tensor."""
    return g.op("Slice", g.op("Shape", x), g.ints([1]), g.ints([2]), hint="seq_len")


def _positions(g: GraphBuilder, x: str) -> str:
    """Positions 0..seq-1 (prefill from an empty cache)."""
    seq = g.op("Squeeze", _seq_len(g, x), g.ints([0]), hint="seq")
    zero, one = g.scalar(0, np.int64), g.scalar(1, np.int64)
    return g.op("Range", zero, seq, one, hint="positions")


def embed(g: GraphBuilder, src: RankSource, ids: str) -> str:
    x = g.op("Gather", _embedding(g, src), ids, hint="embedded")
    if src.arch.positions:
        table = g.const(src.dense(f"{src.arch.positions}.weight"), "positions.weight")
        x = g.op("Add", x, g.op("Gather", table, _positions(g, ids), hint="position_embeds"), hint="embedded")
    return x


def norm(g: GraphBuilder, src: RankSource, name: str, x: str) -> str:
    """LayerNorm (GPTBigCode) or RMSNorm (Llama), with the runtime's epsilons."""
    weight = g.const(src.dense(f"{name}.weight"), f"{name}.weight")
    if src.arch is GPT_BIGCODE:
        return g.op("LayerNormalization", x, weight, g.const(src.dense(f"{name}.bias"), f"{name}.bias"), axis=-1,
                    epsilon=float(src.config.get("layer_norm_epsilon", 1e-5)), hint=f"{name}.out")
    eps = g.scalar(src.config.get("rms_norm_eps", 1e-6))
    mean_sq = g.op("ReduceMean", g.op("Mul", x, x), g.ints([-1]), keepdims=1)
    inv_rms = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_sq, eps)))
    return g.op("Mul", g.op("Mul", x, inv_rms), weight, hint=f"{name}.out")


def rope_tables(src: RankSource) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim], computed in fp64 and rounded once, as the runtime does per call."""
    positions = torch.arange(int(src.config.get("max_position_embeddings", 2048)))
    angles = rope_angles(src.config, positions, src.dims.head_dim)
    return angles.cos().float().numpy(), angles.sin().float().numpy()


def _rope(g: GraphBuilder, x: str, cos: str, sin: str, d: int) -> str:
    """x * cos + rotate_half(x) * sin on [batch, heads, seq, d] (halves rotated, HF Llama convention)."""
    half = g.ints([d // 2])
    x1 = g.op("Slice", x, g.ints([0]), half, g.ints([-1]))
    x2 = g.op("Slice", x, half, g.ints([d]), g.ints([-1]))
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin), hint="roped")


def _heads(g: GraphBuilder, x: str, count: int, d: int) -> str:
    """[batch, seq, count*d] -> [batch, count, seq, d]."""
    return g.op("Transpose", g.op("Reshape", x, g.ints([0, 0, count, d])), perm=[0, 2, 1, 3])


def attention(g: GraphBuilder, src: RankSource, i: int, h: str) -> str:
    """This rank's partial o_proj output for its heads, from the normed hidden state `h`."""
    arch, heads, d = src.arch, src.heads, src.dims.head_dim
    hq, hkv = heads.q_count, heads.kv_count
    if len(arch.qkv) == 1:
        q, k, v = g.ops("Split", _linear(g, src, i, arch.qkv[0], h), g.ints([hq * d, hkv * d, hkv * d]),
                        count=3, axis=-1, hint="qkv")
    else:
        q, k, v = (_linear(g, src, i, name, h) for name in arch.qkv)
    q, k, v = (_heads(g, t, n, d) for t, n in ((q, hq), (k, hkv), (v, hkv)))
    if arch is not GPT_BIGCODE:
        seq = _seq_len(g, h)
        cos, sin = (g.op("Slice", g.shared(f"rope.{n}", lambda j=j: rope_tables(src)[j]), g.ints([0]), seq,
                         g.ints([0]), hint=f"{n}_t") for j, n in enumerate(("cos", "sin")))
        q, k = _rope(g, q, cos, sin, d), _rope(g, k, cos, sin, d)
    out = _causal_attention(g, h, q, k, v, hq, hkv, d)
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.ints([0, 0, hq * d]), hint="attn_heads")
    if src.masked_o_proj:  # the whole o_proj on every rank: this rank's heads in a zero-filled full-width input
        after = (src.dims.heads - heads.q_start - hq) * d
        out = g.op("Pad", out, g.ints([0, 0, heads.q_start * d, 0, 0, after]), g.scalar(0.0), hint="attn_masked")
    return _linear(g, src, i, arch.o_proj, out)


def _linear(g: GraphBuilder, src: RankSource, i: int, name: str, x: str) -> str:
    """Decoder layer i's quantized linear `name`, as this rank's file stores it."""
    full = layer_name(src.arch, i, name)
    return emit_linear(g, x, shard_layer(src.tensors, full, src.group_sizes[full]), src.tensors.get(f"{full}.in_perm"),
                       full)


def _causal_attention(g: GraphBuilder, h: str, q: str, k: str, v: str, hq: int, hkv: int, d: int) -> str:
    """softmax(q k^T / sqrt(d) + causal mask) v, each kv head shared by hq/hkv query heads; [batch, hq, seq, d]."""
    rep = hq // hkv
    q5 = g.op("Reshape", q, g.ints([0, hkv, rep, -1, d]), hint="q_grouped")
    k5, v5 = (g.op("Unsqueeze", t, g.ints([2]), hint=n) for t, n in ((k, "k_grouped"), (v, "v_grouped")))
    scores = g.op("Div", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3])),
                  g.scalar(math.sqrt(d)), hint="scores")
    seq = _seq_len(g, h)
    ones = g.op("ConstantOfShape", g.op("Concat", seq, seq, axis=0), value=onnx.numpy_helper.from_array(
        np.ones(1, np.float32)), hint="ones")
    causal = g.op("Cast", g.op("Trilu", ones, upper=0), to=onnx.TensorProto.BOOL, hint="causal")
    masked = g.op("Where", causal, scores, g.scalar(-np.inf), hint="masked_scores")
    out = g.op("MatMul", g.op("Softmax", masked, axis=-1), v5, hint="attended")
    return g.op("Reshape", out, g.ints([0, hq, -1, d]), hint="attn_out")


def mlp(g: GraphBuilder, src: RankSource, i: int, h: str) -> str:
    """This rank's partial down_proj (c_proj) output from its slice of the intermediate."""
    arch = src.arch
    if arch.gated:
        gate, up = (_linear(g, src, i, name, h) for name in arch.mlp_in)
        inner = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up, hint="inner")
    else:
        inner = g.op("Gelu", _linear(g, src, i, arch.mlp_in[0], h), approximate="tanh", hint="inner")
    return _linear(g, src, i, arch.mlp_out, inner)


def _embedding(g: GraphBuilder, src: RankSource) -> str:
    return g.shared("embed.weight", lambda: src.dense(f"{src.arch.embed}.weight"))


def head(g: GraphBuilder, src: RankSource, x: str) -> str:
    """Final norm and lm_head; tied embeddings reuse the embedding table (transposed in the graph, not copied)."""
    h = norm(g, src, src.arch.final_norm, x)
    name = f"{src.arch.lm_head}.weight"
    if name in src.tensors:
        weight_t = g.const(src.tensors[name].float().T.contiguous().numpy(), "lm_head.weight_t")
    else:
        weight_t = g.op("Transpose", _embedding(g, src), perm=[1, 0], hint="lm_head.weight_t")
    return g.op("MatMul", h, weight_t, hint="logits_raw")


# ---------------------------------------------------------------------------------------------------------------
# Graphs.

Block = Callable[[GraphBuilder, str], str]  # graph, input tensor -> output tensor


def _blocks(src: RankSource, i: int) -> list[tuple[str, Block]]:
    """Decoder layer i as its two halves, each from the residual stream to this rank's share of an all-reduce."""
    def block(which: int, fn: Callable[[GraphBuilder, RankSource, int, str], str]) -> Block:
        return lambda g, x: fn(g, src, i, norm(g, src, layer_name(src.arch, i, src.arch.norms[which]), x))

    return [("attn", block(0, attention)), ("mlp", block(1, mlp))]


def whole_model(src: RankSource) -> onnx.ModelProto:
    """tp = 1: input_ids -> logits in one graph."""
    g = GraphBuilder("tpaware_model")
    x = embed(g, src, g.input("input_ids", INT64, ["batch", "seq"]))
    for i in range(src.dims.layers):
        for part, block in _blocks(src, i):
            x = g.op("Add", x, block(g, x), hint=f"layer{i}.{part}_residual")
    g.output(head(g, src, x), "logits", FLOAT, ["batch", "seq", src.dims.vocab])
    return g.model()


def rank_graphs(src: RankSource) -> dict[str, onnx.ModelProto]:
    """One rank's pieces, in execution order: embed, layer<i>.attn, layer<i>.mlp, ..., head."""
    hidden, ids = ("hidden", FLOAT, ["batch", "seq", src.dims.hidden]), ("input_ids", INT64, ["batch", "seq"])
    graphs = {"embed": _piece("embed", ids, lambda g, x: embed(g, src, x), ("hidden", hidden[2]))}
    for i in range(src.dims.layers):
        for part, block in _blocks(src, i):
            graphs[f"layer{i}.{part}"] = _piece(f"layer{i}.{part}", hidden, block,
                                                (f"{part}{PARTIAL_SUFFIX}", hidden[2]))
    graphs["head"] = _piece("head", hidden, lambda g, x: head(g, src, x),
                            ("logits", ["batch", "seq", src.dims.vocab]))
    return graphs


def _piece(name: str, given: tuple[str, int, list], body: Block,
           returned: tuple[str, list]) -> onnx.ModelProto:
    """A graph of one input `given` (name, type, shape) and one fp32 output `returned` (name, shape)."""
    g = GraphBuilder(f"tpaware_{name}")
    g.output(body(g, g.input(*given)), returned[0], FLOAT, returned[1])
    return g.model()


# ---------------------------------------------------------------------------------------------------------------
# The export folder.

def default_onnx_dir(engine_dir: Path) -> Path:
    """Beside the per-rank folder, never inside it: `engines/<name>-tp<N>` exports to `engines/<name>-tp<N>-onnx`."""
    engine_dir = Path(engine_dir).resolve()
    return engine_dir.with_name(f"{engine_dir.name}-onnx")


def export_onnx(engine_dir: Path, out: Path) -> dict:
    """Export every graph of the per-rank folder `engine_dir` into `out` (atomically); returns export.json's content.

    Every graph passes `onnx.checker.check_model`; the export records whether TensorRT can take it (and why not).
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    tp = manifest["tp"]
    graphs: dict[str, onnx.ModelProto] = {}
    if tp == 1:
        graphs["model.onnx"] = whole_model(read_rank_source(engine_dir, 0))
    else:
        for r in range(tp):
            for name, model in rank_graphs(read_rank_source(engine_dir, r)).items():
                graphs[f"rank{r}/{name}.onnx"] = model
    for model in graphs.values():
        onnx.checker.check_model(model, full_check=True)
    violations = {path: v for path, model in graphs.items() if (v := tensorrt_violations(model))}
    collectives = [dict(collective_points({p: m for p, m in graphs.items() if p.startswith(f"rank{r}/")}))
                   for r in range(tp)] if tp > 1 else []
    if any(c["all_gather"] for c in collectives):  # the builder never makes one; refuse to write it if it ever did
        raise AssertionError(f"an exported graph takes an activation from another rank: {collectives}")
    info = {
        "schema": EXPORT_SCHEMA, "opset": OPSET, "tp": tp, "arch": manifest["arch"],
        "source": {"folder": str(engine_dir.resolve()), "manifest_sha256": sha256_file(engine_dir / "manifest.json")},
        "precision": "fp32 activations, INT4 weights with fp32 scales",
        "graphs": list(graphs),
        "backends": ["onnxruntime"] + ([] if violations else ["tensorrt"]),
        "tensorrt_problem": next((f"{path}: {v[0]}" for path, v in violations.items()), None),
        "collectives_per_rank": collectives,
        "input_gathers": {path: _count_input_gathers(m) for path, m in graphs.items()},
    }
    with atomic_directory(out) as tmp:
        for path, model in graphs.items():
            dest = tmp / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            external = model.ByteSize() > EXTERNAL_DATA_BYTES
            onnx.save_model(model, str(dest), save_as_external_data=external, location=f"{dest.name}.data")
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2))
    return info


def _count_input_gathers(model: onnx.ModelProto) -> int:
    """Gathers on activations (a layer's local input permutation), as opposed to table lookups."""
    initializers = {t.name for t in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "Gather" and n.input[0] not in initializers)


def read_export(onnx_dir: Path, engine_dir: Path) -> dict:
    """export.json of `onnx_dir`, refusing an export made from a different (or re-converted) per-rank folder."""
    path = Path(onnx_dir) / EXPORT_FILE
    if not path.is_file():
        raise InputError("export.json not found: run `tpaware export onnx` first", file=onnx_dir)
    info = json.loads(path.read_text())
    if info.get("schema") != EXPORT_SCHEMA:
        raise InputError(f"export schema {info.get('schema')!r} is not {EXPORT_SCHEMA}; re-export", file=path)
    if info["source"]["manifest_sha256"] != sha256_file(Path(engine_dir) / "manifest.json"):
        raise InputError(f"exported from a different per-rank folder than {engine_dir}; re-export", file=path)
    return info
