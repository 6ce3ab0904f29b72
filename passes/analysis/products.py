"""Rewriting a weight site y = x W (+ b): new nodes compute the product (for a table, the lookup of its ids),
then the site's bias and any per-output shift are added, and the result takes over the site's output (its name
included).

A MatMul's bias Add is rewritten with it (its constant plus the shift); a Gemm becomes product + beta C
(alpha is already in the site's W); a Conv, product + B over [Cout, 1, 1]; otherwise a new node adds the shift.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import add_initializer, bias_input, constant_array
from symshrink.passes.analysis.weights import WeightSite

__all__ = ["Product", "replace_product"]

# (activation x, name prefix) -> (new nodes in order, the value holding x @ W)
Product = Callable[[ir.Value, str], tuple[list[ir.Node], ir.Value]]


def _bias_op(x: ir.Value, site: WeightSite) -> str:
    """Add where the activation has rank >= 3 (a Conv's maps always), else Sum: over a 2-D input, onnxruntime
    (1.32) fuses MatMul + Add into Gemm before it fuses DequantizeLinear + MatMul into MatMulNBits, which would
    dequantize the weight on every run. Sum is the same sum and is not fused."""
    if site.patch is not None:
        return "Add"
    rank = x.shape.rank() if x.shape is not None else None
    return "Add" if rank is not None and rank >= 3 else "Sum"


def replace_product(graph: ir.Graph, node: ir.Node, site: WeightSite, product: Product, shift: np.ndarray | None,
                    dtype: np.dtype, label: str) -> None:
    old_nodes, bias = [node], None
    if site.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2]).reshape(-1) * dtype.type(node.attributes.get_float("beta", 1.0))
    elif site.op == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
    elif site.op == "MatMul" and bias_input(node) is not None:  # the bias Add is rewritten with the product
        reader, index, _ = bias_input(node)
        bias = constant_array(reader.inputs[index])
        old_nodes.append(reader)
    if shift is not None:
        bias = shift if bias is None else bias + shift
    x = node.inputs[site.data_input]
    new_nodes, result = product(x, node.name)  # the new MatMul keeps the site's name
    if bias is not None:
        biased = ir.Value(name=f"{node.name}.{label}.biased")
        if site.patch is not None:  # per output channel of NCHW maps
            bias = np.reshape(bias, (-1, 1, 1))
        constant = add_initializer(graph, f"{site.weight}.{label}.bias", np.asarray(bias, dtype))
        name = old_nodes[1].name if len(old_nodes) > 1 else f"{node.name}.bias"
        new_nodes.append(ir.node(_bias_op(x, site), [result, constant], outputs=[biased], name=name))
        result = biased
    ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [old_nodes[-1].outputs[0]], [result])
