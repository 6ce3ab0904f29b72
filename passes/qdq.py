"""Graph surgery for quantized weights: y = x W becomes y = MatMul(x, DequantizeLinear(q, scale, zero_point)).

q [K, N] is stored in its own narrow type (uint2 for ternary codes, uint8), scales and zero points per
block of `block` input rows (`axis=0, block_size=block`) or per column (`axis=1`). onnxruntime fuses
DequantizeLinear -> MatMul into MatMulNBits for 2-, 4- and 8-bit codes and block sizes 32..256 (and
per-column scales, which it expands to blocks of 32), so the weight stays narrow in memory. uint2 needs
opset 25: `ensure_opset` upgrades a model or refuses with the converter's reason.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.version_converter

from symshrink.errors import BadInput
from symshrink.passes.blocks import QuantizedWeight
from symshrink.passes.graph import bias_input, constant_array
from symshrink.passes.weights import WeightSite

__all__ = ["ensure_opset", "replace_weight", "STORAGE_DTYPES", "DEQUANTIZE_OPSET"]

DEQUANTIZE_OPSET = 25  # the first opset whose DequantizeLinear takes uint2
STORAGE_DTYPES = {2: ml_dtypes.uint2, 8: np.uint8}  # code bits -> storage type


def _dequantize_inputs(weight: QuantizedWeight, prefix: str) -> tuple[list[ir.Value], dict[str, int]]:
    """(q, scale, zero_point) initializers and DequantizeLinear's attributes."""
    dtype = STORAGE_DTYPES[weight.bits]
    if weight.block is None:  # per column: 1-D scales along the output axis
        scales, zero_points, attributes = weight.scales.reshape(-1), weight.zero_points.reshape(-1), {"axis": 1}
    else:
        scales, zero_points, attributes = weight.scales, weight.zero_points, {"axis": 0, "block_size": weight.block}
    arrays = {"q": weight.codes.astype(dtype), "scale": scales, "zero_point": zero_points.astype(dtype)}
    values = [ir.Value(name=f"{prefix}.{key}", shape=ir.Shape(array.shape),
                       type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                       const_value=ir.tensor(array, name=f"{prefix}.{key}")) for key, array in arrays.items()]
    return values, attributes


def ensure_opset(model: ir.Model, version: int = DEQUANTIZE_OPSET) -> bool:
    """Upgrade the default-domain opset to at least `version` (onnxscript's converter, falling back to
    onnx's). True if the model changed."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    try:
        onnxscript.version_converter.convert_version(model, version, fallback=True)
    except Exception as err:  # the converters raise their own exception types for unsupported ops
        raise BadInput(f"cannot upgrade the model from opset {current} to {version}, which 2-bit "
                       f"DequantizeLinear needs: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if model.opset_imports.get("", 1) < version:
        raise BadInput(f"cannot upgrade the model from opset {current} to {version}, which 2-bit DequantizeLinear needs")
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)]))
    return True


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, base: str) -> str:
    name, copies = base, 0
    while name in graph.initializers:
        copies += 1
        name = f"{base}.{copies}"
    return name


def replace_weight(graph: ir.Graph, node: ir.Node, site: WeightSite, weight: QuantizedWeight,
                   shift: np.ndarray | None, label: str) -> None:
    """Make `node` compute x @ dequantize(weight) (+ shift per output column). A MatMul keeps its node
    (its bias Add takes the shift, or a new Add does); a Gemm becomes MatMul (+ Add of beta C + shift)."""
    prefix = _unique(graph, f"{site.weight}.{label}")
    values, attributes = _dequantize_inputs(weight, prefix)
    for value in values:
        graph.register_initializer(value)
    dequantized = ir.Value(name=f"{prefix}.dequantized")
    dequantize = ir.node("DequantizeLinear", values, attributes, outputs=[dequantized], name=f"{prefix}.DequantizeLinear")
    dtype = weight.scales.dtype
    bias = None
    if site.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2]).reshape(-1) * dtype.type(node.attributes.get_float("beta", 1.0))
    if site.op == "MatMul" and shift is not None and bias_input(node) is not None:
        reader, index, _ = bias_input(node)
        old = constant_array(reader.inputs[index])
        reader.replace_input_with(index, _constant(graph, _unique(graph, f"{reader.inputs[index].name}.{label}"),
                                                   (old + shift).astype(old.dtype)))
        shift = None
    if shift is not None:
        bias = shift.astype(dtype) if bias is None else (bias + shift).astype(dtype)
    if site.op == "MatMul" and bias is None:
        graph.insert_before(node, dequantize)
        node.replace_input_with(1, dequantized)
        return
    product = ir.Value(name=f"{node.name}.{label}.product")
    new_nodes = [dequantize, ir.node("MatMul", [node.inputs[0], dequantized], outputs=[product], name=f"{node.name}.{label}")]
    result = product
    if bias is not None:
        result = ir.Value(name=f"{node.name}.{label}.biased")
        new_nodes.append(ir.node("Add", [product, _constant(graph, _unique(graph, f"{prefix}.bias"), bias)],
                                 outputs=[result], name=f"{node.name}.{label}.bias"))
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [result])
