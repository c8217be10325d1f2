"""Exports of a per-rank folder: ONNX graphs (`onnx`, with the checks TensorRT needs in `checks`) and TensorRT-LLM."""
