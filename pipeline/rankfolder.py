"""The per-rank folder, the one contract between the converter and everything downstream.

    <name>-tp<N>/
      manifest.json        schema, source fingerprint, architecture and config, tp, per-layer policy and why, sha256s
      rank<r>.safetensors  every tensor rank r needs
      tokenizer files      copied from the source, so nothing downstream reads the source checkpoint again

Per quantized layer `<L>` a rank file holds `<L>.qweight` int32 [K/8, N], `<L>.qzeros` int32 [G, N/8] (v2: stored zero
= z), `<L>.scales` [G, N], optional `<L>.bias`, `<L>.in_perm` int64 [K] when the layer gathers its input, and
`<L>.g_idx` int32 [K] only when its groups are not contiguous (the general path), and where the shard sits in the
original layer: `<L>.rows` int64 [K] (original input row of each stored row), `<L>.cols` int64 [N] (original output
column of each stored column) and `<L>.groups` int64 [G] (original group of each stored group).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.gptq.checkpoint import save_tensors, sha256_file

SCHEMA = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def rank_file(r: int) -> str:
    return f"rank{r}.safetensors"


def write_rank_folder(dest: Path, manifest: dict, ranks: Iterable[dict[str, torch.Tensor]],
                      copy_from: Path | None = None, track: Callable[[Iterable], Iterable] = iter) -> None:
    """Write rank files, tokenizer files and the manifest (with every file's sha256) atomically."""
    with atomic_directory(dest) as tmp:
        files = {}
        for r, tensors in enumerate(track(ranks)):
            save_tensors(tensors, tmp / rank_file(r))
            files[rank_file(r)] = sha256_file(tmp / rank_file(r))
        for name in TOKENIZER_FILES if copy_from else ():
            if (copy_from / name).is_file():
                shutil.copy2(copy_from / name, tmp / name)
                files[name] = sha256_file(tmp / name)
        (tmp / "manifest.json").write_text(json.dumps(dict(manifest, schema=SCHEMA, files=files), indent=2))


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise InputError("manifest.json not found: not a tpaware per-rank folder (run `tpaware convert`)", file=folder)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e})", file=path) from None
    if manifest.get("schema") != SCHEMA:
        raise InputError(f"schema {manifest.get('schema')!r} is not one this tpaware reads ({SCHEMA}); re-convert",
                         file=path)
    return manifest


def read_rank(folder: Path, r: int, verify: bool = False,
              wanted: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of rank r (only those `wanted` says, when given); `verify` checks the sha256 against the manifest."""
    path = Path(folder) / rank_file(r)
    if verify:
        expected = read_manifest(folder)["files"].get(rank_file(r))
        if expected != sha256_file(path):
            raise InputError("sha256 does not match manifest.json: the file changed after conversion", file=path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys() if wanted is None or wanted(name)}
    except FileNotFoundError:
        raise InputError("missing", file=path) from None
    except Exception as e:
        raise InputError(f"unreadable safetensors file ({type(e).__name__}: {e})", file=path) from None
