"""The TP runtime: three modes over the same per-rank files, in threads (fp64, exact) and in real gloo processes
(fp32, against transformers), with the KV cache, greedy tokens and the collectives each mode implies."""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pipeline.arch import ARCHES, layer_name
from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import read_checkpoint
from pipeline.gptq.layer import dequantize, select
from pipeline.plan import local_sort_row_layer
from pipeline.rankfolder import rank_file, read_manifest, read_rank
from pipeline.reference import reference_model
from pipeline.runtime.comm import Comm, ThreadGroup
from pipeline.runtime.generate import Generation, greedy
from pipeline.runtime.launch import RankSetup, run_ranks
from pipeline.runtime.linear import Linear, kernel_linear
from pipeline.runtime.loader import load_rank_model
from pipeline.runtime.model import StaticKVCache, attend, attention_bias, causal_mask
from pipeline.runtime.reshard import MODES, original_layers, rank_layers
from pipeline.shard import convert
from pipeline.validate import hf_reference, reference_logits, reference_tokens

ARCH_NAMES = ("llama", "gpt_bigcode")
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    """`engine(model_type, tp, **convert_kwargs)` -> converted per-rank folder (cached)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str, tp: int, group_size: int = 32, **kwargs) -> Path:
        key = (model_type, tp, group_size, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp(f"{model_type}-tp{tp}") / "engine"
            convert(tiny_checkpoint(model_type, group_size=group_size), tp, cache[key], **kwargs)
        return cache[key]

    return make


def prompt(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(1))


def per_layer_counts(layers: int, forwards: int, mode: str) -> dict[str, int]:
    """What each mode implies: an AllReduce after o_proj and after down; naive AllGathers down's input too."""
    counts = {"all_reduce": 2 * layers * forwards}
    if mode == "naive":
        counts["all_gather"] = layers * forwards
    return counts


def thread_greedy(folder: Path, ids: torch.Tensor, mode: str) -> tuple[list[Generation], list[Comm]]:
    """Greedy generation on every rank as threads of this process (fp64), with each rank's communicator."""
    group = ThreadGroup(read_manifest(folder)["tp"])

    def rank(r: int) -> tuple[Generation, Comm]:
        comm = group.comm(r)
        return greedy(load_rank_model(folder, comm, torch.float64, mode=mode), ids, MAX_TOKENS), comm

    with ThreadPoolExecutor(max_workers=group.world_size) as pool:
        results = list(pool.map(rank, range(group.world_size)))
    return [g for g, _ in results], [c for _, c in results]


@pytest.mark.parametrize("case", [("llama", 1, 32, "local"), ("llama", 2, 32, "local"), ("llama", 4, 32, "local"),
                                  ("gpt_bigcode", 4, 32, "local"), ("llama", 4, 32, "masked"),
                                  ("llama", 4, 128, "local")])  # group 128 at tp 4: no MLP trick, shared groups
def test_original_layers_rebuilt_bit_exactly(tiny_checkpoint, engine, case):
    """Every original layer, g_idx, zeros, scales and bias included, comes back from the rank files alone."""
    model_type, tp, group_size, attn_policy = case
    ckpt = read_checkpoint(tiny_checkpoint(model_type, group_size=group_size))
    folder = engine(model_type, tp, group_size, attn_policy=attn_policy)
    rebuilt = original_layers(folder, read_manifest(folder), list(ckpt.layers))
    for name, layer in ckpt.layers.items():
        got = rebuilt[name]
        for part in ("q", "zeros", "scales", "g_idx"):
            assert torch.equal(getattr(got, part), getattr(layer, part)), f"{name}.{part}"
        assert (got.bias is None) == (layer.bias is None)
        assert layer.bias is None or torch.equal(got.bias, layer.bias), f"{name}.bias"


def assert_exact(checkpoint: Path, folder: Path, mode: str) -> None:
    """fp64 on every rank: logits (prefill and each KV-cache step) equal the unpermuted reference to rounding, the
    greedy tokens are identical, and the collectives are exactly those the mode implies (tpaware: no AllGather)."""
    ref = reference_model(read_checkpoint(checkpoint))
    ids = prompt(ref.dims.vocab)
    expected = greedy(ref, ids, MAX_TOKENS)
    gens, comms = thread_greedy(folder, ids, mode)
    for gen, comm in zip(gens, comms):
        assert torch.equal(gen.tokens, expected.tokens)
        assert (gen.logits - expected.logits).abs().max() <= 1e-12 * expected.logits.abs().max()  # summation order
        assert dict(comm.counts) == per_layer_counts(ref.dims.layers, MAX_TOKENS, mode)


def test_kv_cache_changes_nothing(tiny_checkpoint):
    ref = reference_model(read_checkpoint(tiny_checkpoint("gpt_bigcode", group_size=32)))
    ids = prompt(ref.dims.vocab)
    gen = greedy(ref, ids, MAX_TOKENS)
    no_cache = ref(torch.cat([ids, gen.tokens[:, :-1]], dim=1))
    torch.testing.assert_close(gen.logits, no_cache, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("model_type", ARCH_NAMES)
def test_modes_are_exact_in_fp64(tiny_checkpoint, engine, model_type, tp, mode):
    assert_exact(tiny_checkpoint(model_type, group_size=32), engine(model_type, tp), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size, tp, attn_policy", [(128, 4, "local"), (32, 2, "masked")])
def test_modes_on_other_layouts(tiny_checkpoint, engine, mode, group_size, tp, attn_policy):
    """Folders without the MLP trick (K_down / tp = 64 < group_size: down is local-sort in the files) or with an
    unsharded, masked o_proj run exactly in every mode too."""
    folder = engine("llama", tp, group_size, attn_policy=attn_policy)
    policies = {info["policy"] for info in read_manifest(folder)["layers"].values()}
    assert ("masked" in policies) == (attn_policy == "masked")
    assert ("tpaware" in policies) == (group_size == 32)
    assert_exact(tiny_checkpoint("llama", group_size=group_size), folder, mode)


@pytest.mark.parametrize("shared", [True, False])
def test_same_input_layers_run_fused(tiny_checkpoint, tmp_path, shared):
    """q/k/v and gate/up that share an act order (as GPTQ makes them) run as one matmul each on every rank; with one
    act order per layer they cannot and run apart.  Both are exact."""
    checkpoint = tiny_checkpoint("llama", group_size=32, shared_act_order=shared)
    convert(checkpoint, 2, tmp_path / "engine")
    for rank in range(2):
        model = load_rank_model(tmp_path / "engine", Comm(rank, 2), torch.float64)
        fused = sorted(name for name in model.linears if "+" in name)
        assert len(fused) == (2 * model.dims.layers if shared else 0), fused
    assert_exact(checkpoint, tmp_path / "engine", "tpaware")


def test_a_misplaced_row_is_caught(tiny_checkpoint, engine, tmp_path):
    """The bounds have teeth: swapping two inputs of one layer on one rank moves the logits by far more than 1e-5 of
    their scale (the fp32 bound of the process test below)."""
    folder = tmp_path / "engine"
    shutil.copytree(engine("llama", 2), folder)
    tensors = read_rank(folder, 0)
    name = f"{layer_name(ARCHES['llama'], 0, 'mlp.up_proj')}.in_perm"
    tensors[name][[0, -1]] = tensors[name][[-1, 0]]
    save_file(tensors, str(folder / rank_file(0)))
    ref = reference_model(read_checkpoint(tiny_checkpoint("llama", group_size=32)))
    ids = prompt(ref.dims.vocab)
    expected = ref(ids)
    gens, _ = thread_greedy(folder, ids, "tpaware")
    assert (gens[0].logits[:, : ids.shape[1]] - expected).abs().max() > 1e-3 * expected.abs().max()


def test_mode_layouts_over_the_same_files(tiny_checkpoint, engine):
    """What each mode holds at tp 2: tpaware's down shard has whole groups and no gather; naive keeps that shard but
    gathers its full-width input; local-sort sorts checkpoint-order rows locally and keeps more groups; the baselines'
    gate/up give the intermediate's columns in checkpoint order."""
    ckpt = read_checkpoint(tiny_checkpoint("llama", group_size=32))
    folder = engine("llama", 2)
    manifest, tp = read_manifest(folder), 2
    down, gate = (layer_name(ARCHES["llama"], 0, n) for n in ("mlp.down_proj", "mlp.gate_proj"))
    groups = ckpt.layers[down].scales.shape[0]
    x = torch.randn(3, ckpt.layers[gate].in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full_gate = x @ dequantize(ckpt.layers[gate])
    for r in range(tp):
        tensors = read_rank(folder, r)
        layers = {mode: rank_layers(folder, manifest, tensors, r, mode) for mode in MODES}
        assert layers["tpaware"][down].in_perm is None and layers["tpaware"][down].gather is None
        assert layers["tpaware"][down].layer.scales.shape[0] == groups // tp
        assert torch.equal(layers["naive"][down].layer.q, layers["tpaware"][down].layer.q)
        assert torch.equal(layers["naive"][down].gather, tensors[f"{down}.rows"])
        assert layers["local-sort"][down].in_perm is not None
        assert layers["local-sort"][down].layer.scales.shape[0] > groups // tp
        for mode in ("naive", "local-sort"):
            spec = layers[mode][gate]
            y = Linear.from_quant(spec.layer, spec.in_perm, torch.float64)(x)
            assert torch.allclose(y, full_gate.chunk(tp, dim=1)[r], rtol=1e-12, atol=1e-12)


def test_kernel_linear_wiring_matches_exact_path():
    """The layer handed to `plugins.ops.w4a16_linear` (packed v2 tensors, in_perm, bias; groups padded whole where a
    shard cuts them) computes what the exact path does; the op's CPU reference stands in for the GPU kernel."""
    ops = pytest.importorskip("plugins.ops")
    from pipeline.synth import synth_layer
    from plugins.layout import GROUP_SIZES

    gen = torch.Generator().manual_seed(3)
    act_order = synth_layer(1024, 64, 128, sym=False, generator=gen, desc_act=True, bias=True)
    local_sort = local_sort_row_layer(act_order.g_idx, 2, "test")  # rank 0's half: part of nearly every group
    cases = [  # (layer, in_perm, rows the kernel multiplies)
        (synth_layer(128, 64, 32, sym=False, generator=gen, bias=True), torch.randperm(128, generator=gen), 128),
        (act_order, torch.randperm(1024, generator=gen), 1024),  # whole groups in act order: reordered, no padding
        (select(act_order, local_sort.rows[0], torch.arange(64)), local_sort.in_perm[0], None),
    ]
    for layer, in_perm, rows in cases:
        kernel = kernel_linear(ops.w4a16_linear, layer, in_perm, torch.float32, "cpu")
        kernel_rows = kernel.weights["qweight"].shape[0] * 8
        assert kernel.group_size in GROUP_SIZES
        if rows is None:  # padded: blocks of 64 add about half of the 512 rows, where 128 would double them
            assert layer.in_features < kernel_rows < 2 * layer.in_features
        else:
            assert kernel_rows == rows
        x = torch.randn(2, 3, layer.in_features, generator=gen)
        torch.testing.assert_close(kernel(x), Linear.from_quant(layer, in_perm, torch.float32)(x))


def _modes_task(folders: dict[str, str], ids: torch.Tensor, comm: Comm, device: torch.device
                ) -> dict[str, torch.Tensor]:
    """In each rank process: every architecture in every mode, with the collectives each one issued."""
    out = {}
    for model_type, folder in folders.items():
        for mode in MODES:
            before = dict(comm.counts)
            gen = greedy(RankSetup(folder, mode).load(comm, device), ids, MAX_TOKENS)
            out[f"{model_type}/{mode}/tokens"], out[f"{model_type}/{mode}/logits"] = gen.tokens, gen.logits
            for name in ("all_reduce", "all_gather"):
                out[f"{model_type}/{mode}/{name}"] = torch.tensor(comm.counts[name] - before.get(name, 0))
    return out


@pytest.fixture(scope="module")
def hf_expected(engine):
    """transformers' own model (fp64) per architecture: its greedy tokens and logits along them."""
    expected = {}
    for model_type in ARCH_NAMES:
        hf = hf_reference(engine(model_type, 1))
        ids = prompt(hf.config.vocab_size)
        tokens = reference_tokens(hf, ids, MAX_TOKENS)
        expected[model_type] = tokens, reference_logits(hf, ids, tokens)
    return expected


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gloo_processes_match_transformers(engine, hf_expected, tp):
    """One process per rank over gloo, fp32, every architecture and mode: identical greedy tokens, logits within
    1e-5 of the largest reference logit, and exactly the collectives the mode implies.

    Why 1e-5 relative: the weights are exact in fp32 (4-bit integer times an fp16 scale), so only rounding differs
    from the fp64 reference, in reductions of at most 256 terms chained over ~10 matmuls; fp32's unit roundoff is
    6e-8, and the errors measured are 2e-7 to 6e-7 of the largest logit. A misplaced row, column or group moves logits
    by a sizeable fraction of their scale (8% for one swapped pair, `test_a_misplaced_row_is_caught`), four orders of
    magnitude above the bound.
    """
    folders = {model_type: str(engine(model_type, tp)) for model_type in ARCH_NAMES}
    ids = prompt(read_manifest(Path(folders["llama"]))["dims"]["vocab"])
    results = run_ranks(tp, partial(_modes_task, folders, ids), timeout=300)
    for model_type in ARCH_NAMES:
        ref_tokens, ref_logits = hf_expected[model_type]
        layers = read_manifest(Path(folders[model_type]))["dims"]["layers"]
        for mode in MODES:
            for rank in results:
                got = {k.rsplit("/", 1)[1]: v for k, v in rank.values.items() if k.startswith(f"{model_type}/{mode}/")}
                assert torch.equal(got["tokens"], ref_tokens), (model_type, mode)
                err = (got["logits"].double() - ref_logits).abs().max()
                assert err <= 1e-5 * ref_logits.abs().max(), (model_type, mode, float(err))
                counts = {k: int(got[k]) for k in ("all_reduce", "all_gather") if got[k]}
                assert counts == per_layer_counts(layers, MAX_TOKENS, mode), (model_type, mode)


def _pid_then(action: str, pid_dir: str, comm: Comm, device: torch.device) -> dict[str, torch.Tensor]:
    Path(pid_dir, f"{comm.rank}.pid").write_text(str(os.getpid()))
    if action == "bad-input" and comm.rank == 1:
        raise InputError("rank 1 refuses its input")
    if action == "bad-input":
        comm.all_reduce(torch.ones(1))  # blocks: rank 1 never joins, so only the launcher can end rank 0
    time.sleep(600)
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("action, tp, error", [("bad-input", 2, InputError), ("hang", 1, TimeoutError)])
def test_launcher_leaves_no_process(tmp_path, action, tp, error):
    """A rank's bad input surfaces as the InputError the CLI prints; a hung rank hits the deadline; either way every
    rank process is gone when `run_ranks` returns."""
    # The hang deadline leaves room for the rank to start (spawn, import torch) on a loaded machine: at 10 s, under
    # pytest -n 8 on a 16-core GPU host, the deadline came before the rank had written its pid.
    with pytest.raises(error):
        run_ranks(tp, partial(_pid_then, action, str(tmp_path)), timeout=30 if action == "hang" else 120)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert pids
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_run_command_generates_the_reference_tokens(tiny_checkpoint, engine):
    folder = engine("llama", 2)
    ref = reference_model(read_checkpoint(tiny_checkpoint("llama", group_size=32)))
    ids = prompt(ref.dims.vocab)[:1]
    result = CliRunner().invoke(app, ["run", str(folder), "--prompt-ids", ",".join(map(str, ids[0].tolist())),
                                      "--max-tokens", "4", "--mode", "naive"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == [str(t) for t in greedy(ref, ids, 4).tokens[0].tolist()]
    assert "'all_gather': 8" in result.output  # naive: one per layer (2) per forward (4)
    words = " ".join(result.output.split())  # rich wraps long lines
    step_ms = float(re.search(r", ([0-9.]+) ms per decode step;", words).group(1))  # the 4th token's step
    assert step_ms > 0


def test_run_command_refuses_bad_input(engine):
    runner = CliRunner()
    folder = str(engine("llama", 2))
    for args in (["--prompt-ids", "1,x"], ["--prompt-ids", "1,2", "--mode", "bogus"], ["--prompt", "hello"],
                 ["--prompt-ids", "100000"]):
        result = runner.invoke(app, ["run", folder, *args])
        assert result.exit_code == 2, (args, result.output)


def test_attention_of_a_cached_step_is_the_softmax_over_visible_keys():
    """The cache's mask as `Transformer.step` turns it into a bias, and `attend` (PyTorch's fused attention), give for
    queries at positions 3..5 of a static cache of 8 slots exactly softmax(q k^T / sqrt(d)) v over slots 0..p,
    written out in fp64, with 6 q heads over 2 kv heads (q head h reads kv head h // 3): a wrong mask polarity, a slot
    off by one, another scale or a q head paired with the wrong kv head fails it."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 16, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(2, 2, 8, 16, dtype=torch.float64, generator=gen) for _ in range(2))
    cache = StaticKVCache(layers=1, batch=2, kv_heads=2, max_len=8, head_dim=16, dtype=torch.float64)
    cache.advance(3)
    positions = cache.positions(3, torch.device("cpu"))
    visible = cache.mask(positions)
    assert visible.tolist() == causal_mask(torch.tensor([3, 4, 5]), 8).tolist()
    bias = attention_bias(visible, torch.float64, group=3)
    expected = torch.empty_like(q)
    kv_of = torch.arange(6) // 3
    for t, p in enumerate(range(3, 6)):
        keys, values = k[:, kv_of, : p + 1], v[:, kv_of, : p + 1]  # [2, 6, p + 1, 16]
        scores = q[:, :, t : t + 1] @ keys.transpose(-1, -2) / 4.0  # [2, 6, 1, p + 1]; sqrt(16) = 4
        expected[:, :, t : t + 1] = torch.softmax(scores, dim=-1) @ values
    assert torch.allclose(attend(q, k, v, bias), expected, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("batch,group,t,slots", [(2, 2, 16, 32), (1, 2, 8, 72), (1, 2, 1, 72), (1, 8, 1, 236),
                                                 (1, 8, 32, 236), (1, 4, 8, 80)])
def test_attention_on_a_gpu_in_fp16_matches_fp64(batch, group, t, slots):
    """`attend` in fp16 on CUDA, whichever fused backend PyTorch picks for it, against the same call in fp64 on the CPU
    (the test above proves that one), at the shapes generation gives it: a prefill of t tokens or a decode step over a
    static cache of `slots` slots, slot counts that are and are not multiples of 64, 8 kv heads of size 128."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 8 * group, t, 128, dtype=torch.float64, generator=gen)
    k, v = (torch.randn(batch, 8, slots, 128, dtype=torch.float64, generator=gen) for _ in range(2))
    positions = torch.arange(t) + 3
    want = attend(q, k, v, attention_bias(causal_mask(positions, slots), torch.float64, group))
    bias = attention_bias(causal_mask(positions.cuda(), slots), torch.float16, group)
    got = attend(q.half().cuda(), k.half().cuda(), v.half().cuda(), bias)
    assert (got.double().cpu() - want).abs().max().item() < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_greedy_on_a_gpu_replays_one_graph_and_decodes_as_eager_steps_do(model_type, tiny_checkpoint, tmp_path,
                                                                       monkeypatch):
    """fp16, batch 2: the same tokens as the eager growing-cache loop, logits within fp16 noise (the static cache sums
    over masked slots too), one forward's collectives per decode step, and every step after the first a replay."""
    import pipeline.runtime.generate as generate

    convert(tiny_checkpoint(model_type), 1, tmp_path / "engine")
    model = load_rank_model(tmp_path / "engine", ThreadGroup(1).comm(0), torch.float16, "cuda")
    ids = torch.randint(0, model.lm_head.shape[0], (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    eager = greedy(model, ids, 7, graphs=False)
    eager_counts = dict(model.comm.counts)
    model.comm.counts.clear()
    replays = []
    call = generate.DecodeGraph.__call__
    monkeypatch.setattr(generate.DecodeGraph, "__call__", lambda self, t: replays.append(1) or call(self, t))
    graphed = greedy(model, ids, 7)
    assert len(replays) == 7 - 2  # the first decode step runs eagerly (the capture's warm-up)
    assert torch.equal(graphed.tokens, eager.tokens)
    assert graphed.logits.shape == eager.logits.shape
    err = (graphed.logits.double() - eager.logits.double()).norm() / eager.logits.double().norm()
    assert err < 5e-3, err
    assert dict(model.comm.counts) == eager_counts
    assert graphed.step_seconds > 0 and eager.step_seconds > 0
    again = greedy(model, ids, 7)  # a second request in the same process (serving) captures its own graph
    assert torch.equal(again.tokens, eager.tokens) and torch.equal(again.logits, graphed.logits)
