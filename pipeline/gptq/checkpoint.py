"""Read and write Hugging Face GPTQ checkpoints (config + single or sharded safetensors).

I/O only: tensors are validated and unpacked here, then handed to the pure transforms as `QuantLinear`s. Every
problem becomes one `InputError` naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import atomic_directory
from pipeline.errors import InputError
from pipeline.gptq.int4 import pack_cols, pack_rows, unpack_cols, unpack_rows, v1_to_v2_zeros, v2_to_v1_zeros
from pipeline.gptq.layer import QuantLinear

GROUP_SIZES = (32, 64, 128, -1)
FORMATS = ("gptq", "gptq_v2")
_QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass(frozen=True)
class QuantConfig:
    """The GPTQ settings that change how tensors are read."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = True
    checkpoint_format: str = "gptq"  # gptq (v1): stored zero = z - 1; gptq_v2: stored zero = z

    def to_json(self) -> dict:
        return {
            "quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
            "desc_act": self.desc_act, "checkpoint_format": self.checkpoint_format,
        }


@dataclass
class Checkpoint:
    """A GPTQ model in memory: its HF config, quantized layers by module name, and every other tensor."""

    config: dict
    quant: QuantConfig
    layers: dict[str, QuantLinear]
    dense: dict[str, torch.Tensor]
    path: Path | None = None
    fingerprint: str = ""
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> file it came from (for error messages)


def read_quant_config(folder: Path) -> QuantConfig:
    """Find `quantization_config` in config.json, or quantize_config.json, and check we support it."""
    config_file = folder / "config.json"
    raw = _load_json(config_file).get("quantization_config")
    if raw is None:
        config_file = folder / "quantize_config.json"
        if not config_file.exists():
            raise InputError("no quantization_config and no quantize_config.json: not a GPTQ checkpoint",
                             file=folder / "config.json")
        raw = _load_json(config_file)
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise InputError(f"quant_method={method!r}; tpaware reads GPTQ checkpoints only", file=config_file)
    bits = int(raw.get("bits", 4))
    if bits != 4:
        raise InputError(f"bits={bits} is not supported: tpaware handles 4-bit GPTQ only", file=config_file)
    group_size = int(raw.get("group_size", 128))
    if group_size not in GROUP_SIZES:
        raise InputError(f"group_size={group_size} is not supported (use one of {GROUP_SIZES})", file=config_file)
    fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
    if fmt not in FORMATS:
        raise InputError(f"checkpoint_format={fmt!r} is not supported (use one of {FORMATS})", file=config_file)
    return QuantConfig(bits=bits, group_size=group_size, sym=bool(raw.get("sym", True)),
                       desc_act=bool(raw.get("desc_act", False)), checkpoint_format=fmt)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Load and validate every tensor of a GPTQ checkpoint folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError("config.json not found: expected a Hugging Face model folder", file=folder)
    config = _load_json(folder / "config.json")
    quant = read_quant_config(folder)
    tensors, files = _read_tensors(folder)
    prefixes = sorted(name[: -len(".qweight")] for name in tensors if name.endswith(".qweight"))
    if not prefixes:
        raise InputError("no '*.qweight' tensors found: not a GPTQ checkpoint", file=folder)
    layers = {prefix: _unpack_layer(prefix, tensors, files, quant) for prefix in prefixes}
    quant_names = {f"{prefix}.{part}" for prefix in prefixes for part in _QUANT_PARTS}
    dense = {name: t for name, t in tensors.items() if name not in quant_names}
    return Checkpoint(config=config, quant=quant, layers=layers, dense=dense, path=folder,
                      fingerprint=fingerprint(folder), files=files)


def write_checkpoint(folder: Path, ckpt: Checkpoint, max_shard_bytes: int | None = None) -> None:
    """Write `ckpt` as a HF GPTQ folder in its `checkpoint_format`, atomically; shard files above `max_shard_bytes`."""
    tensors: dict[str, torch.Tensor] = dict(ckpt.dense)
    for prefix, layer in ckpt.layers.items():
        tensors.update({f"{prefix}.{k}": v for k, v in pack_layer(layer, ckpt.quant.checkpoint_format).items()})
    config = dict(ckpt.config, quantization_config=ckpt.quant.to_json())
    with atomic_directory(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shards = _split(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_tensors(shards[0], tmp / "model.safetensors")
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, tmp / name)
            weight_map.update(dict.fromkeys(shard, name))
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def pack_layer(layer: QuantLinear, checkpoint_format: str = "gptq_v2") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one layer: qweight, qzeros (v1 stores z - 1), scales, g_idx and bias if any."""
    qzeros = pack_cols(layer.zeros)
    out = {
        "qweight": pack_rows(layer.q),
        "qzeros": v2_to_v1_zeros(qzeros) if checkpoint_format == "gptq" else qzeros,
        "scales": layer.scales,
        "g_idx": layer.g_idx.to(torch.int32),
    }
    if layer.bias is not None:
        out["bias"] = layer.bias
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, after giving every tensor its own contiguous storage (it refuses shared memory, and
    layers that share an act order share their g_idx tensor)."""
    seen: set[int] = set()
    owned = {}
    for name, t in tensors.items():
        t = t.contiguous()
        key = t.untyped_storage().data_ptr()
        owned[name] = t.clone() if key in seen else t
        seen.add(key)
    save_file(owned, str(path), metadata={"format": "pt"})


def fingerprint(folder: Path) -> str:
    """sha256 over the config and tensor files, so a per-rank folder names exactly what it was made from."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            digest.update(path.name.encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError("file not found", file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", file=path) from None


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError("no 'weight_map' in the index", file=index)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.exists():
                raise InputError("listed in model.safetensors.index.json but missing", file=path)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError("no *.safetensors files", file=folder)
    return files


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, str] = {}
    for path in _tensor_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
                    files[name] = path.name
        except Exception as e:  # safetensors raises several types for truncated or corrupt files
            raise InputError(f"unreadable safetensors file, truncated or corrupt ({type(e).__name__}: {e})",
                             file=path) from None
    return tensors, files


def _unpack_layer(prefix: str, tensors: dict, files: dict, quant: QuantConfig) -> QuantLinear:
    def fail(part: str, message: str) -> InputError:
        return InputError(message, file=files.get(f"{prefix}.qweight"), tensor=f"{prefix}.{part}")

    def need(part: str) -> torch.Tensor:
        if f"{prefix}.{part}" not in tensors:
            raise fail(part, "missing")
        return tensors[f"{prefix}.{part}"]

    qweight, qzeros, scales = need("qweight"), need("qzeros"), need("scales")
    for part, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise fail(part, f"expected a 2-D int32 tensor, got {t.dtype} {list(t.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    group_size = k if quant.group_size == -1 else quant.group_size
    groups = -(-k // group_size)
    if list(qzeros.shape) != [groups, n // 8] or n % 8:
        raise fail("qzeros", f"shape {list(qzeros.shape)} does not match qweight {list(qweight.shape)} "
                             f"with group_size {quant.group_size} (expected {[groups, n // 8]})")
    if list(scales.shape) != [groups, n] or not scales.is_floating_point():
        raise fail("scales", f"expected float [{groups}, {n}], got {scales.dtype} {list(scales.shape)}")
    g_idx = tensors.get(f"{prefix}.g_idx")
    if g_idx is None:
        if quant.desc_act:
            raise fail("g_idx", "missing, but desc_act=true needs the group of every input row")
        g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if list(g_idx.shape) != [k]:
        raise fail("g_idx", f"shape {list(g_idx.shape)} does not match K={k} from qweight {list(qweight.shape)}")
    if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise fail("g_idx", f"group ids must lie in 0..{groups - 1}")
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None and list(bias.shape) != [n]:
        raise fail("bias", f"shape {list(bias.shape)} does not match N={n}")
    zeros = unpack_cols(v1_to_v2_zeros(qzeros) if quant.checkpoint_format == "gptq" else qzeros)
    return QuantLinear(q=unpack_rows(qweight), zeros=zeros, scales=scales, g_idx=g_idx.to(torch.int32),
                       group_size=group_size, bias=bias)


def _split(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [tensors]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    return shards
