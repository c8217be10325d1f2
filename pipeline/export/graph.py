"""A minimal ONNX graph builder: initializers from arrays, single-output nodes with unique names, and the model.

onnx.helper is enough for the handful of ops a decoder needs and keeps the exporter free of heavier dependencies;
this class only removes the bookkeeping (unique tensor names, initializer lists, opset imports).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # DequantizeLinear with INT4 and `block_size` (blocked quantization) needs opset 21
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: Counter[str] = Counter()
        self._shared: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        """A tensor name not used before in this graph, readable: the hint, then a counter when it repeats."""
        self._used[hint] += 1
        return hint if self._used[hint] == 1 else f"{hint}_{self._used[hint] - 1}"

    def input(self, name: str, elem_type: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(self.fresh(name), elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list[int | str]) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"output_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, array: np.ndarray, hint: str) -> str:
        """An initializer; ml_dtypes.int4 arrays become packed INT4 tensors."""
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def shared(self, name: str, make: Callable[[], np.ndarray]) -> str:
        """The initializer `name`, made once per graph however many layers use it (RoPE tables, epsilons)."""
        if name not in self._shared:
            self._shared[name] = self.const(make(), name)
        return self._shared[name]

    def ints(self, values: list[int]) -> str:
        """A constant int64 vector (shapes, axes, pads), shared by every node that uses the same values."""
        return self.shared("i64_" + "_".join(str(v).replace("-", "m") for v in values),
                           lambda: np.array(values, dtype=np.int64))

    def scalar(self, value: float, dtype: type = np.float32) -> str:
        return self.shared(f"{np.dtype(dtype).name}_{value}", lambda: np.array(value, dtype=dtype))

    def op(self, op_type: str, *inputs: str, hint: str | None = None, domain: str = "", **attrs) -> str:
        return self.ops(op_type, *inputs, count=1, hint=hint, domain=domain, **attrs)[0]

    def ops(self, op_type: str, *inputs: str, count: int, hint: str | None = None, domain: str = "",
            **attrs) -> list[str]:
        """A node with `count` outputs (Split); returns their names."""
        outs = [self.fresh(hint or op_type.lower()) for _ in range(count)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{outs[0]}", domain=domain,
                                           **attrs))
        return outs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == MS_DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="tpaware")
        model.ir_version = 10  # onnxruntime 1.20+ reads IR 10; newer IRs are refused by older runtimes
        return model


FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
