"""Graph surgery for quantized weights: y = x W becomes y = MatMul(x, DequantizeLinear(q, scale, zero_point)) or
onnxruntime's MatMulNBits(x, codes, scales, zero_points), and a table lookup Gather(E, ids) becomes its
GatherBlockQuantized(codes, ids, scales, zero_points). A Conv keeps its node over DequantizeLinear'd 4-D codes,
or, 1x1 with stride 1 and no pads, becomes MatMulNBits over the channels between two Transposes.

q [K, N] is stored in its own narrow type (uint2 for ternary codes, uint8), scales and zero points per
block of `block` input rows (`axis=0, block_size=block`) or per column (`axis=1`). onnxruntime fuses
DequantizeLinear -> MatMul into MatMulNBits for 2-, 4- and 8-bit codes and block sizes 32..256 (and
per-column scales, which it expands to blocks of 32), so the weight stays narrow in memory. uint2 needs
opset 25: `ensure_opset` upgrades a model or refuses with the converter's reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import add_initializer
from symshrink.passes.analysis.opset import ensure_opset as upgrade
from symshrink.passes.analysis.products import Bias, Product, add_bias
from symshrink.runtime.formats import (
    CONTRIB_DOMAIN,
    DEQUANTIZE_OPSET,
    QuantizedWeight,
    conv_arrays,
    dequantize_arrays,
    gather_arrays,
    gather_block,
    matmul_nbits_arrays,
    matmul_nbits_layout,
)

__all__ = ["ensure_opset", "dequantize_product", "nbits_product", "gather_product", "tied_product",
           "pointwise_product", "conv_product", "ensure_gather_domain", "PRODUCTS", "CONV_PRODUCTS"]


def ensure_opset(model: ir.Model) -> bool:
    """Upgrade the model to the opset of 2-bit DequantizeLinear (`opset.ensure_opset`). True if it changed."""
    return upgrade(model, DEQUANTIZE_OPSET, "2-bit DequantizeLinear")


def dequantize_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str) -> Product:
    """x @ DequantizeLinear(weight); the codes, scales and zero points become initializers `prefix.*`."""
    stored = dequantize_arrays(weight)
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in stored.arrays.items()]

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        dequantized, result = ir.Value(name=f"{values[0].name}.dequantized"), ir.Value(name=f"{name}.product")
        return add_bias([ir.node("DequantizeLinear", values, stored.attributes, outputs=[dequantized],
                                 name=f"{name}.DequantizeLinear"),
                         ir.node("MatMul", [x, dequantized], outputs=[result], name=name)], result, bias, x, name)

    return product


def nbits_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str) -> Product:
    """x @ W as onnxruntime's MatMulNBits over the codes as it holds them (`formats.matmul_nbits_arrays`): the
    same numbers as DequantizeLinear -> MatMul, which onnxruntime fuses into it, without the fusion's extra
    copy at load (MiniLM-L6 4-bit: 33.9 MB resident against 42.0 MB)."""
    stored = matmul_nbits_arrays(weight)
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in stored.arrays.items()]

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        return _matmul_nbits(x, values, stored.attributes, bias, name)

    return product


def _matmul_nbits(x: ir.Value, constants: list[ir.Value], attributes: dict, bias: Bias | None,
                  name: str) -> tuple[list[ir.Node], ir.Value]:
    """MatMulNBits(x, B, scales[, zero_points]) with the bias as its own input (index 5, after g_idx)."""
    result = ir.Value(name=f"{name}.product")
    inputs = [x, *constants]
    if bias is not None:
        inputs += [None] * (5 - len(inputs)) + [bias.value]
    return [ir.node("MatMulNBits", inputs, attributes, domain=CONTRIB_DOMAIN, outputs=[result], name=name)], result


def gather_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str) -> Product:
    """GatherBlockQuantized(codes, ids) for the table E = W^T (`formats.gather_arrays`); its arrays become
    initializers `prefix.*`. The model must import onnxruntime's domain (`ensure_gather_domain`)."""
    stored = gather_arrays(weight)
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in stored.arrays.items()]

    def product(ids: ir.Value, name: str, bias: Bias | None = None) -> tuple[list[ir.Node], ir.Value]:
        assert bias is None, "a table lookup has no bias"
        result = ir.Value(name=f"{name}.rows")
        return [ir.node("GatherBlockQuantized", [values[0], ids, *values[1:]], stored.attributes, domain=CONTRIB_DOMAIN,
                        outputs=[result], name=name)], result

    return product


def tied_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str, gather: ir.Node) -> Product:
    """A tied head x E^T and its table's lookup from one set of codes in the file: `gather` becomes
    GatherBlockQuantized (now), the head MatMulNBits over the same bytes seen as [V, blocks, block bytes] and the
    same scales and zero points (their layouts agree). onnxruntime folds the Reshape into a copy when the session
    starts and MatMulNBits repacks it, so memory holds the codes twice, both low-bit."""
    blocks_shape, attributes = matmul_nbits_layout(weight.codes.shape, weight.bits,
                                                   gather_block(weight.codes.shape[0], weight.block))
    new_nodes, rows_value = gather_product(graph, weight, prefix)(gather.inputs[1], gather.name, None)
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], new_nodes, [gather.outputs[0]], [rows_value])
    data, _, *tables = new_nodes[0].inputs  # codes, ids, scales[, zero points]
    shape = add_initializer(graph, f"{prefix}.blocks_shape", np.array(blocks_shape))

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        blocks = ir.Value(name=f"{data.name}.blocks")
        nodes, result = _matmul_nbits(x, [blocks, *tables], attributes, bias, name)
        return [ir.node("Reshape", [data, shape], outputs=[blocks], name=f"{name}.Reshape"), *nodes], result

    return product


def pointwise_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str) -> Product:
    """A 1x1 Conv (stride 1, no pads) over NCHW maps as MatMulNBits over the channels of every pixel: Transpose to
    NHWC, MatMulNBits (`nbits_product`), Transpose back; onnxruntime cancels the Transposes between neighbours.
    A Conv over a DequantizeLinear'd weight would lose onnxruntime's prepacked NCHWc kernels and dequantize on
    every run (`conv_product`); this runs about as fast as fp32's convs (docs/methods.md#convolutions)."""
    matmul = nbits_product(graph, weight, prefix)

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        pixels, maps = ir.Value(name=f"{name}.nhwc"), ir.Value(name=f"{name}.nchw")
        nodes, result = matmul(pixels, name, bias)
        return [ir.node("Transpose", [x], {"perm": [0, 2, 3, 1]}, outputs=[pixels], name=f"{name}.to_nhwc"), *nodes,
                ir.node("Transpose", [result], {"perm": [0, 3, 1, 2]}, outputs=[maps], name=f"{name}.to_nchw")], maps
    return product


def conv_product(graph: ir.Graph, weight: QuantizedWeight, prefix: str, conv: ir.Node,
                 kernel: tuple[int, int]) -> Product:
    """Conv(x, DequantizeLinear(codes), bias) with `conv`'s attributes, the codes laid out 4-D
    (`formats.conv_arrays`). Small on disk and in memory; slow on onnxruntime's CPU provider, which
    dequantizes on every run and cannot prepack the weight (`pointwise_product` where the kernel allows)."""
    stored = conv_arrays(weight, kernel)
    values = [add_initializer(graph, f"{prefix}.{key}", array) for key, array in stored.arrays.items()]
    attributes = {name: attribute.value for name, attribute in conv.attributes.items()}

    def product(x: ir.Value, name: str, bias: Bias | None) -> tuple[list[ir.Node], ir.Value]:
        dequantized, result = ir.Value(name=f"{values[0].name}.dequantized"), ir.Value(name=f"{name}.product")
        inputs = [x, dequantized] + ([bias.value] if bias is not None else [])
        return [ir.node("DequantizeLinear", values, stored.attributes, outputs=[dequantized],
                        name=f"{name}.DequantizeLinear"),
                ir.node("Conv", inputs, attributes, outputs=[result], name=name)], result

    return product


def ensure_gather_domain(model: ir.Model) -> None:
    model.opset_imports.setdefault(CONTRIB_DOMAIN, 1)


# the writer of each stored form (`grid.site_format`): tables through GatherBlockQuantized, products through
# MatMulNBits or DequantizeLinear -> MatMul
PRODUCTS = {"gather": gather_product, "matmulnbits": nbits_product, "dequantize": dequantize_product}
# ... of a Conv's: pointwise through MatMulNBits, else DequantizeLinear -> Conv (given the Conv node)
CONV_PRODUCTS = {"matmulnbits": pointwise_product, "conv": conv_product}
