"""`ai.symshrink.HyperDecode`: a tensor in hyperfunction codes, decoded by an ONNX function body of stock ops.

Index i of `bits` bits starts at bit i * bits of the packed stream (two zero bytes appended), so it is read
from a 24-bit window of three bytes: ((b[q] + 256 b[q+1] + 65536 b[q+2]) / 2^r) mod 2^bits, q = i bits / 8,
r = i bits mod 8 (int32; bits <= 16). The decoded table T[j + codes k] = offsets[j] * band_scales[k] is
built once, then W = c_g + L_g * T[index] in float32, the order of `hyper_codec.decode_values`, so numpy and
onnxruntime decode bit-identically. onnxruntime constant-folds the body at session creation: the codes
are compressed on disk and dense fp32 in memory. Needs opset 11 (Range).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.passes.graph import add_initializer
from symshrink.passes.hyper_codec import HyperCode

__all__ = ["DOMAIN", "FUNCTION_NAME", "FUNCTION_OPSET", "hyper_decode_function", "add_function", "decode_node",
           "function_inputs"]

DOMAIN = "ai.symshrink"
FUNCTION_NAME = "HyperDecode"
FUNCTION_OPSET = 11  # Range
INPUTS = ("packed", "offsets", "band_scales", "centres", "spans", "bits", "codes", "pairs", "layout", "count", "shape")
PAD_BYTES = 2  # the 24-bit window of the last index reads up to two bytes past the stream
MAX_BITS = 16


def hyper_decode_function(opset: int) -> ir.Function:
    """The function, its body written at the model's default opset `opset`.

    Inputs: packed uint8 [P + 2]; offsets float [codes, dims]; band_scales float [K + 1]; centres float
    [G, 1, dims]; spans float [G, 1, 1]; bits, codes, pairs int32 scalars; layout int64 [3] = [G, pairs per
    group, dims]; count int64 [1] weights; shape int64 [rank]. Output: the tensor, float [shape]."""
    inputs = {name: ir.Value(name=name) for name in INPUTS}
    nodes: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        out = ir.Value(name=f"{op_type.lower()}_{len(nodes)}")
        nodes.append(ir.node(op_type, list(args), attributes, outputs=[out]))
        return out

    def const(array: np.ndarray) -> ir.Value:
        return op("Constant", value=ir.tensor(array))

    powers = const(np.left_shift(1, np.arange(MAX_BITS + 1), dtype=np.int32))  # 2^0 .. 2^16
    position = op("Mul", op("Range", const(np.array(0, np.int32)), inputs["pairs"], const(np.array(1, np.int32))),
                  inputs["bits"])
    eight = const(np.array(8, np.int32))
    first = op("Div", position, eight)
    stream = op("Cast", inputs["packed"], to=ir.DataType.INT32)

    def byte(offset: int, weight: int) -> ir.Value:
        value = op("Gather", stream, op("Add", first, const(np.array(offset, np.int32))) if offset else first)
        return op("Mul", value, const(np.array(weight, np.int32))) if weight != 1 else value

    window = op("Add", op("Add", byte(0, 1), byte(1, 256)), byte(2, 65536))
    shifted = op("Div", window, op("Gather", powers, op("Mod", position, eight)))
    index = op("Mod", shifted, op("Gather", powers, inputs["bits"]))
    # the decoded table, row j + codes k = offsets[j] * band_scales[k]: [(K + 1) codes, dims], built once
    dims = op("Slice", inputs["layout"], const(np.array([2], np.int64)), const(np.array([3], np.int64)))
    bands = op("Reshape", inputs["band_scales"], const(np.array([-1, 1, 1], np.int64)))
    table = op("Reshape", op("Mul", bands, inputs["offsets"]), op("Concat", const(np.array([-1], np.int64)), dims, axis=0))
    scaled = op("Reshape", op("Gather", table, index), inputs["layout"])
    values = op("Add", inputs["centres"], op("Mul", scaled, inputs["spans"]))
    flat = op("Slice", op("Reshape", values, const(np.array([-1], np.int64))), const(np.array([0], np.int64)),
              inputs["count"])
    weight = op("Reshape", flat, inputs["shape"])
    weight.name = "weight"
    graph = ir.Graph(list(inputs.values()), [weight], nodes=nodes, opset_imports={"": opset}, name=FUNCTION_NAME)
    return ir.Function(DOMAIN, FUNCTION_NAME, graph=graph, attributes=[])


def add_function(model: ir.Model) -> None:
    """Declare the function (once) and its domain in the model."""
    opset = model.opset_imports.get("", 1)
    if opset < FUNCTION_OPSET:
        raise BadInput(f"hyperfunction codes need opset >= {FUNCTION_OPSET}; the model has {opset}")
    key = (DOMAIN, FUNCTION_NAME, "")
    if key not in model.functions:
        model.functions[key] = hyper_decode_function(opset)
    model.opset_imports[DOMAIN] = 1
    model.ir_version = max(model.ir_version, 8)  # model-local functions


def function_inputs(code: HyperCode) -> dict[str, np.ndarray]:
    """The function's input arrays for one code, by input name."""
    if code.bits > MAX_BITS:
        raise BadInput(f"{code.bits}-bit indices: at most {MAX_BITS} bits per index can be decoded")
    groups, dims = len(code.spans), code.setting.dims
    return {
        "packed": np.concatenate([code.packed(), np.zeros(PAD_BYTES, np.uint8)]),
        "offsets": code.offsets, "band_scales": code.band_scales,
        "centres": code.centres.reshape(groups, 1, dims), "spans": code.spans.reshape(groups, 1, 1),
        "bits": np.array(code.bits, np.int32), "codes": np.array(len(code.offsets), np.int32),
        "pairs": np.array(len(code.indices), np.int32),
        "layout": np.array([groups, len(code.indices) // groups, dims], np.int64),
        "count": np.array([code.count], np.int64), "shape": np.array(code.shape, np.int64),
    }


def decode_node(graph: ir.Graph, code: HyperCode, prefix: str, tables: dict[tuple, ir.Value]) -> ir.Node:
    """A HyperDecode node over new initializers `prefix.*`; its output is the decoded tensor. The codebook
    table is shared: `tables` (setting.table_key() -> initializer) holds those written so far."""
    key = code.setting.table_key()
    if key not in tables:
        tables[key] = add_initializer(graph, "hyper.table." + "_".join(map(str, key)), code.offsets)
    values = [tables[key] if name == "offsets" else add_initializer(graph, f"{prefix}.{name}", array)
              for name, array in function_inputs(code).items()]
    output = ir.Value(name=f"{prefix}.decoded", shape=ir.Shape(code.shape), type=ir.TensorType(ir.DataType.FLOAT))
    return ir.node(FUNCTION_NAME, values, domain=DOMAIN, outputs=[output], name=f"{prefix}.HyperDecode")
