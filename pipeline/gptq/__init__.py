"""GPTQ checkpoints: int4 packing, the layer math, reading and writing."""
