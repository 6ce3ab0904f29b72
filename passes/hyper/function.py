"""`ai.symshrink.HyperDecode` / `HyperDecodeGrouped`: a tensor in hyperfunction codes, decoded by ONNX function
bodies of stock ops.

The indices come in rows of eight (`bits` bytes a row): window = row @ weights, index = (window / shifts)
mod 2^bits in int32 (`formats.row_unpacking`). The decoded table T[j + codes k] = offsets[j] * band_scales[k]
is built once; per tensor the weight is one Gather from the small table c + L * T, per group it is
c_g + L_g * T[index]: float32 in the order of `formats.decode_values`, so numpy and onnxruntime decode
bit-identically. onnxruntime constant-folds the bodies at session creation, keeping every intermediate until
folding ends, so the bodies hold few full-size arrays. Needs opset 13 (integer MatMul).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import FUNCTION_DOMAIN, add_initializer, declare_function
from symshrink.passes.analysis.opset import ensure_opset
from symshrink.runtime.formats import HYPER_INPUTS as INPUTS
from symshrink.runtime.formats import HyperCode, is_grouped
from symshrink.runtime.formats import hyper_function_inputs as function_inputs
from symshrink.runtime.formats import hyper_function_name as function_name

__all__ = ["DOMAIN", "FUNCTION_OPSET", "function_name", "hyper_decode_function", "check_opset", "decode_node",
           "function_inputs", "is_grouped"]

DOMAIN = FUNCTION_DOMAIN
FUNCTION_OPSET = 13  # MatMul over int32


def hyper_decode_function(grouped: bool, opset: int) -> ir.Function:
    """The function, its body written at the model's default opset `opset`.

    Inputs: packed uint8 [rows, bits]; byte_weights int32 [bits, 8]; shifts int32 [8]; modulus int32 [];
    pairs int64 [1]; offsets float [codes, dims]; band_scales float [K + 1]; per tensor centres float [1, dims]
    and spans float [1, 1], per group centres [G, 1, dims] and spans [G, 1, 1], layout int64 [3] = [G, pairs
    per group, dims] and count int64 [1]; shape int64 [rank]. Output: the tensor, float [shape]."""
    name = function_name(grouped)
    inputs = {key: ir.Value(name=key) for key in INPUTS[name]}
    nodes: list[ir.Node] = []

    def op(op_type: str, *args: ir.Value, **attributes) -> ir.Value:
        out = ir.Value(name=f"{op_type.lower()}_{len(nodes)}")
        nodes.append(ir.node(op_type, list(args), attributes, outputs=[out]))
        return out

    def const(*values: int) -> ir.Value:
        return op("Constant", value=ir.tensor(np.array(values, np.int64)))

    window = op("MatMul", op("Cast", inputs["packed"], to=ir.DataType.INT32), inputs["byte_weights"])
    rows = op("Mod", op("Div", window, inputs["shifts"]), inputs["modulus"])
    index = op("Slice", op("Reshape", rows, const(-1)), const(0), inputs["pairs"])
    dims = op("Slice", op("Shape", inputs["offsets"]), const(1), const(2))
    bands = op("Reshape", inputs["band_scales"], const(-1, 1, 1))
    table = op("Reshape", op("Mul", bands, inputs["offsets"]), op("Concat", const(-1), dims, axis=0))
    if grouped:
        pairs = op("Reshape", op("Gather", table, index), inputs["layout"])
        values = op("Add", inputs["centres"], op("Mul", pairs, inputs["spans"]))
        flat = op("Slice", op("Reshape", values, const(-1)), const(0), inputs["count"])
        weight = op("Reshape", flat, inputs["shape"])
    else:  # c + L * T[index] = (c + L * T)[index], element for element
        weight = op("Reshape", op("Gather", op("Add", inputs["centres"], op("Mul", table, inputs["spans"])), index),
                    inputs["shape"])
    weight.name = "weight"
    graph = ir.Graph(list(inputs.values()), [weight], nodes=nodes, opset_imports={"": opset}, name=name)
    return ir.Function(DOMAIN, name, graph=graph, attributes=[])


def check_opset(model: ir.Model) -> None:
    """Upgrade a model below opset 13 (or refuse, saying why)."""
    ensure_opset(model, FUNCTION_OPSET, "the HyperDecode function (integer MatMul)")


def decode_node(model: ir.Model, code: HyperCode, prefix: str, shared: dict[tuple, ir.Value]) -> ir.Node:
    """A HyperDecode(Grouped) node over new initializers `prefix.*` (the function declared in `model`); its output
    is the decoded tensor. The codebook table and the unpacking constants are shared between tensors: `shared`
    holds those written so far."""
    graph, grouped = model.graph, is_grouped(code)
    declare_function(model, function_name(grouped), lambda opset: hyper_decode_function(grouped, opset))
    keys = {"offsets": ("table", *code.setting.table_key()), "byte_weights": ("bytes", code.bits),
            "shifts": ("shifts", code.bits), "modulus": ("modulus", code.bits)}
    values = []
    for key, array in function_inputs(code).items():
        if key in keys:
            if keys[key] not in shared:
                shared[keys[key]] = add_initializer(graph, "hyper." + "_".join(map(str, keys[key])), array)
            values.append(shared[keys[key]])
        else:
            values.append(add_initializer(graph, f"{prefix}.{key}", array))
    output = ir.Value(name=f"{prefix}.decoded", shape=ir.Shape(code.shape), type=ir.TensorType(ir.DataType.FLOAT))
    name = function_name(grouped)
    return ir.node(name, values, domain=DOMAIN, outputs=[output], name=f"{prefix}.{name}")
