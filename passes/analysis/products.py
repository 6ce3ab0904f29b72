"""Rewriting a weight site y = x W (+ b): new nodes compute the product (for a table, the lookup of its ids),
then the site's bias and any per-output shift are added, and the result takes over the site's output (its name
included).

A MatMul's bias Add is rewritten with it (its constant plus the shift); a Gemm becomes product + beta C
(alpha is already in the site's W); a Conv, product + B; the product adds the bias (and any shift) its own way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import add_initializer, bias_input, constant_array
from symshrink.passes.analysis.weights import WeightSite

__all__ = ["Bias", "Product", "add_bias", "replace_product"]

@dataclass(frozen=True)
class Bias:
    """A site's bias [N] (its constant plus any shift) and the name of a node that adds it (a rewritten bias Add's)."""

    value: ir.Value
    node: str


# (activation x, name prefix, bias or None) -> (new nodes in order, the value holding x @ W + bias): each product
# adds the bias where onnxruntime runs it best (MatMulNBits' and Conv's bias inputs, else `add_bias`)
Product = Callable[[ir.Value, str, Bias | None], tuple[list[ir.Node], ir.Value]]


def _bias_op(x: ir.Value) -> str:
    """Add where the activation has rank >= 3, else Sum: over a 2-D input, onnxruntime (1.32) fuses MatMul + Add
    into Gemm before it fuses DequantizeLinear + MatMul into MatMulNBits, which would dequantize the weight on
    every run. Sum is the same sum and is not fused."""
    rank = x.shape.rank() if x.shape is not None else None
    return "Add" if rank is not None and rank >= 3 else "Sum"


def add_bias(nodes: list[ir.Node], result: ir.Value, bias: Bias | None, x: ir.Value,
             name: str) -> tuple[list[ir.Node], ir.Value]:
    """A product's nodes and result, then + bias by its own node (none without a bias)."""
    if bias is None:
        return nodes, result
    biased = ir.Value(name=f"{name}.biased")
    return [*nodes, ir.node(_bias_op(x), [result, bias.value], outputs=[biased], name=bias.node)], biased


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
    if bias is not None:  # one value per output column
        value = add_initializer(graph, f"{site.weight}.{label}.bias",
                                np.broadcast_to(np.asarray(bias, dtype).reshape(-1), (site.cols,)).copy())
        bias = Bias(value, old_nodes[1].name if len(old_nodes) > 1 else f"{node.name}.bias")
    new_nodes, result = product(node.inputs[site.data_input], node.name, bias)  # the new node keeps the site's name
    ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [old_nodes[-1].outputs[0]], [result])
