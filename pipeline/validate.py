"""`tpaware validate`: a converted model, run at its tp, against Hugging Face transformers' own model class.

The reference is someone else's forward code on the *unpermuted* model: `transformers.AutoModelForCausalLM` built from
the manifest's HF config, loaded with the dequantized original weights. Those are rebuilt bit-exactly from the rank
files alone (`pipeline.runtime.reshard.original_layers`), so validation needs nothing but the per-rank folder.

The runtime greedily generates from a prompt (prefill, then one token at a time through the KV cache); the reference
generates greedily with `generate()` and also scores prompt + our tokens in one teacher-forced forward, so every logit
we produced, decode steps included, is compared position by position: max abs error, the smallest cosine similarity
of a position's logits, top-1 agreement, and the greedy tokens. Tokens must be identical, except that a row may part
from the reference where the reference's own top two logits are within the tie margin: in fp16 a random model has
near-ties that rounding legitimately resolves either way, and after one the sequences are no longer comparable.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.arch import ARCHES
from pipeline.gptq.layer import dequantize
from pipeline.rankfolder import read_manifest, read_rank
from pipeline.runtime.generate import Generation
from pipeline.runtime.launch import RankSetup, generate
from pipeline.runtime.linear import kernel_op
from pipeline.runtime.loader import quant_tensor_names
from pipeline.runtime.reshard import original_layers


@dataclass(frozen=True)
class Thresholds:
    """Pass bounds; `thresholds_for` gives the defaults of a runtime dtype."""

    max_abs_err: float
    min_cosine: float
    min_top1: float
    max_tie_margin: float  # greedy tokens may part only where the reference's top two are this close


# (max_abs_err, min_cosine, min_top1) by runtime dtype. fp32/fp64: the weights are exact in fp32 and the reference's own
# norms and RoPE run in fp32, so errors are ~1e-6 of logits of order 1-10; 1e-3 flags any real bug (a misplaced row,
# column or group moves logits by a sizeable fraction of their scale). fp16/bf16: every op rounds at 2^-11 / 2^-8
# relative, compounded over the layers, and random synthetic models have many near-tied logits whose top-1 may swap.
DEFAULTS = {
    torch.float64: (1e-3, 1 - 1e-6, 0.99),
    torch.float32: (1e-3, 1 - 1e-6, 0.99),
    torch.float16: (0.1, 0.999, 0.9),
    torch.bfloat16: (0.5, 0.99, 0.8),
}


@dataclass(frozen=True)
class Metrics:
    max_abs_err: float
    max_abs_ref: float  # scale of the reference logits, to read the error against
    min_cosine: float
    top1: float
    token_match: float  # fraction of generated tokens equal to the reference's greedy tokens
    tie_margin: float  # largest reference top-1 margin at a row's first differing token (0: no difference)
    tokens: list[list[int]]
    ref_tokens: list[list[int]]


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    bound: str
    ok: bool


@dataclass
class Report:
    folder: str
    tp: int
    mode: str
    device: str
    dtype: str
    ref_dtype: str
    prompt_ids: list[list[int]]
    metrics: Metrics
    thresholds: Thresholds
    collectives_per_layer: dict[str, float]  # per decoder layer per forward, rank 0
    kernel: bool  # quantized matmuls ran through the W4A16 kernel op (else dequantize + matmul)
    checks: list[Check] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name} {c.value}, bound {c.bound}" for c in self.checks if not c.ok]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return dict(asdict(self), passed=self.passed, failures=self.failures)


def hf_state_dict(folder: Path, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The original model as an HF state dict: dequantized weights [N, K] (= W.T), biases and the dense tensors."""
    manifest = read_manifest(folder)
    quant = quant_tensor_names(manifest)
    state = {k: v.to(dtype) for k, v in read_rank(folder, 0, wanted=lambda t: t not in quant).items()}
    for name, layer in original_layers(folder, manifest, list(manifest["layers"])).items():
        state[f"{name}.weight"] = dequantize(layer, dtype).T.contiguous()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.to(dtype)
    return state


def hf_reference(folder: Path, dtype: torch.dtype = torch.float64):
    """transformers' own `*ForCausalLM` for the folder's config, holding the dequantized original weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = read_manifest(folder)
    config = AutoConfig.for_model(**manifest["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    missing, unexpected = model.load_state_dict(hf_state_dict(folder, dtype), strict=False)
    tied = {f"{ARCHES[manifest['arch']].lm_head}.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"HF {type(model).__name__} state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.inference_mode()
def reference_tokens(model, ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """The reference's own greedy continuation (`generate`, no early stop at EOS).

    The explicit all-ones attention mask matters: without it `generate` masks every prompt token equal to the pad id.
    """
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


@torch.inference_mode()
def reference_logits(model, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's logits for prompt + `tokens[:, :-1]` in one forward: what `greedy` returns, teacher-forced."""
    return model(torch.cat([ids, tokens[:, :-1]], dim=1)).logits


def compare(ours: Generation, ref_tokens: torch.Tensor, ref_logits: torch.Tensor) -> Metrics:
    """Logits position by position, and greedy tokens up to each row's first difference.

    Where a row's tokens first differ the prefixes are equal, so `ref_logits` there are the reference's own: its
    margin between its token and ours says whether that was a near-tie (rounding) or a real disagreement.
    """
    a, b = ours.logits.double(), ref_logits.double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    differs = ours.tokens != ref_tokens
    step0 = b.shape[1] - ours.tokens.shape[1]  # position whose logits chose the first generated token
    margins = [0.0]
    for row in differs.any(dim=1).nonzero().flatten().tolist():
        first = int(differs[row].nonzero()[0])
        at = b[row, step0 + first]
        margins.append(float(at.max() - at[ours.tokens[row, first]]))
    return Metrics(
        max_abs_err=float((a - b).abs().max()),
        max_abs_ref=float(b.abs().max()),
        min_cosine=float(cosine.min()),
        top1=float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        token_match=float((~differs).double().mean()),
        tie_margin=max(margins),
        tokens=ours.tokens.tolist(),
        ref_tokens=ref_tokens.tolist(),
    )


def checks(m: Metrics, t: Thresholds) -> list[Check]:
    return [
        Check("max |logit error|", f"{m.max_abs_err:.3g} (logits up to {m.max_abs_ref:.3g})",
              f"<= {t.max_abs_err:g}", m.max_abs_err <= t.max_abs_err),
        Check("min cosine per position", f"{m.min_cosine:.9f}", f">= {t.min_cosine:.9f}", m.min_cosine >= t.min_cosine),
        Check("top-1 agreement", f"{m.top1:.4f}", f">= {t.min_top1:g}", m.top1 >= t.min_top1),
        Check("greedy tokens", f"{m.token_match:.4f} equal" + (f", first difference at margin {m.tie_margin:.3g}"
                                                              if m.token_match < 1 else ""),
              f"differ only at margin <= {t.max_tie_margin:g}", m.tie_margin <= t.max_tie_margin),
    ]


def thresholds_for(dtype: torch.dtype, max_abs_err: float | None = None, min_cosine: float | None = None,
                   min_top1: float | None = None, max_tie_margin: float | None = None) -> Thresholds:
    """The defaults for `dtype` where no bound is given. A token may flip where the reference's top two are within
    twice the logit error bound (each moved by at most the bound), so that is the default tie margin."""
    default_err, default_cos, default_top1 = DEFAULTS[dtype]
    err = default_err if max_abs_err is None else max_abs_err
    return Thresholds(err, default_cos if min_cosine is None else min_cosine,
                      default_top1 if min_top1 is None else min_top1,
                      2 * err if max_tie_margin is None else max_tie_margin)


def write_report(report: Report, path: Path) -> None:
    """The report as JSON, written whole or not at all (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(report.to_json(), indent=2))
    os.replace(tmp, path)


def prompt(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Random token ids: synthetic models have no tokenizer, and any ids exercise every weight."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def validate(folder: Path, *, mode: str = "tpaware", device: str = "cpu", dtype: torch.dtype = torch.float32,
             ids: torch.Tensor | None = None, max_tokens: int = 8, ref_dtype: torch.dtype = torch.float64,
             thresholds: Thresholds | None = None, timeout: float = 600.0, kernel: bool = True) -> Report:
    """Run `folder` at its tp in `mode` and measure it against the HF reference; `report.failures` lists misses."""
    manifest = read_manifest(folder)
    ids = prompt(manifest["dims"]["vocab"], 2, 16, 0) if ids is None else ids
    ours, counts = generate(RankSetup(str(folder), mode, device, dtype, kernel), ids, max_tokens, timeout)
    hf = hf_reference(folder, ref_dtype)
    metrics = compare(ours, reference_tokens(hf, ids, max_tokens), reference_logits(hf, ids, ours.tokens))
    thresholds = thresholds or thresholds_for(dtype)
    per_layer = manifest["dims"]["layers"] * max_tokens  # decoder layers x forwards
    return Report(str(folder), manifest["tp"], mode, device, str(dtype).removeprefix("torch."),
                  str(ref_dtype).removeprefix("torch."), ids.tolist(), metrics, thresholds,
                  {k: v / per_layer for k, v in sorted(counts[0].items())},
                  kernel and device == "cuda" and kernel_op() is not None, checks(metrics, thresholds))
