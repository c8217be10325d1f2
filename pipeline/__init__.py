"""tpaware: act-order GPTQ checkpoints made exact and fast under tensor parallelism."""

__version__ = "0.1.0"
