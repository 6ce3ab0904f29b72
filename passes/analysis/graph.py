"""Small helpers over onnx-ir graphs: constants behind values, readers of a value, node names, new initializers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from symshrink.runtime.formats import FUNCTION_DOMAIN

__all__ = ["FUNCTION_DOMAIN", "declare_function", "constant_tensor", "constant_array", "is_constant",
           "node_label", "attr", "bias_input", "ensure_names", "add_initializer"]


def _constant_node_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if "value" in node.attributes:
        return node.attributes["value"].as_tensor()
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in node.attributes:
            return ir.tensor(np.array(node.attributes[key].value, dtype=dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in node.attributes:
            return ir.tensor(np.array(list(node.attributes[key].value), dtype=dtype))
    return None


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a Constant node's output, else None.

    An initializer that is also a graph input can be overridden at run time: not a constant.
    """
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value
    producer = value.producer()
    return _constant_node_tensor(producer) if producer is not None else None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = constant_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_constant(value: ir.Value | None) -> bool:
    return constant_tensor(value) is not None


def node_label(node: ir.Node) -> str:
    return node.name or f"{node.op_type}({', '.join(v.name or '?' for v in node.outputs)})"


def attr(node: ir.Node, name: str, default):
    """An attribute's Python value, or `default` when it is not set."""
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def bias_input(node: ir.Node) -> tuple[ir.Node, int, float] | None:
    """Where a shift of a node's output can go (node, input index, factor on the shift): Gemm C
    (times alpha / beta), Conv B, the running mean of a BatchNormalization right after a bias-free Conv
    (x + c - mean = x - (mean - c)), or the constant of the Add right after a MatMul. None: nowhere
    without a new node."""
    if node.op_type in ("Gemm", "Conv") and len(node.inputs) > 2 and node.inputs[2] is not None:
        factor = attr(node, "alpha", 1.0) / attr(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
        return (node, 2, factor) if constant_array(node.inputs[2]) is not None else None
    uses = node.outputs[0].uses()
    if len(uses) != 1:
        return None
    reader, index = uses[0].node, uses[0].idx
    if node.op_type == "Conv" and reader.op_type == "BatchNormalization" and index == 0:
        return (reader, 3, -1.0) if constant_array(reader.inputs[3]) is not None else None
    if node.op_type == "MatMul" and reader.op_type == "Add":
        bias = constant_array(reader.inputs[1 - index])
        return (reader, 1 - index, 1.0) if bias is not None and bias.ndim == 1 else None
    return None


def ensure_names(graph: ir.Graph) -> None:
    """Name unnamed or duplicate-named nodes `<op>_<index>`: cuts, sites and plans refer to nodes by name
    (names are set only where absent or repeated, which does not change the function)."""
    seen: set[str] = set()
    for index, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def declare_function(model: ir.Model, name: str, build: Callable[[int], ir.Function]) -> None:
    """Declare the function `FUNCTION_DOMAIN.name` in the model once (`build(default opset)` makes it), with
    its domain import and the IR version that model-local functions need."""
    key = (FUNCTION_DOMAIN, name, "")
    if key not in model.functions:
        model.functions[key] = build(model.opset_imports.get("", 1))
    model.opset_imports[FUNCTION_DOMAIN] = 1
    model.ir_version = max(model.ir_version, 8)


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named `base` (`base.1`, `base.2`... when taken)."""
    name, copies = base, 0
    while name in graph.initializers:
        copies += 1
        name = f"{base}.{copies}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value

