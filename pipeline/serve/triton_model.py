"""Triton Python-backend model (copied into a repository as `<model>/1/model.py`): glue between Triton and `Frontend`.

It runs inside Triton's backend stub, whose Python must import torch, numpy and safetensors. The tpaware code comes
with the repository (`1/tpaware_src`), so the server needs no tpaware install. The stub process is where the TP group's
launcher runs; the rank processes it spawns use the stub's `sys.executable`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if (_HERE / "tpaware_src").is_dir():  # the repository's own copy wins over any installed tpaware
    sys.path.insert(0, str(_HERE / "tpaware_src"))

import triton_python_backend_utils as pb_utils  # noqa: E402  (exists only inside Triton's Python backend)

from pipeline.errors import InputError  # noqa: E402
from pipeline.serve.frontend import Frontend, Settings  # noqa: E402
from pipeline.serve.group import GroupDown  # noqa: E402
from pipeline.serve.protocol import INPUTS, OUTPUTS  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]).resolve() / args["model_version"]
        self.frontend = Frontend(Settings.from_parameters(parameters), version_dir)

    def execute(self, requests: list) -> list:
        """Triton hands over the queued requests; each gets its answer or its own error, in order."""
        return [self._answer(request) for request in requests]

    def finalize(self) -> None:
        self.frontend.close()

    def _answer(self, request):
        inputs = {}
        for spec in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                inputs[spec.name] = tensor.as_numpy()
        try:
            outputs = self.frontend.answer(inputs)
        except InputError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        except GroupDown as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.UNAVAILABLE))
        return pb_utils.InferenceResponse([pb_utils.Tensor(spec.name, outputs[spec.name]) for spec in OUTPUTS])
