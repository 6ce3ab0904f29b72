"""`ai.symshrink.TernaryMatMul`: ternary codes packed in bytes, decoded by an ONNX function body of stock ops.

The codes t + 1 of the weight [blocks * block, N] (zero-padded rows) are base-`radix` digits, element 0
lowest: radix 4 holds 4 per byte (2 bits), radix 3 holds 5 (1.6 bits). The body computes
digits = (byte / radix^i) mod radix, W = (digits - 1) * scale of each block, y = x @ W[:K]. It needs
opset 10, not 25: the fallback for consumers that cannot take 2-bit DequantizeLinear, and the GPU
runtime's entry point. onnxruntime inlines the function and constant-folds W back to dense fp32 at
session creation: small on disk, fp32 in memory and speed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.passes.analysis.graph import FUNCTION_DOMAIN, add_initializer, declare_function
from symshrink.passes.analysis.products import Bias, Product, add_bias
from symshrink.runtime.formats import DIGITS_PER_BYTE, QuantizedWeight, ternary_function_arrays
from symshrink.runtime.formats import TERNARY_INPUTS as INPUTS
from symshrink.runtime.formats import ternary_function_name as function_name

__all__ = ["DOMAIN", "FUNCTION_OPSET", "function_name", "ternary_matmul_function", "function_product", "add_function"]

DOMAIN = FUNCTION_DOMAIN
FUNCTION_OPSET = 10  # Mod and Slice-with-inputs


def ternary_matmul_function(radix: int, opset: int) -> ir.Function:
    """The function for one radix, its body written at the model's default opset `opset`.

    Inputs: x [..., K]; packed uint8 [P]; scales float [blocks, 1, N]; blocks_shape int64 [blocks, block, N];
    matrix_shape int64 [blocks * block, N]; count int64 [1] = blocks * block * N; rows int64 [1] = K."""
    per_byte = DIGITS_PER_BYTE[radix]
    x, packed, scales, blocks_shape, matrix_shape, count, rows = (ir.Value(name=n) for n in INPUTS)
    nodes: list[ir.Node] = []

    def op(op_type: str, inputs: list[ir.Value], **attributes) -> ir.Value:
        out = ir.Value(name=f"{op_type.lower()}_{len(nodes)}")
        nodes.append(ir.node(op_type, inputs, attributes, outputs=[out]))
        return out

    def const(array: np.ndarray) -> ir.Value:
        return op("Constant", [], value=ir.tensor(array))

    digits = op("Mod", [op("Div", [op("Reshape", [op("Cast", [packed], to=ir.DataType.INT32), const(np.array([-1, 1]))]),
                                   const(radix ** np.arange(per_byte, dtype=np.int32)[None, :])]),
                        const(np.array(radix, np.int32))])
    zero = const(np.array([0]))
    used = op("Slice", [op("Reshape", [digits, const(np.array([-1]))]), zero, count])
    ternary = op("Sub", [op("Cast", [used], to=ir.DataType.FLOAT), const(np.array(1.0, np.float32))])
    weight = op("Mul", [op("Reshape", [ternary, blocks_shape]), scales])
    matrix = op("Slice", [op("Reshape", [weight, matrix_shape]), zero, rows, zero])
    y = op("MatMul", [x, matrix])
    y.name = "y"
    graph = ir.Graph([x, packed, scales, blocks_shape, matrix_shape, count, rows], [y], nodes=nodes,
                     opset_imports={"": opset}, name=function_name(radix))
    return ir.Function(DOMAIN, function_name(radix), graph=graph, attributes=[])


def add_function(model: ir.Model, radix: int) -> None:
    """Declare the function (once) and its domain in the model."""
    opset = model.opset_imports.get("", 1)
    if opset < FUNCTION_OPSET:
        raise BadInput(f"ternary function storage needs opset >= {FUNCTION_OPSET}; the model has {opset}")
    declare_function(model, function_name(radix), lambda version: ternary_matmul_function(radix, version))


def function_product(graph: ir.Graph, weight: QuantizedWeight, radix: int, prefix: str) -> Product:
    """x @ W through TernaryMatMul; W's packed codes and scales become initializers `prefix.*`."""
    if weight.bits != 2 or weight.scales.dtype != np.float32:
        raise BadInput("ternary function storage holds float32 ternary weights only")
    arrays = ternary_function_arrays(weight, radix).arrays
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in arrays.items()]

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        result = ir.Value(name=f"{name}.product")
        return add_bias([ir.node(function_name(radix), [x, *values], domain=DOMAIN, outputs=[result], name=name)],
                        result, bias, x, name)

    return product
