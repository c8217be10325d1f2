"""The GPTQ bit layout, v1/v2 zeros, sym/asym, and our writer's checkpoints reading back identically."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.arch import Dims
from pipeline.gptq.checkpoint import read_checkpoint, write_checkpoint
from pipeline.gptq.int4 import pack_cols, pack_rows, unpack_cols, unpack_rows
from pipeline.gptq.layer import dequantize
from pipeline.synth import synth_checkpoint

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


def test_nibble_order_is_low_first_along_k():
    # Row k = 8r + i lives in nibble i of packed row r: the word 0x76543210 holds rows 0..7 with values 0..7.
    packed = torch.tensor([[0x76543210, 0x01234567]], dtype=torch.int32)
    rows = unpack_rows(packed)
    assert rows[:, 0].tolist() == list(range(8))
    assert rows[:, 1].tolist() == list(range(7, -1, -1))
    assert unpack_cols(packed)[0, :8].tolist() == list(range(8))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_rows_and_cols(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64, generator=gen).to(torch.int32)
    assert torch.equal(pack_rows(unpack_rows(words)), words)
    assert torch.equal(pack_cols(unpack_cols(words)), words)
    values = torch.randint(0, 16, (shape[0] * 8, shape[1]), dtype=torch.uint8, generator=gen)
    assert torch.equal(unpack_rows(pack_rows(values)), values)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_qzeros_pack_permute_repack_is_bit_exact(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    qzeros = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int64, generator=gen).to(torch.int32)
    perm = torch.randperm(shape[1] * 8, generator=gen)
    permuted = pack_cols(unpack_cols(qzeros)[:, perm])
    assert torch.equal(unpack_cols(permuted), unpack_cols(qzeros)[:, perm])
    assert torch.equal(pack_cols(unpack_cols(permuted)[:, torch.argsort(perm)]), qzeros)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_writer_round_trip_and_formats_agree(tmp_path, fmt, sym):
    dims = Dims(hidden=64, intermediate=128, layers=1, heads=2, kv_heads=2, vocab=32)
    ckpt = synth_checkpoint("llama", dims, group_size=32, sym=sym, checkpoint_format=fmt, seed=3)
    write_checkpoint(tmp_path / "a", ckpt, max_shard_bytes=20_000)  # several files + index
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    back = read_checkpoint(tmp_path / "a")
    assert back.quant == ckpt.quant
    assert back.dense.keys() == ckpt.dense.keys()
    for name, layer in ckpt.layers.items():
        got = back.layers[name]
        for field in ("q", "zeros", "scales", "g_idx"):
            assert torch.equal(getattr(got, field), getattr(layer, field)), (name, field)
        if sym:
            assert bool((got.zeros == 8).all())
    # Written the other way, the same layers dequantize identically: v1 really stores z - 1.
    other = "gptq_v2" if fmt == "gptq" else "gptq"
    ckpt.quant = type(ckpt.quant)(**{**ckpt.quant.__dict__, "checkpoint_format": other})
    write_checkpoint(tmp_path / "b", ckpt)
    again = read_checkpoint(tmp_path / "b")
    for name, layer in ckpt.layers.items():
        assert torch.equal(dequantize(again.layers[name]), dequantize(layer))


def test_v1_stores_zero_minus_one(tmp_path):
    dims = Dims(hidden=64, intermediate=128, layers=1, heads=2, kv_heads=2, vocab=32)
    write_checkpoint(tmp_path / "v1", synth_checkpoint("llama", dims, group_size=32, sym=True, checkpoint_format="gptq"))
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "v1" / "model.safetensors"))
    stored = unpack_cols(raw["model.layers.0.mlp.down_proj.qzeros"])
    assert bool((stored == 7).all())  # sym: z = 8, stored as 7 in GPTQ v1
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert config["quantization_config"]["checkpoint_format"] == "gptq"
    assert bool((read_checkpoint(tmp_path / "v1").layers["model.layers.0.mlp.down_proj"].zeros == 8).all())


def test_v1_zero_of_zero_borrows_from_its_neighbour_and_reads_back(tmp_path):
    # GPTQ v1 writers subtract 0x11111111 from the packed word: z = 0 wraps and borrows from the next nibble.
    dims = Dims(hidden=64, intermediate=128, layers=1, heads=2, kv_heads=2, vocab=32)
    ckpt = synth_checkpoint("llama", dims, group_size=32, sym=False, checkpoint_format="gptq")
    name = "model.layers.0.mlp.down_proj"
    layer = ckpt.layers[name]
    zeros = layer.zeros.clone()
    zeros[0, :8] = torch.tensor([0, 5, 0, 0, 15, 1, 0, 9], dtype=torch.uint8)
    ckpt.layers[name] = type(layer)(layer.q, zeros, layer.scales, layer.g_idx, layer.group_size)
    write_checkpoint(tmp_path / "v1", ckpt)
    from safetensors.torch import load_file

    word = int(load_file(str(tmp_path / "v1" / "model.safetensors"))[f"{name}.qzeros"][0, 0]) & 0xFFFFFFFF
    expected = (sum(int(z) << (4 * i) for i, z in enumerate(zeros[0, :8])) - 0x11111111) % 2**32
    assert word == expected
    assert torch.equal(read_checkpoint(tmp_path / "v1").layers[name].zeros, zeros)
