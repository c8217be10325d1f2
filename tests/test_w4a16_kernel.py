"""W4A16 kernel and op tests.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on small shapes with few programs
and big blocks (the interpreter costs milliseconds per tile).  Every check draws fresh random
inputs, poisons the output with NaN first, and compares with an fp64 reference.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.gptq.int4 import pack_rows, unpack_rows
from plugins.layout import to_kernel_layout
from plugins.ops import w4a16_linear
from plugins.reference import random_layer, reference, relative_error

_SCHEDULE = None  # the kernel module, for test_schedule_arithmetic_does_not_overflow's probe
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _generator() -> tuple[torch.Generator, int]:
    seed = random.SystemRandom().randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.fixture(scope="module")
def kernel():
    """The Triton launcher; under the interpreter, works around its bf16 `tl.dot` (Triton 3.7).

    The interpreter keeps bf16 as raw uint16 and multiplies the raw integers in `tl.dot`; the
    shim upcasts both operands to fp32 (exact) first.  The kernel code itself is unchanged.
    """
    pytest.importorskip("triton")
    import triton.language as tl

    from plugins import w4a16

    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime import interpreter

        original = interpreter.InterpreterBuilder.create_dot

        def create_dot(self, a, b, d, *args):
            if a.dtype.scalar == tl.bfloat16:
                a, b = self.cast_impl(a, tl.float32), self.cast_impl(b, tl.float32)
            return original(self, a, b, d, *args)

        interpreter.InterpreterBuilder.create_dot = create_dot
        yield w4a16
        interpreter.InterpreterBuilder.create_dot = original
    else:
        yield w4a16


def _run_case(kernel, m, k, n, group_size, dtype, variant, config):
    """One kernel launch on fresh random data against the fp64 reference."""
    gen, seed = _generator()
    weights, g_idx = random_layer(k, n, group_size, generator=gen, act_order="gidx" in variant)
    x, perm = _input(m, k, dtype, variant, gen)
    ref = reference(x, weights, group_size, perm, g_idx)
    dev = {name: t.to(DEVICE) for name, t in weights.items()}
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    kernel.w4a16_matmul(
        x.to(DEVICE), dev, group_size, config,
        in_perm=None if perm is None else perm.to(DEVICE),
        g_idx=None if g_idx is None else g_idx.to(DEVICE),
        out=out,
    )
    err = relative_error(out.cpu(), ref)
    assert err < TOL[dtype], f"relative error {err:.3g} (seed {seed}, {config})"
    return out


def _input(m: int, k: int, dtype: torch.dtype, variant: str, gen: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """X and the input permutation of a variant: "perm" gathers a permutation of X's K columns; "narrow" gathers K
    columns, repeats included, from a narrower X, as a layer padded to whole groups does."""
    width = k * 3 // 4 if variant == "narrow" else k
    x = torch.randn(m, width, generator=gen).to(dtype)
    if variant == "narrow":
        return x, torch.randint(width, (k,), generator=gen)
    return x, torch.randperm(k, generator=gen) if "perm" in variant else None


def _config(kernel, path: str, split_k: int = 1, prefetch: bool = False):
    if path == "fma":  # CUDA cores, one row of X per program
        return kernel.Config(1, 64, 256, split_k, False, prefetch, 4, 3)
    return kernel.Config(16, 64, 128, split_k, True, prefetch, 4, 3)


@pytest.mark.parametrize("variant", ["contig", "perm", "narrow", "gidx"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["fma", "dot"])
def test_kernel_matches_fp64(kernel, path, dtype, group_size, variant):
    m = 1 if path == "fma" else 5
    _run_case(kernel, m, 512, 64, group_size, dtype, variant, _config(kernel, path))


@pytest.mark.parametrize("prep_x", [False, True])
@pytest.mark.parametrize("variant", ["contig", "perm", "gidx", "perm+gidx"])
def test_fma_small_m_reuses_nibbles_across_rows(kernel, variant, prep_x):
    """The FMA path with BLOCK_M = 4: M = 6 fills one M block and masks two rows of the next.

    With a permutation or `prep_x`, X is prepared (gathered, pre-scaled, zero-padded) by a kernel
    of its own; K = 960 is not a multiple of the K block, so the padding is read.
    """
    config = kernel.Config(4, 64, 256, 2, False, True, 4, 3, prep_x)
    _run_case(kernel, 6, 960, 64, 64, torch.float16, variant, config)


@pytest.mark.parametrize("k, group_size, block_k", [(960, 64, 64), (896, 128, 64), (480, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["contig", "perm"])
def test_dot_with_prepared_x(kernel, variant, dtype, k, group_size, block_k):
    """The dot path reads X prepared by its own kernel (gathered into the tile's K order, bf16 pre-scaled, row sums
    per K step, zero-padded) and loads scales, zeros and row sums a step ahead: M = 17 pads the second M block; the
    K step is one group or half of one (32 rows for group 32, the tuner's tile for it); 3 splits of 4-5 steps; the
    prep kernel's 1024-column programs cover K only partly."""
    config = kernel.Config(16, 64, block_k, 3, True, False, 4, 3)
    assert not config.dequantizes(group_size, False)
    _run_case(kernel, 17, k, 64, group_size, dtype, variant, config)


@pytest.mark.parametrize("path", ["fma", "dot"])
def test_split_k_prefetch_and_k_tail(kernel, path):
    """K = 960 is not a multiple of the K block, split over 3 programs, prefetching."""
    m = 1 if path == "fma" else 3
    _run_case(kernel, m, 960, 64, 64, torch.float16, "contig", _config(kernel, path, 3, True))


@pytest.mark.parametrize("programs", [5, 13])
@pytest.mark.parametrize("path", ["fma", "dot"])
def test_stream_k_ranges_cross_tiles(kernel, path, programs):
    """Stream-K: the programs share 4 output tiles' K steps evenly, so ranges start and end inside tiles (K = 960 also
    leaves a partial last step); 5 programs cover a tile in 2 parts, 13 in up to 5, and the last to arrive sums them."""
    if path == "fma":  # 4 N tiles x 4 K steps
        m, n, config = 3, 256, kernel.Config(4, 64, 256, 1, False, True, 4, 3, programs=programs)
    else:  # 2 M tiles x 2 N tiles x 15 K steps
        m, n, config = 17, 128, kernel.Config(16, 64, 64, 1, True, False, 4, 3, programs=programs)
    _run_case(kernel, m, 960, n, 64, torch.float16, "contig", config)
    _run_case(kernel, m, 960, n, 64, torch.bfloat16, "perm", config)


@pytest.mark.parametrize("config", [dict(split_k=4), dict(programs=13)])
def test_more_programs_than_k_steps_leave_no_counter_behind(kernel, config):
    """2 tiles x 2 K steps: 4 splits or 13 stream-K programs would give programs empty ranges of K steps, which the
    counting of a tile's parts does not expect; the launch uses at most one program per K step, every counter is
    back to zero afterwards, and the next shape (which reuses the counters) is right."""
    cfg = kernel.Config(16, 64, 128, config.get("split_k", 1), True, False, 4, 3, programs=config.get("programs", 0))
    _run_case(kernel, 3, 256, 128, 128, torch.float16, "contig", cfg)
    assert sum(int(locks.abs().sum()) for locks in kernel._LOCKS.values()) == 0
    _run_case(kernel, 3, 512, 128, 128, torch.float16, "contig", kernel.Config(16, 64, 128, 2, True, False, 4, 3))


def test_random_shapes_with_any_tuner_candidate(kernel):
    """Random shapes, each with a random config among those the tuner would time on a 2-SM device (so split-K and
    stream-K grids cut tiles anywhere, and can offer more programs than K steps): every output matches fp64 and every
    arrival counter is back to zero afterwards."""
    from plugins import tuning

    seed = random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    for _ in range(10):
        m, n, group_size = rng.choice([1, 3, 16, 17]), rng.choice([64, 136, 192]), rng.choice([64, 128])
        k = group_size * rng.randint(1, 6)
        config = rng.choice(tuning.candidates(m, n, k, num_sms=2))
        try:
            _run_case(kernel, m, k, n, group_size, torch.float16, rng.choice(["contig", "perm"]), config)
            assert sum(int(locks.abs().sum()) for locks in kernel._LOCKS.values()) == 0, "a counter was left behind"
        except AssertionError as e:
            raise AssertionError(f"{e} (m={m} n={n} k={k} g{group_size}, draw seed {seed}, {config})") from e


def test_schedule_arithmetic_does_not_overflow(kernel):
    """p T passes 2^31 where iterations x programs do (here 2 million iterations over 2100 programs; an lm_head of
    128k columns in 32-column tiles, 4 M tiles and 128 K steps, over 8 programs per SM gets there): the range start
    and owner are computed in 64 bits."""
    import triton
    import triton.language as tl

    global _SCHEDULE  # a Triton function resolves the names it calls among its module's globals
    _SCHEDULE = kernel

    @triton.jit
    def probe(out_ptr, p, programs, total, it):
        tl.store(out_ptr, _SCHEDULE._range_start(p, programs, total))
        tl.store(out_ptr + 1, _SCHEDULE._range_owner(it, programs, total))

    out = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    p, programs, total = 2000, 2100, 2_000_000  # p * total = 4e9 > 2^31, and (it + 1) * programs too
    probe[(1,)](out, p, programs, total, total - 1)
    assert out.tolist() == [p * total // programs, programs - 1]


def test_split_k_is_deterministic_and_resets_counters(kernel):
    config = _config(kernel, "dot", split_k=2)
    gen, _ = _generator()
    weights, _ = random_layer(512, 64, 128, generator=gen)
    weights = {name: t.to(DEVICE) for name, t in weights.items()}
    x = torch.randn(4, 512, generator=gen).to(torch.float16).to(DEVICE)
    first = kernel.w4a16_matmul(x, weights, 128, config)
    second = kernel.w4a16_matmul(x, weights, 128, config)
    assert torch.equal(first, second)
    assert int(kernel._LOCKS[x.device].abs().sum()) == 0


def test_masked_m_and_n_edges(kernel):
    """M = 17 spans two M blocks and N = 72 is not a multiple of the N block."""
    config = kernel.Config(16, 64, 128, 1, True, False, 4, 3)
    _run_case(kernel, 17, 256, 72, 128, torch.bfloat16, "contig", config)


@pytest.mark.parametrize("variant", ["contig", "perm"])
def test_dot_wide_tile_with_n_edge(kernel, variant):
    """BLOCK_N = 128: two 64-row wgmma tiles of W^T per program; N = 136 also masks a partial tile."""
    config = kernel.Config(16, 128, 128, 2, True, False, 4, 3)
    _run_case(kernel, 3, 512, 136, 128, torch.float16, variant, config)


def test_reference_check_catches_wrong_nibble_order(kernel):
    """Guard for the tests themselves: a layer read with reversed nibbles must fail the check."""
    gen, _ = _generator()
    weights, _ = random_layer(256, 64, 128, generator=gen)
    q = unpack_rows(weights["qweight"]).reshape(32, 8, 64).flip(1).reshape(256, 64)
    swapped = dict(weights, qweight=pack_rows(q))
    x = torch.randn(1, 256, generator=gen).to(torch.float16)
    out = kernel.w4a16_matmul(x.to(DEVICE), {k: t.to(DEVICE) for k, t in swapped.items()}, 128,
                              _config(kernel, "fma"))
    assert relative_error(out.cpu(), reference(x, weights, 128)) > 0.1


def test_tuning_candidates_and_cache_file(tmp_path, monkeypatch):
    """FMA tiles up to M = 4, with and without prepared X unless the layer is permuted; choices survive a save/load
    round trip next to other cards' entries, and entries written before `prep_x` existed load with it off."""
    pytest.importorskip("triton")
    from plugins import tuning, w4a16

    monkeypatch.setattr(tuning, "_CACHE", {})
    monkeypatch.setattr(tuning, "_LOADED", tuning._LOADED)  # `load` sets it: restored afterwards
    for m in (1, 3, 4):
        fma = [c for c in tuning.candidates(m, 4096, 4096, 132) if not c.use_dot]
        assert {c.block_m for c in fma} == {tuning.m_bucket(m)} and {c.prep_x for c in fma} == {False, True}
        assert not any(c.prep_x for c in tuning.candidates(m, 4096, 4096, 132, permuted=True))
    assert all(c.use_dot and not c.prep_x for c in tuning.candidates(8, 4096, 4096, 132))
    # group 32 (a layer padded to whole 32-row groups, or a g32 checkpoint) gets tensor-core tiles whose K step is one
    # group: otherwise the dot path would only take its dequantizing step, weight by weight
    assert any(c.use_dot and not c.dequantizes(32, False) for c in tuning.candidates(16, 4096, 4096, 132))
    stream_k = [c for c in tuning.candidates(16, 28672, 8192, 132) if c.programs]  # 224 tiles of 128 columns
    assert stream_k and all(c.use_dot and c.programs % 132 == 0 for c in stream_k)
    assert all(c.grid(16, 28672, 8192)[0] == c.programs > c.grid(16, 28672, 8192)[1] for c in stream_k)
    # 8 tiles of 128 columns x 64 K steps = 512 iterations: 4 programs per SM (528) would leave some without one
    assert {c.programs for c in tuning.candidates(16, 1024, 8192, 132)
            if c.block_n == c.block_k == 128 and c.programs} == {264, 396}
    key = tuning.cache_key("card A", "contig", torch.float16, 128, 3, 4096, 4096)
    tuning._CACHE[key] = w4a16.Config(4, 64, 128, 2, False, True, 4, 3, prep_x=True)
    other = {"card B|contig|float16|g128|m1|n8|k8": w4a16.Config(1, 64, 128, 1, False, False, 4, 3)}
    tuning.save(tmp_path / "c.json", other)
    saved = tuning._CACHE.copy()
    old_format = json.loads((tmp_path / "c.json").read_text())
    del old_format[next(iter(other))]["prep_x"]
    (tmp_path / "c.json").write_text(json.dumps(old_format))
    monkeypatch.setattr(tuning, "_CACHE", {})
    tuning.load(tmp_path / "c.json")
    assert tuning._CACHE == {**saved, **other}


def test_a_call_without_a_choice_of_its_own_takes_the_contiguous_layers_where_the_gemm_is_the_same(monkeypatch):
    """g_idx: always; a permuted input: only where the contiguous choice is a tensor-core tile (its X preparation does
    the gather either way); the FMA path's choice moves with the gather's extra launch, so there it is tuned anew."""
    pytest.importorskip("triton")
    from plugins import tuning, w4a16

    monkeypatch.setattr(tuning, "_CACHE", {})
    monkeypatch.setattr(tuning, "_LOADED", True)  # no shipped choices
    dot, fma = w4a16.Config(16, 128, 128, 2, True, False, 4, 4), w4a16.Config(1, 64, 128, 4, False, True, 4, 3)
    own = w4a16.Config(16, 64, 128, 1, True, False, 4, 3)
    for m, config in ((16, dot), (1, fma)):
        tuning._CACHE[tuning.cache_key("card", "contig", torch.float16, 128, m, 4096, 8192)] = config
    tuning._CACHE[tuning.cache_key("card", "perm", torch.float16, 128, 16, 2048, 8192)] = own
    tuning._CACHE[tuning.cache_key("card", "contig", torch.float16, 128, 16, 2048, 8192)] = dot

    def call(variant, m, n=4096):
        return tuning.lookup_call("card", variant, torch.float16, 128, m, n, 8192)

    assert call("gidx", 16) == dot and call("gidx", 1) == fma
    assert call("perm", 16) == dot and call("perm", 1) is None
    assert call("perm", 16, n=2048) == own  # a choice of its own comes first
    assert call("perm", 16, n=1024) is None and call("contig", 2) is None


def test_to_kernel_layout_validates():
    gen, _ = _generator()
    weights, _ = random_layer(256, 64, 64, generator=gen)
    args = (weights["qweight"], weights["qzeros"], weights["scales"])
    assert all(t.is_contiguous() for t in to_kernel_layout(*args, 64).values())
    with pytest.raises(TypeError):
        to_kernel_layout(args[0], args[1], args[2].float(), 64)
    with pytest.raises(ValueError):
        to_kernel_layout(*args, 48)
    with pytest.raises(ValueError):
        to_kernel_layout(args[0], args[1][:, :4], args[2], 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", ["contig", "perm", "narrow", "gidx"])
def test_op_cpu_is_the_reference(dtype, variant):
    gen, seed = _generator()
    weights, g_idx = random_layer(256, 48, 32, generator=gen, act_order=variant == "gidx")
    x, perm = _input(3, 256, dtype, variant, gen)
    out = torch.ops.tpaware.w4a16_gemm(
        x, weights["qweight"], weights["qzeros"], weights["scales"], 32, perm, g_idx
    )
    assert out.dtype == dtype and out.shape == (3, 48)
    assert relative_error(out, reference(x, weights, 32, perm, g_idx)) < TOL[dtype], seed


def test_op_refuses_an_input_that_does_not_fit_the_weight():
    """Without a gather X must have the weight's K columns; with one, the gather must give one column per weight row
    (X's own width is then free: `narrow`)."""
    gen, _ = _generator()
    weights, _ = random_layer(256, 48, 32, generator=gen)
    args = (weights["qweight"], weights["qzeros"], weights["scales"], 32)
    with pytest.raises(ValueError, match="x has K=200 but qweight holds K=256"):
        torch.ops.tpaware.w4a16_gemm(torch.randn(3, 200), *args)
    with pytest.raises(ValueError, match="in_perm has shape"):
        torch.ops.tpaware.w4a16_gemm(torch.randn(3, 256), *args, torch.arange(200))


def test_opcheck():
    gen, _ = _generator()
    weights, g_idx = random_layer(128, 32, 32, generator=gen, act_order=True)
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16)
    torch.library.opcheck(
        torch.ops.tpaware.w4a16_gemm.default,
        (x, weights["qweight"], weights["qzeros"], weights["scales"], 32, None, g_idx),
    )


def test_linear_batch_dims_bias_and_compile():
    gen, _ = _generator()
    weights, _ = random_layer(128, 32, 64, generator=gen)
    x = torch.randn(2, 3, 128, generator=gen).to(torch.float16)
    bias = torch.randn(32, generator=gen).to(torch.float16)
    perm = torch.randperm(128, generator=gen)
    eager = w4a16_linear(x, weights, 64, in_perm=perm, bias=bias)
    compiled = torch.compile(w4a16_linear, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, weights, 64, in_perm=perm, bias=bias), eager)
    ref = reference(x.reshape(6, 128), weights, 64, perm).reshape(2, 3, 32) + bias.double()
    assert eager.shape == (2, 3, 32)
    assert relative_error(eager, ref) < TOL[torch.float16]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("variant", ["perm", "narrow"])
@pytest.mark.parametrize("m", [1, 2, 16, 64, 65])
def test_cuda_op_matches_fp64(m, variant):
    """The op end to end on CUDA: tuned Triton kernel for M <= 64, dequantize + cuBLAS above."""
    gen, seed = _generator()
    weights, _ = random_layer(1024, 512, 128, generator=gen)
    x, perm = _input(m, 1024, torch.float16, variant, gen)
    out = w4a16_linear(x.cuda(), {k: t.cuda() for k, t in weights.items()}, 128, in_perm=perm.cuda())
    assert relative_error(out.cpu(), reference(x, weights, 128, perm)) < TOL[torch.float16], seed


@cuda
def test_tuner_weight_copies_stream_from_memory():
    """The tuner times candidates over copies of the layer that together exceed the L2 4x: clones in storage of
    their own (aliases would be timed from the L2), equal to the layer; a tiny layer gets the capped count."""
    from plugins import tuning

    gen, _ = _generator()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    tiny = {k: t.cuda() for k, t in random_layer(1024, 512, 128, generator=gen)[0].items()}
    assert len(tuning.weight_copies(tiny)) == tuning.MAX_TUNING_COPIES
    weights = {k: t.cuda() for k, t in random_layer(8192, 4096, 128, generator=gen)[0].items()}  # ~17 MB
    copies = tuning.weight_copies(weights)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    assert len(copies) == tuning.n_copies(nbytes, l2) and len(copies) * nbytes >= 4 * l2
    assert copies[0] is weights
    pointers = {copy["qweight"].data_ptr() for copy in copies}
    assert len(pointers) == len(copies)
    assert all(torch.equal(copy[k], weights[k]) for copy in copies for k in weights)


@cuda
def test_cuda_graph_capture():
    gen, _ = _generator()
    weights, _ = random_layer(1024, 512, 128, generator=gen)
    weights = {k: t.cuda() for k, t in weights.items()}
    x = torch.randn(4, 1024, generator=gen).to(torch.float16).cuda()
    eager = w4a16_linear(x, weights, 128)  # compiles and tunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4a16_linear(x, weights, 128)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_bench_gemm_without_a_gpu_says_so(tmp_path, capfd):
    result = CliRunner().invoke(app, ["bench", "gemm", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "no CUDA GPU here" in capfd.readouterr().err


def test_bench_gemm_redraws_the_committed_plot(tmp_path):
    """`--plot` turns a committed gemm.json (here the H100 table's) into gemm.png on any machine."""
    pytest.importorskip("matplotlib")
    saved = Path(__file__).resolve().parents[1] / "benchmarks" / "gemm_h100.json"
    result = CliRunner().invoke(app, ["bench", "gemm", "--out", str(tmp_path), "--plot", str(saved)])
    assert result.exit_code == 0
    assert (tmp_path / "gemm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ws_config(kernel, split: int, warpgroups: int = 1):
    return kernel.Config(16, 128, 128, split, True, False, 4, 4 * warpgroups, warp_specialized=True,
                         warpgroups=warpgroups)


@pytest.mark.parametrize("variant", ["contig", "gidx"])
def test_warp_specialized_config_runs_on_any_device(kernel, variant):
    """Where the Gluon kernel cannot run (no Hopper GPU, or a g_idx layer that reuses the contiguous layer's choice)
    a warp-specialized config runs its tile on the `tl` kernel."""
    if DEVICE == "cuda" and variant == "contig" and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("runs the Gluon kernel here (test_warp_specialized_kernel_matches_fp64)")
    _run_case(kernel, 5, 512, 256, 128, torch.float16, variant, _ws_config(kernel, 2))


def test_warp_specialized_config_without_gluon(kernel, monkeypatch):
    """With a Triton whose Gluon cannot be imported, a warp-specialized config (say from the shipped choices) still
    runs, on the `tl` kernel."""
    monkeypatch.setitem(sys.modules, "plugins.w4a16_ws", None)  # makes the import raise ImportError
    kernel.gluon_kernel.cache_clear()
    try:
        assert kernel.gluon_kernel() is None
        _run_case(kernel, 3, 512, 256, 128, torch.float16, "contig", _ws_config(kernel, 1))
    finally:
        kernel.gluon_kernel.cache_clear()


def test_tuner_tries_the_warp_specialized_kernel_only_where_it_runs():
    """Split-K grids of the Gluon kernel while every program stays resident (3 per SM), two consumer warpgroups per
    tile where the tiles fit one program per SM; none unless supported."""
    pytest.importorskip("triton")
    from plugins import tuning

    assert not any(c.warp_specialized for c in tuning.candidates(16, 14336, 8192, 132))
    ws = [c for c in tuning.candidates(16, 14336, 8192, 132, warp_specialized=True) if c.warp_specialized]
    assert {c.split_k for c in ws} == {1, 2, 3}  # 112 tiles: 4 per tile would need 448 > 396 resident programs
    assert all((c.block_m, c.block_n, c.block_k, c.use_dot) == (16, 128, 128, True) for c in ws)
    assert {c.split_k for c in tuning.candidates(1, 28672, 8192, 132, warp_specialized=True)
            if c.warp_specialized} == {1}  # 224 tiles
    assert {c.split_k for c in tuning.candidates(4, 8192, 14336, 132, warp_specialized=True)
            if c.warp_specialized} == {1, 2, 3, 4}  # 64 tiles
    shared = [(c.split_k, c.num_stages % 2) for c in ws if c.warpgroups == 2]
    assert shared == [(1, 0)]  # 112 tiles: one program per SM, an even ring
    for n in (28672, 8192):  # 224 tiles: a second round; 64: half the SMs idle
        assert not any(c.warpgroups == 2 for c in tuning.candidates(1, n, 8192, 132, warp_specialized=True))


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs a Hopper GPU (wgmma, TMA)")


@hopper
@pytest.mark.parametrize(("split", "warpgroups"), [(1, 1), (2, 1), (3, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("variant", ["contig", "perm", "narrow"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16, 20])
def test_warp_specialized_kernel_matches_fp64(kernel, m, dtype, variant, split, warpgroups):
    """The Gluon kernel: M past one 16-row tile (20), K ranges that split unevenly (3 into 16 steps), fused gather,
    one or two consumer warpgroups (split 3: ranges of 5 and 6 steps, taken 3 + 2 and 3 + 3); output NaN-poisoned
    first."""
    from plugins import w4a16_ws

    gen, _ = _generator()
    weights = {k: t.cuda() for k, t in random_layer(2048, 384, 128, generator=gen)[0].items()}
    assert w4a16_ws.supported(torch.empty(1, device="cuda"), weights, 128, False)
    _run_case(kernel, m, 2048, 384, 128, dtype, variant, _ws_config(kernel, split, warpgroups))


@hopper
def test_warp_specialized_split_k_is_deterministic_and_graph_capturable(kernel):
    gen, _ = _generator()
    weights = {k: t.cuda() for k, t in random_layer(4096, 512, 128, generator=gen)[0].items()}
    x = torch.randn(3, 4096, generator=gen).to(torch.float16).cuda()
    config = _ws_config(kernel, 4)
    first = kernel.w4a16_matmul(x, weights, 128, config)
    assert torch.equal(first, kernel.w4a16_matmul(x, weights, 128, config))
    assert int(kernel._LOCKS[x.device].abs().sum()) == 0
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.w4a16_matmul(x, weights, 128, config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, first)
