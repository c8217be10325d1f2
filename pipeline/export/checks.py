"""Checks on exported graphs that need no TensorRT: what its ONNX parser demands of INT4 weights, and where the
collectives fall.

TensorRT 10's ONNX importer takes INT4 only as weight-only `DequantizeLinear` of a constant, signed INT4, symmetric
(no zero point, or an all-zero one), blocked along one of the last two dimensions with 64 or 128 rows per block, with
an even last dimension, and a constant scale of the weight's rank. These are checked here on every INT4 node, so the
`build --backend tensorrt` step that cannot run on our machines starts from graphs known to satisfy them.
"""

from __future__ import annotations

from collections import Counter

import onnx
from onnx import TensorProto

from pipeline.export.qlinear import TRT_BLOCKS

REPLICATED_INPUTS = ("input_ids", "hidden")  # what every rank holds whole: token ids, the all-reduced residual
PARTIAL_SUFFIX = "_partial"  # a graph output that is this rank's share of an all-reduce


def int4_weights(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    """Every DequantizeLinear whose input is a 4-bit initializer, with that initializer."""
    inits = {t.name: t for t in model.graph.initializer}
    return [(node, inits[node.input[0]]) for node in model.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in inits
            and inits[node.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)]


def tensorrt_violations(model: onnx.ModelProto) -> list[str]:
    """What in `model` TensorRT's INT4 weight-only path would refuse; empty when it takes the graph."""
    inits = {t.name: t for t in model.graph.initializer}
    problems = [f"{node.name}: {node.domain}::{node.op_type} (block {_attrs(node).get('block_size')}) is "
                f"onnxruntime-only; TensorRT's INT4 blocks are {' or '.join(map(str, sorted(TRT_BLOCKS)))} rows"
                for node in model.graph.node if node.domain not in ("", "ai.onnx")]
    for node, weight in int4_weights(model):
        attrs = _attrs(node)
        rank = len(weight.dims)
        if weight.data_type != TensorProto.INT4:
            problems.append(f"{node.name}: weight is UINT4; TensorRT takes signed INT4")
        if len(node.input) > 2 and node.input[2]:
            problems.append(f"{node.name}: has a zero point; TensorRT takes symmetric INT4 only")
        if attrs.get("block_size") not in TRT_BLOCKS:
            problems.append(f"{node.name}: block_size {attrs.get('block_size')} is not one of {TRT_BLOCKS}")
        if attrs.get("axis", 1) % rank < rank - 2:
            problems.append(f"{node.name}: blocked along axis {attrs.get('axis')}, not one of the last two")
        if weight.dims[-1] % 2:
            problems.append(f"{node.name}: INT4 weight's last dimension {weight.dims[-1]} is odd")
        scale = inits.get(node.input[1])
        if scale is None or len(scale.dims) != rank:
            problems.append(f"{node.name}: scale must be a constant of the weight's rank")
    return problems


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def collective_points(graphs: dict[str, onnx.ModelProto]) -> Counter[str]:
    """The collectives one rank's graphs imply, since ONNX has none: each partial output is an all-reduce, and each
    input that is neither token ids nor the replicated hidden state is an activation gathered from other ranks."""
    counts: Counter[str] = Counter(all_reduce=0, all_gather=0)
    for model in graphs.values():
        counts["all_reduce"] += sum(o.name.endswith(PARTIAL_SUFFIX) for o in model.graph.output)
        counts["all_gather"] += sum(i.name not in REPLICATED_INPUTS for i in model.graph.input)
    return counts
