"""ONNX export: the slot layout and INT4 linears are exact, every graph is valid ONNX in the form TensorRT accepts,
the graphs compute what each rank's runtime computes, no graph needs an activation from another rank, and
`tpaware build --backend tensorrt` refuses clearly where it cannot run."""

from __future__ import annotations

import pytest

# The export and its checks need the `onnx` extra (onnx, onnxruntime, Polygraphy): without it, skip, not fail to import.
for _module in ("onnx", "onnxruntime", "polygraphy"):
    pytest.importorskip(_module, reason="needs the onnx extra: pip install -e '.[onnx]'")

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from typer.testing import CliRunner

from pipeline.build import build, profile_shapes, tensorrt_unavailable
from pipeline.cli import app
from pipeline.compare import chain_logits, ort_session
from pipeline.errors import InputError
from pipeline.export.checks import collective_points, int4_weights, tensorrt_violations
from pipeline.export.graph import FLOAT, GraphBuilder
from pipeline.export.onnx import export_onnx
from pipeline.export.qlinear import block_size, dequantize_slots, emit_linear, slot_layout
from pipeline.gptq.layer import act_order_perm, dequantize, select
from pipeline.reference import simulate_tp
from pipeline.shard import convert
from pipeline.synth import synth_layer



@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """`exported(model_type, tp, group_size=64)` -> (per-rank folder, export folder), cached."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(model_type: str, tp: int, group_size: int = 64) -> tuple[Path, Path]:
        key = (model_type, tp, group_size)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{model_type}-tp{tp}-g{group_size}")
            convert(tiny_checkpoint(model_type, group_size=group_size), tp, root / "ranks")
            export_onnx(root / "ranks", root / "onnx")
            cache[key] = root / "ranks", root / "onnx"
        return cache[key]

    return make


def _shard(layer, rows: torch.Tensor):
    """A local-sort shard of `rows`: sorted by group locally, so it holds partial groups (g_idx kept)."""
    local = act_order_perm(layer.g_idx[rows])
    return select(layer, rows[local], torch.arange(layer.out_features)), local


@settings(max_examples=25, deadline=None)
@given(k_groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128]), block=st.sampled_from([32, 64]),
       split=st.booleans(), seed=st.integers(0, 2**16))
def test_slot_layout_is_exact(k_groups, group_size, block, split, seed):
    """Gathering `[x, 0]` by `source` and multiplying the slot weight equals the layer's own x[:, in_perm] @ W."""
    gen = torch.Generator().manual_seed(seed)
    layer = synth_layer(k_groups * group_size, 16, group_size, sym=False, generator=gen)
    in_perm = None
    if split:  # a row-parallel shard in checkpoint order: partial groups, local sort
        layer, in_perm = _shard(layer, torch.arange(layer.in_features // 2))
    layout = slot_layout(layer, in_perm, block)
    assert layout.q.shape[0] % block == 0 and layout.scales.shape[0] == layout.q.shape[0] // block
    x = torch.randn(3, layer.in_features, dtype=torch.float64, generator=gen)
    expected = (x if in_perm is None else x[:, in_perm]) @ dequantize(layer)
    padded = torch.cat([x, torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(padded[:, layout.source] @ dequantize_slots(layout), expected, rtol=1e-12, atol=1e-12)


def _linear_model(layer, in_perm) -> onnx.ModelProto:
    g = GraphBuilder("linear")
    g.input("x", FLOAT, ["batch", "seq", layer.in_features])
    g.output(emit_linear(g, "x", layer, in_perm, "l"), "y", FLOAT, ["batch", "seq", layer.out_features])
    return g.model()


@pytest.mark.parametrize("group_size, sym, split", [(64, False, True), (128, True, False), (128, False, True),
                                                    (32, False, True), (32, True, False)])
def test_int4_linear_on_onnxruntime_is_exact(group_size, sym, split):
    gen = torch.Generator().manual_seed(group_size)
    layer = synth_layer(4 * group_size, 24, group_size, sym, gen, bias=True)
    in_perm = None
    if split:
        layer, in_perm = _shard(layer, torch.arange(layer.in_features // 2))
    model = _linear_model(layer, in_perm)
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    if group_size == 32:  # onnxruntime only: MatMulNBits with packed zeros and no g_idx input
        (nbits,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits.input) == 4 and nbits.domain == "com.microsoft"
        assert tensorrt_violations(model)
    else:
        assert "DequantizeLinear" in ops and tensorrt_violations(model) == []
        assert ("ReduceSum" in ops) == (not sym)  # the zero-point correction, only where zeros are not 8
    assert ops.count("Gather") == 1  # the input permutation (and padding), local to the layer
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, generator=gen)
    expected = (x if in_perm is None else x[..., in_perm]) @ dequantize(layer) + layer.bias.double()
    (y,) = ort_session(model.SerializeToString()).run(None, {"x": x.float().numpy()})
    np.testing.assert_allclose(y, expected.numpy(), rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
@pytest.mark.parametrize("tp", [1, 2])
def test_export_is_valid_tensorrt_form_and_matches_ranks(exported, model_type, tp):
    folder, out = exported(model_type, tp)
    info = json.loads((out / "export.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.onnx"))
    assert sorted(info["graphs"]) == files
    assert info["backends"] == ["onnxruntime", "tensorrt"] and info["tensorrt_problem"] is None
    layers = 2
    expected_files = ["model.onnx"] if tp == 1 else [
        f"rank{r}/{g}.onnx" for r in range(tp) for g in ["embed", "head"] + [
            f"layer{i}.{p}" for i in range(layers) for p in ("attn", "mlp")]]
    assert files == sorted(expected_files)
    int4 = 0
    for path in files:
        model = onnx.load(str(out / path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version == 21
        for node, weight in int4_weights(model):  # TensorRT's INT4 weight-only rules, spelled out
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert weight.data_type == onnx.TensorProto.INT4
            assert attrs["block_size"] in (64, 128) and attrs["axis"] == 0
            assert len(node.input) == 2  # no zero point
            assert weight.dims[-1] % 2 == 0
            int4 += 1
        assert tensorrt_violations(model) == []
    assert int4 == tp * layers * (7 if model_type == "llama" else 4)  # every quantized linear, on every rank
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(tp))
    expected = simulate_tp(folder, ids, torch.float32)[0][0].numpy()
    np.testing.assert_allclose(_run_export(out, info, ids.numpy()), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("options, policy", [({"group_size": 64}, "masked"),
                                             ({"group_size": -1, "desc_act": False}, "local")])
def test_other_plans_export_exactly(tiny_checkpoint, tmp_path, options, policy):
    """o_proj unsharded with a zero-filled input (masked); one group per layer (group size -1), whole per rank."""
    folder = tmp_path / "ranks"
    convert(tiny_checkpoint("llama", **options), 2, folder, attn_policy=policy)
    info = export_onnx(folder, tmp_path / "onnx")
    assert info["tensorrt_problem"] is None
    if options["group_size"] == -1:  # blocks chosen to fit every shard's rows: nothing padded, nothing gathered
        ops = {n.op_type for g in info["graphs"] for n in onnx.load(str(tmp_path / "onnx" / g)).graph.node}
        assert "Pad" not in ops and sum(info["input_gathers"].values()) == 0
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(5))
    expected = simulate_tp(folder, ids, torch.float32)[0][0].numpy()
    np.testing.assert_allclose(_run_export(tmp_path / "onnx", info, ids.numpy()), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())


def test_block_size_avoids_padding_where_it_can():
    gen = torch.Generator().manual_seed(0)
    whole = synth_layer(256, 8, 128, sym=True, generator=gen, desc_act=False)
    assert block_size(whole) == 128
    half, _ = _shard(whole, torch.arange(64))  # 64 rows of one 128-row group
    assert block_size(half) == 64 and not slot_layout(half, None, 64).padded
    assert block_size(synth_layer(64, 8, 32, sym=True, generator=gen)) == 32  # onnxruntime's MatMulNBits


def _run_export(out: Path, info: dict, ids: np.ndarray) -> np.ndarray:
    """Logits of the export on onnxruntime, summing the ranks' partial outputs where tp > 1."""
    def run(graph: str, feed: dict) -> np.ndarray:
        return ort_session(out / graph).run(None, feed)[0]

    if info["tp"] == 1:
        return run("model.onnx", {"input_ids": ids})
    return chain_logits(run, info["graphs"], info["tp"], ids)


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_no_graph_gathers_across_ranks(exported, model_type):
    """The collectives the graphs imply equal the runtime's: two all-reduces per layer, no all-gather; and the
    TP-aware down projection gathers nothing, its rank's intermediate slice is already its input."""
    folder, out = exported(model_type, 2)
    info = json.loads((out / "export.json").read_text())
    _, runtime_counts = simulate_tp(folder, torch.zeros(1, 3, dtype=torch.long), torch.float32)
    for r in range(2):
        graphs = {g: onnx.load(str(out / g)) for g in info["graphs"] if g.startswith(f"rank{r}/")}
        counts = collective_points(graphs)
        assert counts == {"all_reduce": runtime_counts[r]["all_reduce"], "all_gather": 0}
        assert info["collectives_per_rank"][r] == counts
        for i in range(2):  # gathers: gate and up (or c_fc), whose input is replicated; never the down input
            model = graphs[f"rank{r}/layer{i}.mlp.onnx"]
            gathered = {n.output[0].removesuffix(".x_perm") for n in model.graph.node if n.op_type == "Gather"}
            expected = ({f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"}
                        if model_type == "llama" else {f"transformer.h.{i}.mlp.c_fc"})
            assert gathered == expected
            assert info["input_gathers"][f"rank{r}/layer{i}.mlp.onnx"] == len(expected)


def test_group_size_32_exports_for_onnxruntime_only(exported):
    folder, out = exported("llama", 2, group_size=32)
    info = json.loads((out / "export.json").read_text())
    assert info["backends"] == ["onnxruntime"] and "64 or 128" in info["tensorrt_problem"]
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    expected = simulate_tp(folder, ids, torch.float32)[0][0].numpy()
    np.testing.assert_allclose(_run_export(out, info, ids.numpy()), expected, rtol=0,
                               atol=1e-5 * np.abs(expected).max())
    engines = out.parent / "trt"
    with pytest.raises(InputError, match="TensorRT cannot take this graph.*64 or 128"):
        build(folder, "tensorrt", out, engines)
    assert not engines.exists()


def _break(model: onnx.ModelProto, rule: str) -> onnx.ModelProto:
    """A copy of `model` whose first INT4 DequantizeLinear breaks one TensorRT rule."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node, weight = int4_weights(broken)[0]
    if rule == "zero point":
        scale_dims = next(t.dims for t in broken.graph.initializer if t.name == node.input[1])
        broken.graph.initializer.append(numpy_helper.from_array(np.zeros(scale_dims, ml_dtypes.int4), "zp"))
        node.input.append("zp")
    elif rule == "block":
        for attr in node.attribute:
            if attr.name == "block_size":
                attr.i = 32
    elif rule == "uint4":
        weight.data_type = onnx.TensorProto.UINT4
    elif rule == "odd":
        weight.dims[-1] = 3
    return broken


@pytest.mark.parametrize("rule, message", [("zero point", "zero point"), ("block", "block_size 32"),
                                           ("uint4", "UINT4"), ("odd", "odd")])
def test_tensorrt_checks_catch_each_rule(exported, rule, message):
    _, out = exported("llama", 1)
    model = onnx.load(str(out / "model.onnx"))
    problems = tensorrt_violations(_break(model, rule))
    assert len(problems) == 1 and message in problems[0]


def test_build_tensorrt_refuses_in_one_line_without_tensorrt(exported, tmp_path):
    folder, out = exported("llama", 2)
    missing = tensorrt_unavailable()
    if missing is None:
        pytest.skip("TensorRT and a GPU are present: the refusal does not apply")
    result = CliRunner().invoke(app, ["build", str(folder), "--onnx", str(out), "--out", str(tmp_path / "engines")])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "TensorRT is not installed" in message and "pip install" in message
    assert not (tmp_path / "engines").exists()


def test_profile_shapes_cover_batch_and_sequence(exported):
    _, out = exported("llama", 2)
    profile = profile_shapes(onnx.load(str(out / "rank0/layer0.attn.onnx"), load_external_data=False), 4, 256)
    assert profile == {"hidden": ((1, 1, 128), (1, 64, 128), (4, 256, 128))}
    profile = profile_shapes(onnx.load(str(out / "rank0/embed.onnx"), load_external_data=False), 4, 256)
    assert profile == {"input_ids": ((1, 1), (1, 64), (4, 256))}


def test_cli_export_onnx(tiny_checkpoint, tmp_path):
    convert(tiny_checkpoint("gpt_bigcode", group_size=64), 2, tmp_path / "m-tp2")
    result = CliRunner().invoke(app, ["export", "onnx", str(tmp_path / "m-tp2")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m-tp2-onnx" / "rank1" / "head.onnx").is_file()  # default: beside the per-rank folder
    assert "all_gather': 0" in result.output
    bad = CliRunner().invoke(app, ["export", "onnx", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "manifest.json not found" in bad.output


@pytest.mark.slow
def test_demo_model_exports_at_tp1(tmp_path, demo_checkpoint):
    source = demo_checkpoint
    convert(source, 1, tmp_path / "ranks")
    info = export_onnx(tmp_path / "ranks", tmp_path / "onnx")
    assert info["backends"] == ["onnxruntime", "tensorrt"] or "64 or 128" in info["tensorrt_problem"]
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = simulate_tp(tmp_path / "ranks", ids, torch.float32)[0][0].numpy()
    np.testing.assert_allclose(_run_export(tmp_path / "onnx", info, ids.numpy()), expected, rtol=0,
                               atol=1e-4 * np.abs(expected).max())
