"""Moment reduction of FFN width: keep k of d hidden units and refit the consumer on calibration data.

y = sum_i phi(x . w_i + b_i) a_i is a function of the units' empirical measure; a k-atom measure whose
first moment of the consumer output matches on calibration data (ridge least squares, see
`selectors`) replaces it. The rewrite slices producer columns and per-unit constants to the kept
units and writes the refitted rows (plus an intercept folded into the consumer's bias) into the
consumer: an ordinary smaller MatMul/Gemm with stock ops.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass

from symshrink.passes.analysis import Group
from symshrink.passes.graph import constant_array
from symshrink.passes.handlers import Cut
from symshrink.passes.plan import Plan
from symshrink.passes.selectors import refit_consumer, select_units

__all__ = ["MomentReductionPass", "consumer_matrix"]

logger = logging.getLogger(__name__)


def _set_constant(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph, label: str) -> None:
    """Give `node` a new initializer as input `index` (other readers of the old value keep it)."""
    old = node.inputs[index]
    name = f"{old.name or label}.{label}"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    node.replace_input_with(index, value)


def consumer_matrix(node: ir.Node, cut: Cut) -> np.ndarray:
    """The consumer weight as [units, outputs]."""
    w = constant_array(node.inputs[cut.input_index])
    return np.moveaxis(w, cut.axis, 0).reshape(w.shape[cut.axis], -1)


def _bias_add(node: ir.Node) -> tuple[ir.Node, int] | None:
    """The Add right after a consumer MatMul that adds a constant bias, with the bias's input index."""
    if node.op_type == "Gemm":
        return None
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = 1 - uses[0].idx
    bias = constant_array(add.inputs[other])
    return (add, other) if bias is not None and bias.ndim == 1 else None


class MomentReductionPass(InPlacePass):
    """Rewrite each planned FFN group to its planned width. `activations[group]` holds the unit
    activations [rows, d] on calibration data. Fills each group plan's `kept` and `relative_error`."""

    def __init__(self, plan: Plan, groups: list[Group], activations: dict[str, np.ndarray]):
        super().__init__()
        self.plan = plan
        self.groups = {g.name: g for g in groups}
        self.activations = activations

    def call(self, model: ir.Model) -> PassResult:
        nodes = {node.name: node for node in model.graph}
        modified = False
        for planned in self.plan.groups:
            group = self.groups[planned.group]
            if group.kind != "ffn":
                logger.warning("moment reduction of %s groups is not implemented; %s kept", group.kind, group.name)
                continue
            modified |= self._rewrite(model.graph, nodes, group, planned)
        if modified:
            # the replaced full-width weights are now unread: drop them from the file
            RemoveUnusedNodesPass()(model)
        return PassResult(model, modified)

    def _rewrite(self, graph: ir.Graph, nodes: dict[str, ir.Node], group: Group, planned) -> bool:
        (cut,) = group.consumers  # analysis guarantees one consumer for ffn groups it accepts
        consumer = nodes[cut.node]
        weight = consumer_matrix(consumer, cut)
        h = self.activations[group.name]
        kept = np.asarray(planned.kept) if planned.kept is not None else select_units(h, weight, planned.keep_width)
        bias = _bias_add(consumer)
        refit = refit_consumer(h, weight, kept, ridge=self.plan.ridge, intercept=bias is not None)
        planned.kept = [int(i) for i in refit.kept]
        planned.relative_error = refit.relative_error
        if len(kept) == group.width:
            return False
        for c in group.producers + group.passthrough:
            node = nodes[c.node]
            array = constant_array(node.inputs[c.input_index])
            _set_constant(node, c.input_index, np.take(array, kept, axis=c.axis), graph, f"keep{len(kept)}")
        original = constant_array(consumer.inputs[cut.input_index])
        new = np.moveaxis(refit.weight.reshape((len(kept),) + tuple(np.delete(original.shape, cut.axis))), 0, cut.axis)
        _set_constant(consumer, cut.input_index, np.ascontiguousarray(new), graph, f"keep{len(kept)}")
        if bias is not None:
            add, index = bias
            _set_constant(add, index, constant_array(add.inputs[index]) + refit.bias_delta, graph, "refit")
        _clear_group_shapes(graph, group, len(kept))
        return True


def _clear_group_shapes(graph: ir.Graph, group: Group, width: int) -> None:
    """Tensors of the group carry the old width in their recorded shapes: give them the new one."""
    names = set(group.values)
    for node in graph:
        for out in node.outputs:
            if out.name in names and out.shape is not None and len(out.shape) > 0:
                dims = list(out.shape)
                dims[-1] = width
                out.shape = ir.Shape(dims)
