"""Per-op handlers: how each op's constant inputs are cut along the unit axis of a symmetric group.

A group's units live on one axis of an activation tensor: the last axis after MatMul/Gemm, axis 1
after Conv (NCHW). A handler looks at one node and answers with the constant slices (`Cut`) that
belong to the units, or with a reason why the node does not fit. Three roles exist:
producer (makes the unit axis), passthrough (acts on each unit separately), consumer (sums over it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import attr, constant_array, is_constant

__all__ = ["Cut", "ShapeEntry", "Fit", "PRODUCERS", "PASSTHROUGH", "CONSUMERS", "ELEMENTWISE_UNARY", "ELEMENTWISE_BINARY"]


@dataclass(frozen=True)
class Cut:
    """Slice `axis` of constant input `input_index` of node `node` belongs to the group's units."""

    node: str
    input_index: int
    axis: int


@dataclass(frozen=True)
class ShapeEntry:
    """Entry `position` of the flattened constant input `input_index` of node `node` counts the units
    (a head count in a Reshape shape): at width k it becomes `per_unit * k`."""

    node: str
    input_index: int
    position: int
    per_unit: int


@dataclass(frozen=True)
class Fit:
    """A handler's answer: the cuts for this node, the group width it implies (None: any), and for a
    producer the unit axis of its output (-1 last axis, 1 channels)."""

    cuts: tuple[Cut, ...]
    width: int | None = None
    unit_axis: int | None = None


# A handler gets (node, index of the input in the group (or -1 for producers), unit_axis) and
# returns a Fit, or a string that says why the node does not fit.
Handler = Callable[[ir.Node, int, int], "Fit | str"]


def _weight(node: ir.Node, index: int) -> np.ndarray | None:
    return constant_array(node.inputs[index]) if len(node.inputs) > index else None


# ---------------------------------------------------------------- producers
def _matmul_producer(node: ir.Node, _: int, __: int) -> Fit | str:
    w = _weight(node, 1)
    if w is None or w.ndim != 2:
        return "weight is not a constant 2-D matrix"
    return Fit((Cut(node.name, 1, 1),), width=w.shape[1], unit_axis=-1)


def _gemm_producer(node: ir.Node, _: int, __: int) -> Fit | str:
    w = _weight(node, 1)
    if w is None:
        return "weight B is not constant"
    if attr(node, "transA", 0):
        return "transA=1 is not supported"
    axis = 0 if attr(node, "transB", 0) else 1
    cuts = [Cut(node.name, 1, axis)]
    bias = _weight(node, 2)
    if bias is not None and bias.ndim == 1 and bias.shape[0] == w.shape[axis] > 1:
        cuts.append(Cut(node.name, 2, 0))
    elif len(node.inputs) > 2 and node.inputs[2] is not None and (bias is None or bias.size > 1):
        return "bias C is neither constant per unit nor scalar"
    return Fit(tuple(cuts), width=w.shape[axis], unit_axis=-1)


def _conv_producer(node: ir.Node, _: int, __: int) -> Fit | str:
    w = _weight(node, 1)
    if w is None:
        return "filter is not constant"
    if attr(node, "group", 1) != 1:
        return "grouped conv as producer is not supported"
    cuts = [Cut(node.name, 1, 0)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if not is_constant(node.inputs[2]):
            return "bias is not constant"
        cuts.append(Cut(node.name, 2, 0))
    return Fit(tuple(cuts), width=w.shape[0], unit_axis=1)


PRODUCERS: dict[str, Handler] = {"MatMul": _matmul_producer, "Gemm": _gemm_producer, "Conv": _conv_producer}

# ---------------------------------------------------------------- passthrough (per unit)
ELEMENTWISE_UNARY = frozenset({
    "Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Identity", "LeakyRelu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Elu", "Selu", "Celu", "Mish", "Neg", "Abs", "Exp", "Sqrt", "Swish",
})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})


def _per_unit_constant(array: np.ndarray, input_rank: int | None, unit_axis: int) -> tuple[int | None, str | None]:
    """For a constant broadcast against the group tensor: (axis of the constant along units or None
    when it is the same for every unit, reason when it mixes units)."""
    if array.size == 1:
        return None, None
    if unit_axis == -1:
        if array.shape[-1] > 1 and all(s == 1 for s in array.shape[:-1]):
            return array.ndim - 1, None
        return None, f"constant of shape {list(array.shape)} varies along other axes"
    # channel axis 1 of an NCHW tensor: the constant must be [C,1,1] (rank-aligned) or [1,C,1,1]
    rank = input_rank if input_rank is not None else 4
    axis = array.ndim - (rank - 1)
    if 0 <= axis < array.ndim and all(s == 1 for i, s in enumerate(array.shape) if i != axis):
        return axis, None
    return None, f"constant of shape {list(array.shape)} is not per channel"


def _elementwise(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    if node.op_type == "Clip":
        if any(v is not None and not is_constant(v) for v in node.inputs[1:]):
            return "Clip bounds are not constant"
        return Fit(())
    if node.op_type in ELEMENTWISE_UNARY:
        return Fit(())
    cuts = []
    for other_index, other in enumerate(node.inputs):
        if other_index == index:
            continue
        array = constant_array(other)
        if array is None:
            continue  # a second group tensor: the walk decides whether it belongs to the group
        rank = node.inputs[index].shape.rank() if node.inputs[index].shape is not None else None
        axis, reason = _per_unit_constant(array, rank, unit_axis)
        if reason:
            return reason
        if axis is not None:
            cuts.append(Cut(node.name, other_index, axis))
    return Fit(tuple(cuts))


def _prelu(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    if index != 0:
        return "group tensor is the PRelu slope"
    return _elementwise(node, index, unit_axis)


def _batchnorm(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    if index != 0 or unit_axis != 1:
        return "BatchNormalization normalises another axis"
    if not all(is_constant(v) for v in node.inputs[1:5]):
        return "BatchNormalization statistics are not constant"
    return Fit(tuple(Cut(node.name, i, 0) for i in range(1, 5)))


def _depthwise_conv(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    w = _weight(node, 1)
    if index != 0 or unit_axis != 1 or w is None:
        return "Conv reads the group tensor but is not a constant-filter conv over channels"
    if attr(node, "group", 1) != w.shape[0] or w.shape[1] != 1:
        return "Conv mixes channels"
    cuts = [Cut(node.name, 1, 0)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        cuts.append(Cut(node.name, 2, 0))
    return Fit(tuple(cuts), width=w.shape[0])


PASSTHROUGH: dict[str, Handler] = {
    **{op: _elementwise for op in ELEMENTWISE_UNARY | ELEMENTWISE_BINARY | {"Clip"}},
    "PRelu": _prelu,
    "BatchNormalization": _batchnorm,
    "Conv": _depthwise_conv,
}


# ---------------------------------------------------------------- consumers
def _matmul_consumer(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    w = _weight(node, 1)
    if index != 0 or unit_axis != -1 or w is None or w.ndim != 2:
        return "MatMul does not read the group tensor against a constant weight"
    return Fit((Cut(node.name, 1, 0),), width=w.shape[0])


def _gemm_consumer(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    w = _weight(node, 1)
    if index != 0 or unit_axis != -1 or w is None or attr(node, "transA", 0):
        return "Gemm does not read the group tensor as A against a constant B"
    axis = 1 if attr(node, "transB", 0) else 0
    return Fit((Cut(node.name, 1, axis),), width=w.shape[axis])


def _conv_consumer(node: ir.Node, index: int, unit_axis: int) -> Fit | str:
    w = _weight(node, 1)
    if index != 0 or unit_axis != 1 or w is None:
        return "Conv does not read the group tensor against a constant filter"
    if attr(node, "group", 1) != 1:
        return "grouped Conv does not sum over channels"
    return Fit((Cut(node.name, 1, 1),), width=w.shape[1])


CONSUMERS: dict[str, Handler] = {"MatMul": _matmul_consumer, "Gemm": _gemm_consumer, "Conv": _conv_consumer}
