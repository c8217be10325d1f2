"""Serve a per-rank folder with a real Triton Inference Server (Python backend), every TP rank included.

    protocol.py      the generate model's inputs and outputs, and the checks a request must pass (no Triton imports)
    group.py         the TP group behind the model: rank 0 takes requests and broadcasts them, the others follow
    frontend.py      numpy in, numpy out: tokenizer, checks, one request at a time through the group
    triton_model.py  the Python-backend `model.py` (thin glue between Triton's tensors and the frontend)
    repository.py    writes a model repository (config.pbtxt, model.py, the tpaware code, the engine)
    server.py        finds the tritonserver bundled in nvidia-pytriton and runs it on a repository (`tpaware serve`)
    client.py        tritonclient (HTTP or gRPC) calls and a bounded load generator, run in the serving venv

The server's Python is a venv made from Debian's /usr/bin/python3.11 (`.venv-serve`): the backend stub shipped in the
wheel embeds Debian's libpython3.11, and in a pyenv venv it would run pyenv's standard library against it.
"""
