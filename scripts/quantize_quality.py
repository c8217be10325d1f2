"""How far a GPTQ checkpoint is from its fp model: the numbers behind `pipeline.quantize`'s choice of defaults.

    python scripts/quantize_quality.py engines/smollm2-135m-instruct-bf16 engines/smollm2-gptq-w4g64-act-asym [...]

For each checkpoint it prints the mean KL(fp || quantized) of the next-token distributions over 4 x 128 held-out
tokens, and the greedy next token for a few prompts beside the fp model's. Held-out means standard-library docstrings
that the calibration does not use. The quantized model runs through tpaware's own fp32 reference (`reference_model`),
which is exactly the model GPTQModel's checkpoint describes (`tests/test_quantize.py`). The fp model runs in
transformers, in fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.gptq.checkpoint import read_checkpoint
from pipeline.quantize import CALIBRATION_MODULES, calibration_ids
from pipeline.reference import reference_model

HELD_OUT = ("socket", "tarfile", "sched")
PROMPTS = ("The capital of France is", "The largest planet in our solar system is", "def add(a, b):\n    return")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fp", type=Path, help="HF fp model folder the checkpoints were quantized from")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="GPTQ checkpoint folders")
    args = parser.parse_args()
    assert not set(HELD_OUT) & set(CALIBRATION_MODULES)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.fp, local_files_only=True)
    ids = torch.tensor(calibration_ids(tokenizer, samples=4, seq_len=128, modules=HELD_OUT))
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    fp = AutoModelForCausalLM.from_pretrained(args.fp, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        fp_logp = F.log_softmax(fp(ids).logits.float(), -1)
        print(f"{'fp':<40} next: {[tokenizer.decode(fp(p).logits[0, -1].argmax()) for p in prompts]}")
        for folder in args.checkpoints:
            model = reference_model(read_checkpoint(folder), torch.float32)
            logp = F.log_softmax(model(ids), -1)
            kl = F.kl_div(logp, fp_logp, log_target=True, reduction="none").sum(-1).mean().item()
            nexts = [tokenizer.decode(model(p)[0, -1].argmax()) for p in prompts]
            print(f"{folder.name:<40} KL {kl:.4f}  next: {nexts}")


if __name__ == "__main__":
    main()
