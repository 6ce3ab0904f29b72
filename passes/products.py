"""Rewriting a weight site y = x W (+ b): new nodes compute the product, then the site's bias and any
per-output shift are added, and the result takes over the site's output (its name included).

A MatMul's shift goes into the constant of its bias Add when it has one; a Gemm becomes product + Add of
beta C (alpha is already in the site's W); otherwise a new Add carries the shift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from symshrink.passes.graph import add_initializer, bias_input, constant_array
from symshrink.passes.weights import WeightSite

__all__ = ["Product", "replace_product"]

# (activation x, name prefix) -> (new nodes in order, the value holding x @ W)
Product = Callable[[ir.Value, str], tuple[list[ir.Node], ir.Value]]


def replace_product(graph: ir.Graph, node: ir.Node, site: WeightSite, product: Product, shift: np.ndarray | None,
                    dtype: np.dtype, label: str) -> None:
    bias = None
    if site.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2]).reshape(-1) * dtype.type(node.attributes.get_float("beta", 1.0))
    if site.op == "MatMul" and shift is not None and bias_input(node) is not None:
        reader, index, _ = bias_input(node)
        old = constant_array(reader.inputs[index])
        new = add_initializer(graph, f"{reader.inputs[index].name}.{label}", (old + shift).astype(old.dtype))
        reader.replace_input_with(index, new)
        shift = None
    if shift is not None:
        bias = shift if bias is None else bias + shift
    new_nodes, result = product(node.inputs[0], node.name)  # the new MatMul keeps the site's name
    if bias is not None:
        biased = ir.Value(name=f"{node.name}.{label}.biased")
        constant = add_initializer(graph, f"{site.weight}.{label}.bias", np.asarray(bias, dtype))
        new_nodes.append(ir.node("Add", [result, constant], outputs=[biased], name=f"{node.name}.bias"))
        result = biased
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [result])
