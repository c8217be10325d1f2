"""TensorRT-LLM model classes for checkpoints written by `tpaware export trtllm`: stock Llama / GPT plus input gathers.

`tpaware export trtllm` copies this file into the checkpoint as `tpaware_trtllm_model.py`, and `tpaware build
--backend trtllm` passes it to `trtllm-build --model_cls_file ... --model_cls_name ...`. trtllm-build loads it as a
standalone module, so it imports TensorRT-LLM only (engine-era releases, 0.2x to 1.2.x), never tpaware.

Why it exists: act-order GPTQ rows are stored sorted by group, so a column-parallel linear multiplies `x[..., in_perm]`,
a local gather that stock TensorRT-LLM models do not have. The checkpoint's config.json lists, under `tpaware`:
- `gather`: modules whose input is gathered by their `in_perm` (int32 [K]) before the groupwise-quantized matmul;
- `masked`: o_proj modules exported whole on every rank (`--attn-policy masked`); their input is
  `x_local[..., in_perm] * in_mask`, i.e. this rank's heads placed in a zero-filled full-width input, then sorted.
The MLP's down projection is in neither list: under the TP-aware plan its shard needs no gather.

Untested here: TensorRT-LLM cannot be installed on the machines this was written on. The arithmetic it performs is
tested in tpaware's CI against the unpermuted reference (tests/test_trtllm_export.py).
"""

from tensorrt_llm.functional import index_select
from tensorrt_llm.models import GPTForCausalLM, LLaMAForCausalLM
from tensorrt_llm.parameter import Parameter


def _module(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _whole(row_linear):
    """The same groupwise-quantized row-parallel linear, but holding the full K on every rank (still all-reduced)."""
    return type(row_linear)(row_linear.in_features * row_linear.tp_size * row_linear.tp_size,
                            row_linear.out_features, group_size=row_linear.group_size,
                            zero=row_linear.zero is not None, bias=row_linear.bias is not None,
                            dtype=row_linear.dtype, tp_group=row_linear.tp_group, tp_size=row_linear.tp_size)


def _gather_input(linear, masked):
    """Make `linear` multiply `x[..., in_perm]` (times `in_mask` when masked); both come from the checkpoint."""
    linear.in_perm = Parameter(shape=(linear.in_features,), dtype="int32")
    if masked:
        linear.in_mask = Parameter(shape=(linear.in_features,), dtype=linear.dtype)
    multiply = linear.forward

    def forward(x, *args, **kwargs):
        x = index_select(x, x.ndim() - 1, linear.in_perm.value)
        if masked:
            x = x * linear.in_mask.value
        return multiply(x, *args, **kwargs)

    linear.forward = forward


class _Tpaware:
    def __post_init__(self):
        super().__post_init__()  # TensorRT-LLM's quantize(): the linears become groupwise-quantized first
        spec = self.config.tpaware
        for path in spec["masked"]:
            parent, name = path.rsplit(".", 1)
            setattr(_module(self, parent), name, _whole(_module(self, path)))
        for path in spec["gather"]:
            _gather_input(_module(self, path), masked=path in spec["masked"])


class TpawareLLaMAForCausalLM(_Tpaware, LLaMAForCausalLM):
    """Llama with tpaware's input gathers."""


class TpawareGPTForCausalLM(_Tpaware, GPTForCausalLM):
    """GPTBigCode (StarCoder) with tpaware's input gathers."""
