"""tritonclient calls to the generate model, over HTTP or gRPC, and a bounded load generator.

Runs where tritonclient is installed (the serving venv), e.g.

    .venv-serve/bin/python -m pipeline.serve.client --url 127.0.0.1:8001 --protocol grpc --ids 1,2,3 --max-tokens 8

`--json FILE` takes a list of requests ({"ids": [...] or "text": "...", "max_tokens": n, "temperature": t,
"seed": s}) and prints one JSON answer per request; with `--repeat N --concurrency C` it sends them round-robin N
times in all from C threads and adds the latency percentiles. Every answer is {"ids", "text"} or {"error"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.serve.protocol import INPUTS, MODEL


def infer(client, protocol: str, request: dict, timeout: float = 120.0) -> dict:
    """One request; `client` is a tritonclient.http or .grpc InferenceServerClient."""
    module = _module(protocol)
    arrays = {"max_tokens": np.array([request["max_tokens"]], dtype=np.int32)}
    if "text" in request:
        arrays["text_input"] = np.array([request["text"].encode("utf-8")], dtype=np.object_)
    if "ids" in request:
        arrays["input_ids"] = np.array(request["ids"], dtype=np.int64)
    if "temperature" in request:
        arrays["temperature"] = np.array([request["temperature"]], dtype=np.float32)
    if "seed" in request:
        arrays["seed"] = np.array([request["seed"]], dtype=np.int64)
    datatypes = {spec.name: spec.datatype for spec in INPUTS}
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    timeout_arg = {"client_timeout": timeout} if protocol == "grpc" else {}
    try:
        result = client.infer(MODEL, inputs, **timeout_arg)
    except Exception as e:  # noqa: BLE001 - InferenceServerException: the server's message is the answer
        return {"error": str(e)}
    return {"ids": result.as_numpy("output_ids").tolist(), "text": result.as_numpy("text_output")[0].decode("utf-8")}


def connect(url: str, protocol: str, concurrency: int = 1, timeout: float = 120.0):
    module = _module(protocol)
    if protocol == "http":
        return module.InferenceServerClient(url, concurrency=concurrency, connection_timeout=timeout,
                                            network_timeout=timeout)
    return module.InferenceServerClient(url)


def load(url: str, protocol: str, requests: list[dict], repeat: int, concurrency: int, timeout: float) -> dict:
    """`repeat` requests in all, round-robin over `requests`, from `concurrency` threads with one client each."""
    local = threading.local()
    clients = []

    def one(i: int) -> tuple[int, dict, float]:
        if not hasattr(local, "client"):
            local.client = connect(url, protocol, timeout=timeout)
            clients.append(local.client)
        start = time.perf_counter()
        answer = infer(local.client, protocol, requests[i % len(requests)], timeout)
        return i % len(requests), answer, time.perf_counter() - start

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(repeat), timeout=timeout * repeat))
    finally:
        for client in clients:
            client.close()
    latencies = sorted(seconds for _, _, seconds in results)
    return {"answers": [{"request": i, **answer} for i, answer, _ in results],
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol {protocol!r} must be http or grpc")
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="host:port (HTTP 8000 or gRPC 8001 by default)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--ids", help="prompt token ids, comma-separated")
    parser.add_argument("--text", help="prompt text (the model needs a tokenizer)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", help="file with a JSON list of requests instead of --ids/--text")
    parser.add_argument("--repeat", type=int, help="send this many requests in all, round-robin (load mode)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    args = parser.parse_args(argv)
    if args.json:
        with open(args.json) as f:
            requests = json.load(f)
    else:
        request = {"max_tokens": args.max_tokens}
        request.update({"ids": [int(v) for v in args.ids.split(",")]} if args.ids else {"text": args.text or ""})
        request.update({k: v for k, v in (("temperature", args.temperature), ("seed", args.seed)) if v is not None})
        requests = [request]
    if args.repeat:
        json.dump(load(args.url, args.protocol, requests, args.repeat, args.concurrency, args.timeout), sys.stdout)
    else:
        client = connect(args.url, args.protocol, timeout=args.timeout)
        try:
            json.dump([infer(client, args.protocol, r, args.timeout) for r in requests], sys.stdout)
        finally:
            client.close()
    print()


if __name__ == "__main__":
    main()
