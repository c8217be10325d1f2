"""`tpaware serve` and `tpaware triton-repo` on a real Triton Inference Server (the one bundled in nvidia-pytriton).

Servers listen on 127.0.0.1 at free ports only. tritonclient lives in the serving venv (.venv-serve), so the HTTP and
gRPC clients run there (`python -m pipeline.serve.client`); KServe v2 JSON goes over urllib from here. Every wait is
bounded, and after each server stops no process of it may remain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import InputError
from pipeline.runtime.comm import Comm
from pipeline.runtime.generate import greedy
from pipeline.runtime.launch import RankSetup, run_ranks
from pipeline.serve.group import GumbelSampler, decode
from pipeline.serve.protocol import MODEL, Request
from pipeline.serve.server import BundledTriton, Ports, wait_ready
from pipeline.shard import convert

ROOT = Path(__file__).resolve().parents[1]
START_S, STOP_S, CLIENT_S = 180, 120, 240

try:
    TRITON, MISSING = BundledTriton.find(), ""
except InputError as e:
    TRITON, MISSING = None, str(e)
needs_server = pytest.mark.skipif(TRITON is None, reason=f"no serving venv: {MISSING}")

MAX_TOKENS = 6
GREEDY = [Request(tuple(torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(n)).tolist()), MAX_TOKENS)
          for n in (3, 5, 8, 13)]
SAMPLED = [Request(GREEDY[1].ids, MAX_TOKENS, 0.75, 7), Request(GREEDY[1].ids, MAX_TOKENS, 0.75, 7),  # fp32-exact t
           Request(GREEDY[2].ids, MAX_TOKENS, 1.5, 123)]
REQUESTS = GREEDY + SAMPLED


def as_json(request: Request) -> dict:
    return {"ids": list(request.ids), "max_tokens": request.max_tokens,
            **({"temperature": request.temperature, "seed": request.seed} if request.temperature else {})}


def direct_task(setup: RankSetup, requests: list[Request], comm: Comm, device: torch.device) -> dict:
    """The runtime itself, no server: greedy through `greedy`, sampled through the same seeded sampler."""
    model = setup.load(comm, device)
    return {str(i): greedy(model, torch.tensor([r.ids]), r.max_tokens).tokens[0] if not r.temperature
            else decode(model, r, device) for i, r in enumerate(requests)}


def test_sampling_draws_from_softmax_at_the_temperature():
    """Greedy over Gumbel-perturbed logits samples softmax(logits / t); a seed fixes the draw."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])

    def model(ids, cache):
        return logits.expand(ids.shape[0], ids.shape[1], 4).clone()

    for temperature in (0.5, 2.0):
        draws = torch.tensor([greedy(GumbelSampler(model, temperature, seed, torch.device("cpu")),
                                     torch.zeros(1, 1, dtype=torch.long), 1).tokens.item() for seed in range(4000)])
        frequencies = torch.bincount(draws, minlength=4) / len(draws)
        assert torch.allclose(frequencies, torch.softmax(logits / temperature, 0), atol=0.03), frequencies
    once, again = (greedy(GumbelSampler(model, 1.0, 11, torch.device("cpu")), torch.zeros(1, 1, dtype=torch.long), 8)
                   .tokens for _ in range(2))
    assert torch.equal(once, again)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint, tmp_path_factory):
    folders = {}
    for tp in (1, 2):
        folders[tp] = tmp_path_factory.mktemp(f"serve-tp{tp}") / "engine"
        convert(tiny_checkpoint("llama", group_size=32), tp, folders[tp])
    return folders


@pytest.fixture(scope="module")
def expected(engines) -> dict[int, list[list[int]]]:
    """The runtime's direct tokens for every request in REQUESTS, per tp."""
    out = {}
    for tp, folder in engines.items():
        values = run_ranks(tp, partial(direct_task, RankSetup(str(folder)), REQUESTS), timeout=300)[0].values
        out[tp] = [values[str(i)].tolist() for i in range(len(REQUESTS))]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def running(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"}


def tree(root: int) -> set[int]:
    """`root` and every process below it, and every process in the sessions they lead (the server's own)."""
    stats = {int(p): f for p in os.listdir("/proc") if p.isdigit() and (f := _stat(int(p)))}
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, f in stats.items():
            if int(f[1]) == pid and child not in found:
                found.add(child)
                frontier.append(child)
    sessions = {pid for pid in found if pid in stats and int(stats[pid][3]) == pid}
    return found | {pid for pid, f in stats.items() if int(f[3]) in sessions}


class Server:
    """A server process started here: readiness, its process tree, and an orderly stop that must leave nothing."""

    def __init__(self, command: Callable[[Ports], list[str]], env: dict[str, str], log: Path):
        self.ports = Ports("127.0.0.1", free_port(), free_port())
        self.url, self.log, self.processes = self.ports.local_url, log, set()
        with open(log, "wb") as f:
            self.process = subprocess.Popen(command(self.ports), env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            wait_ready(self.url, START_S, alive=lambda: self.process.poll() is None)
        except BaseException:
            self.processes = tree(self.process.pid)
            self.stop()
            raise AssertionError(f"server not ready; log:\n{self.log_tail()}") from None
        self.processes = tree(self.process.pid)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, set[int]]:
        """Signal the server, wait for it; returns its exit code and whatever of its processes still runs."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        left = set()
        for _ in range(50):  # a moment for reparented processes to be reaped
            left = running(self.processes)
            if not left:
                break
            time.sleep(0.1)
        for pid in left:  # never leak into the next test, but fail this one
            os.kill(pid, signal.SIGKILL)
        return self.process.returncode, left


def http(url: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a KServe v2 call."""
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def infer_body(ids=None, max_tokens=MAX_TOKENS, ids_type="INT64", tokens_type="INT32", text=None) -> dict:
    inputs = [{"name": "max_tokens", "datatype": tokens_type, "shape": [1], "data": [max_tokens]}]
    if ids is not None:
        inputs.append({"name": "input_ids", "datatype": ids_type, "shape": [len(ids)], "data": list(ids)})
    if text is not None:
        inputs.append({"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [text]})
    return {"inputs": inputs}


def output_ids(body: dict) -> list[int]:
    return next(o["data"] for o in body["outputs"] if o["name"] == "output_ids")


def client(url: str, protocol: str, requests: list[dict], tmp_path: Path, *args: str):
    """Run pipeline.serve.client in the serving venv; its JSON answer."""
    path = tmp_path / f"requests-{protocol}.json"
    path.write_text(json.dumps(requests))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([str(TRITON.venv / "bin" / "python"), "-m", "pipeline.serve.client", "--url", url,
                           "--protocol", protocol, "--json", str(path), *args],
                          env=env, capture_output=True, text=True, timeout=CLIENT_S)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def tpaware_serve(engine: Path, ports: Ports) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "serve", str(engine), "--http-port", str(ports.http),
            "--grpc-port", str(ports.grpc), "--exit-timeout", "10"]


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request, engines, tmp_path_factory):
    """`tpaware serve` on the tp=1 or tp=2 engine; test_shutdown (last) stops it, this stops it in any case."""
    tp = request.param
    server = Server(partial(tpaware_serve, engines[tp]), dict(os.environ),
                    tmp_path_factory.mktemp(f"served-tp{tp}") / "server.log")
    server.tp = tp
    yield server
    server.stop()


@needs_server
@pytest.mark.slow
def test_health_and_metadata(served):
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert http(served.url, path)[0] == 200, path
    status, meta = http(served.url, f"/v2/models/{MODEL}")
    assert status == 200
    assert {t["name"] for t in meta["inputs"]} == {"text_input", "input_ids", "max_tokens", "temperature", "seed"}
    assert {t["name"] for t in meta["outputs"]} == {"text_output", "output_ids"}
    # every rank is a live process of the server
    assert len(served.processes) >= 3 + served.tp, served.processes  # serve, tritonserver, stub, the ranks


@needs_server
@pytest.mark.slow
def test_tritonclient_http_and_grpc_match_the_runtime(served, expected, tmp_path):
    want = expected[served.tp]
    assert want[len(GREEDY)] == want[len(GREEDY) + 1]  # same seed, same tokens
    bad = {"ids": [1, 2], "max_tokens": 0}
    for protocol, port in (("http", served.ports.http), ("grpc", served.ports.grpc)):
        answers = client(f"127.0.0.1:{port}", protocol, [as_json(r) for r in REQUESTS] + [bad], tmp_path)
        assert [a.get("ids", a.get("error")) for a in answers[:-1]] == want, protocol
        assert all(a["text"] == "" for a in answers[:-1])  # no tokenizer in a synthetic model
        assert "max_tokens must be at least 1" in answers[-1]["error"], answers[-1]
    grpc_error = answers[-1]["error"]
    assert "INVALID_ARGUMENT" in grpc_error, grpc_error  # gRPC's 4xx


@needs_server
@pytest.mark.slow
def test_kserve_json_and_generate_endpoint(served, expected):
    status, body = http(served.url, f"/v2/models/{MODEL}/infer", infer_body(GREEDY[0].ids))
    assert status == 200 and output_ids(body) == expected[served.tp][0]
    status, body = http(served.url, f"/v2/models/{MODEL}/generate",
                        {"input_ids": list(GREEDY[3].ids), "max_tokens": MAX_TOKENS})
    assert status == 200 and body["output_ids"] == expected[served.tp][3]


@needs_server
@pytest.mark.slow
def test_16_concurrent_clients_200_requests(served, expected, tmp_path, capsys):
    protocol = "http" if served.tp == 1 else "grpc"  # both protocols under load across the two servers
    port = served.ports.http if protocol == "http" else served.ports.grpc
    report = client(f"127.0.0.1:{port}", protocol, [as_json(r) for r in REQUESTS], tmp_path,
                    "--repeat", "200", "--concurrency", "16", "--timeout", "120")
    answers = report["answers"]
    assert len(answers) == 200
    failures = [a for a in answers if a.get("ids") != expected[served.tp][a["request"]]]
    assert not failures, failures[:3]
    with capsys.disabled():
        print(f"\n[serve tp={served.tp} {protocol}] 200 requests from 16 clients, {MAX_TOKENS} new tokens each: "
              f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms")


@needs_server
@pytest.mark.slow
@pytest.mark.parametrize("body, status, message", [
    (infer_body(ids=[]), 400, "empty prompt"),
    (infer_body(ids=[1] * 2049, max_tokens=1), 400, "exceeds the context length 2048"),
    (infer_body(ids=[1] * 2040, max_tokens=9), 400, "exceeds the context length 2048"),
    (infer_body(ids=[1, 2, 3], ids_type="FP32"), 400, "expects 'INT64'"),
    (infer_body(ids=[1, 2, 3], tokens_type="INT64"), 400, "expects 'INT32'"),
    (infer_body(ids=[1, 2, 3], max_tokens=0), 400, "max_tokens must be at least 1, got 0"),
    (infer_body(ids=[1, 2, 3], max_tokens=-5), 400, "max_tokens must be at least 1, got -5"),
    (infer_body(ids=[1, 2, 96]), 400, "input_ids must lie in 0..95"),
    (infer_body(text="hello"), 400, "no tokenizer files"),
    (infer_body(ids=[1], text="hello"), 400, "exactly one of text_input"),
    (infer_body(), 400, "exactly one of text_input"),
], ids=["empty", "over-context", "over-context-with-new-tokens", "ids-fp32", "max-tokens-int64", "max-tokens-0",
        "max-tokens-negative", "id-out-of-vocab", "text-without-tokenizer", "text-and-ids", "no-prompt"])
def test_bad_request_is_a_400_and_the_server_keeps_serving(served, expected, body, status, message):
    got, answer = http(served.url, f"/v2/models/{MODEL}/infer", body)
    assert (got, message in answer.get("error", "")) == (status, True), answer
    got, answer = http(served.url, f"/v2/models/{MODEL}/infer", infer_body(GREEDY[0].ids))
    assert got == 200 and output_ids(answer) == expected[served.tp][0]


@needs_server
@pytest.mark.slow
def test_shutdown_leaves_no_process(served):
    code, left = served.stop(signal.SIGTERM)
    assert code == 0, served.log_tail()
    assert not left, f"still running after shutdown: {left}"
    for port in (served.ports.http, served.ports.grpc):  # nothing listens any more
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))


def word_tokenizer(folder: Path, vocab: int) -> None:
    """Tokenizer files for the synthetic vocabulary: word "w<i>" is token i."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


@needs_server
@pytest.mark.slow
def test_standalone_repository_on_the_bundled_tritonserver(tiny_checkpoint, expected, tmp_path):
    """`tpaware triton-repo` output, served by the stock binary with plain flags, answers ids and text correctly."""
    pytest.importorskip("tokenizers")
    if not list(TRITON.venv.glob("lib/python3*/site-packages/transformers")):
        pytest.skip(f"{TRITON.venv} has no transformers, which text prompts need")
    source = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("llama", group_size=32), source)
    word_tokenizer(source, 96)
    convert(source, 2, tmp_path / "engine")  # convert copies the tokenizer files into the folder
    repo = tmp_path / "repo"
    result = CliRunner().invoke(app, ["triton-repo", str(tmp_path / "engine"), "--out", str(repo)])
    assert result.exit_code == 0, result.output
    config = (repo / MODEL / "config.pbtxt").read_text()
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in config and 'backend: "python"' in config
    assert (repo / MODEL / "1" / "engine" / "manifest.json").is_file()
    assert (repo / MODEL / "1" / "tpaware_src" / "pipeline" / "serve" / "group.py").is_file()

    backends = TRITON.backends(tmp_path / "backends")
    server = Server(lambda ports: TRITON.command(repo, backends, ports, exit_timeout=10), TRITON.env(),
                    tmp_path / "tritonserver.log")
    try:
        status, body = http(server.url, f"/v2/models/{MODEL}/infer", infer_body(GREEDY[2].ids))
        assert status == 200 and output_ids(body) == expected[2][2], body
        words = " ".join(f"w{i}" for i in GREEDY[3].ids)
        status, body = http(server.url, f"/v2/models/{MODEL}/generate", {"text_input": words, "max_tokens": MAX_TOKENS})
        assert status == 200, body
        assert body["output_ids"] == expected[2][3]
        assert body["text_output"] == " ".join(f"w{i}" for i in expected[2][3])
    finally:
        code, left = server.stop(signal.SIGINT)
    assert code == 0, server.log_tail()
    assert not left, f"still running after shutdown: {left}"
