"""W4A16 GEMM plugin: int4 weights (GPTQ-style groups along K) times fp16/bf16 activations.

`layout` and `reference` are pure PyTorch and import anywhere; `ops` registers the
`tpaware::w4a16_gemm` custom op and imports Triton only when a CUDA tensor reaches it.
"""
