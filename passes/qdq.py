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
import onnx_ir as ir

from symshrink.passes.blocks import QuantizedWeight
from symshrink.passes.graph import add_initializer
from symshrink.passes.opset import ensure_opset as upgrade
from symshrink.passes.products import Product

__all__ = ["ensure_opset", "dequantize_product", "STORAGE_DTYPES", "DEQUANTIZE_OPSET"]

DEQUANTIZE_OPSET = 25  # the first opset whose DequantizeLinear takes uint2
STORAGE_DTYPES = {2: ml_dtypes.uint2, 8: np.uint8}  # code bits -> storage type


def ensure_opset(model: ir.Model) -> bool:
    """Upgrade the model to the opset of 2-bit DequantizeLinear (`opset.ensure_opset`). True if it changed."""
    return upgrade(model, DEQUANTIZE_OPSET, "2-bit DequantizeLinear")


def dequantize_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str) -> Product:
    """x @ DequantizeLinear(weight); the codes, scales and zero points become initializers `prefix.*`."""
    if weight.block is None:  # per column: 1-D scales along the output axis
        scales, zero_points, attributes = weight.scales.reshape(-1), weight.zero_points.reshape(-1), {"axis": 1}
    else:
        scales, zero_points, attributes = weight.scales, weight.zero_points, {"axis": 0, "block_size": weight.block}
    dtype = STORAGE_DTYPES[weight.bits]
    arrays = {"q": weight.codes.astype(dtype), "scale": scales, "zero_point": zero_points.astype(dtype)}
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in arrays.items()]

    def product(x: ir.Value, name: str) -> tuple[list[ir.Node], ir.Value]:
        dequantized, result = ir.Value(name=f"{values[0].name}.dequantized"), ir.Value(name=f"{name}.product")
        return [ir.node("DequantizeLinear", values, attributes, outputs=[dequantized], name=f"{name}.DequantizeLinear"),
                ir.node("MatMul", [x, dequantized], outputs=[result], name=name)], result

    return product
