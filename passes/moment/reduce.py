"""Moment reduction: rewrite each planned group of d units to k and fold the new weights into its consumer.

y = sum_i phi_i(x) W_i depends on the units only through their empirical measure; a selector (see
`selectors`, `recombine`, `fold`) picks a k-atom measure that keeps the consumer's output on the
calibration moments. The rewrite slices (or merges) every per-unit constant of the group along its
unit axis, writes the new consumer rows and the bias change, and fixes head counts in Reshape shapes:
an ordinary smaller MatMul/Gemm/Conv with stock ops.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

from symshrink.calibration.stats import UnitStats, unfold_channels
from symshrink.passes.analysis.graph import add_initializer, attr, bias_input, constant_array, constant_tensor
from symshrink.passes.analysis.groups import Group
from symshrink.passes.analysis.handlers import Cut
from symshrink.passes.moment.fold import fold
from symshrink.passes.moment.plan import GroupPlan, Plan, make_plan
from symshrink.passes.moment.recombine import recombine
from symshrink.passes.moment.selectors import Reduction, Selector, UnitProblem, magnitude, refit, select
from symshrink.passes.protocol import Candidate, Offer, Site, known

__all__ = ["MomentReductionPass", "SELECTORS", "ConsumerLayout", "consumer_layout", "unit_problem", "bytes_saved", "moment_offer"]

logger = logging.getLogger(__name__)

SELECTORS: dict[str, Selector] = {"select": select, "recombine": recombine, "fold": fold, "magnitude": magnitude}
# ops through which phi(c z) = c phi(z) holds for c > 0, so fold may move unit norms into the consumer
_HOMOGENEOUS_OPS = frozenset({"Relu", "Add", "Sub", "Identity"})


@dataclass(frozen=True)
class ConsumerLayout:
    """How the consumer reads the units: `taps` input columns per unit (head_dim for a head, kh*kw for a
    channel under a kxk Conv), and for a Conv the geometry of its patches."""

    taps: int
    conv: dict | None = None  # kernel, strides, pads, dilations

    def rows(self, array: np.ndarray, width: int) -> np.ndarray:
        """The consumer's input as rows [n, width, taps]."""
        if self.conv is None:
            return array.reshape(-1, width, self.taps)
        if self.taps == 1 and self.conv["strides"] == (1, 1) and not any(self.conv["pads"]):
            return np.moveaxis(array, 1, -1).reshape(-1, width, 1)
        return unfold_channels(array, **self.conv)


def consumer_layout(group: Group, nodes: dict[str, ir.Node]) -> ConsumerLayout | str:
    """The consumer's layout, or why the group cannot be refitted."""
    if len(group.consumers) != 1:
        return f"{len(group.consumers)} consumers (one is supported)"
    (cut,) = group.consumers
    node = nodes[cut.node]
    weight = constant_array(node.inputs[cut.input_index])
    if node.op_type != "Conv":
        return ConsumerLayout(taps=weight.shape[cut.axis] // group.width)
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return "consumer Conv uses auto_pad"
    kernel = tuple(weight.shape[2:])
    if len(kernel) != 2:
        return "consumer Conv is not 2-D"
    geometry = {"kernel": kernel, "strides": tuple(attr(node, "strides", (1, 1))),
                "pads": tuple(attr(node, "pads", (0, 0, 0, 0))), "dilations": tuple(attr(node, "dilations", (1, 1)))}
    return ConsumerLayout(taps=kernel[0] * kernel[1], conv=geometry)


def _consumer_rows(weight: np.ndarray, cut: Cut) -> np.ndarray:
    """Consumer weight as unit-major rows [units * taps, outputs]: Conv [O, C, kh, kw] -> [C, kh, kw, O]."""
    moved = np.moveaxis(weight, cut.axis, 0)
    if moved.ndim == 4:
        moved = np.moveaxis(moved, 1, -1)
    return moved.reshape(-1, moved.shape[-1])


def _consumer_weight(rows: np.ndarray, original: np.ndarray, cut: Cut) -> np.ndarray:
    """Inverse of `_consumer_rows`, for however many units `rows` holds."""
    moved = np.moveaxis(original, cut.axis, 0)
    if moved.ndim == 4:
        moved = np.moveaxis(moved, 1, -1)
    shaped = rows.reshape((-1,) + moved.shape[1:])
    if original.ndim == 4:
        shaped = np.moveaxis(shaped, -1, 1)
    return np.ascontiguousarray(np.moveaxis(shaped, 0, cut.axis))


def _unit_slices(array: np.ndarray, axis: int, width: int) -> np.ndarray:
    """[width, block, ...rest]: the constant with its unit axis split into units of `block` entries."""
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape((width, moved.shape[0] // width) + moved.shape[1:])


def _reduce_constant(array: np.ndarray, axis: int, width: int, reduction: Reduction) -> np.ndarray:
    units = _unit_slices(array, axis, width)
    new = units[reduction.kept] if reduction.merge is None else np.tensordot(reduction.merge, units, axes=1)
    moved_shape = (new.shape[0] * new.shape[1],) + new.shape[2:]
    return np.ascontiguousarray(np.moveaxis(new.reshape(moved_shape), 0, axis)).astype(array.dtype)


def unit_problem(group: Group, nodes: dict[str, ir.Node], stats: UnitStats | None, ridge: float,
                 seed: int = 0) -> UnitProblem:
    """Everything a selector may look at for this group, read off the graph's constants."""
    (cut,) = group.consumers
    consumer = nodes[cut.node]
    out_weight = _consumer_rows(constant_array(consumer.inputs[cut.input_index]), cut)
    params = [_unit_slices(constant_array(nodes[c.node].inputs[c.input_index]), c.axis, group.width)
              for c in group.producers + group.passthrough]
    unit_params = np.concatenate([p.reshape(group.width, -1).astype(np.float64) for p in params], axis=1)
    homogeneous = group.kind in ("ffn", "conv") and set(group.ops) <= _HOMOGENEOUS_OPS and "Relu" in group.ops
    return UnitProblem(out_weight, block=out_weight.shape[0] // group.width, stats=stats, unit_params=unit_params,
                       intercept=bias_input(consumer) is not None, homogeneous=homogeneous, ridge=ridge, seed=seed)


def bytes_saved(groups: list[Group], widths: dict[str, int], nodes: dict[str, ir.Node]) -> float:
    """Weight bytes that these widths remove. A tensor cut by two groups (the middle matrix of a
    three-layer MLP) keeps the product of both kept fractions."""
    kept_fraction: dict[tuple[str, int], float] = {}
    for group in groups:
        for cut in group.producers + group.passthrough + group.consumers:
            key = (cut.node, cut.input_index)
            kept_fraction[key] = kept_fraction.get(key, 1.0) * widths.get(group.name, group.width) / group.width
    saved = 0.0
    for (node, index), fraction in kept_fraction.items():
        saved += constant_tensor(nodes[node].inputs[index]).nbytes * (1.0 - fraction)
    return saved


def _set_constant(node: ir.Node, index: int, array: np.ndarray, graph: ir.Graph, label: str) -> None:
    """Give `node` a new initializer as input `index` (other readers of the old value keep it)."""
    node.replace_input_with(index, add_initializer(graph, f"{node.inputs[index].name or node.name}.{label}", array))


class MomentReductionPass(InPlacePass):
    """Rewrite each planned group to its planned width with the plan's selector. `problems[group]` holds
    the group's `UnitProblem`. Fills each group plan's `kept` and `relative_error`."""

    def __init__(self, plan: Plan, groups: list[Group], problems: dict[str, UnitProblem], progress: bool = False):
        super().__init__()
        self.plan = plan
        self.groups = {g.name: g for g in groups}
        self.problems = problems
        self.progress = progress

    def call(self, model: ir.Model) -> PassResult:
        nodes = {node.name: node for node in model.graph}
        position = {name: index for index, name in enumerate(nodes)}
        # upstream first: a consumer's refit (rows of its weight, computed from the original) must come
        # before a downstream group slices the same weight's outputs
        ordered = sorted(self.plan.groups, key=lambda p: position[self.groups[p.group].producers[0].node])
        modified = False
        for planned in tqdm(ordered, desc=f"rewriting ({self.plan.selector})", unit="group",
                            disable=not self.progress, leave=False):
            modified |= self._rewrite(model.graph, nodes, self.groups[planned.group], planned)
        if modified:
            # the replaced full-width weights are now unread: drop them from the file
            RemoveUnusedNodesPass()(model)
        return PassResult(model, modified)

    def _reduction(self, planned: GroupPlan) -> Reduction:
        problem = self.problems[planned.group]
        if planned.kept is not None and self.plan.selector == "select":  # a replayed plan keeps its units
            return refit(problem, np.asarray(planned.kept))
        return SELECTORS[self.plan.selector](problem, planned.keep_width)

    def _rewrite(self, graph: ir.Graph, nodes: dict[str, ir.Node], group: Group, planned: GroupPlan) -> bool:
        reduction = self._reduction(planned)
        planned.kept = [int(i) for i in reduction.kept]
        planned.relative_error = reduction.relative_error
        k = reduction.width
        if k == group.width and reduction.merge is None:
            return False
        label = f"{self.plan.selector}{k}"
        for cut in group.producers + group.passthrough:
            node = nodes[cut.node]
            array = _reduce_constant(constant_array(node.inputs[cut.input_index]), cut.axis, group.width, reduction)
            _set_constant(node, cut.input_index, array, graph, label)
            if node.op_type == "Conv" and cut in group.passthrough and cut.input_index == 1:
                node.attributes["group"] = ir.AttrInt64("group", array.shape[0])  # depthwise: one group per channel
        (cut,) = group.consumers
        consumer = nodes[cut.node]
        original = constant_array(consumer.inputs[cut.input_index])
        _set_constant(consumer, cut.input_index, _consumer_weight(reduction.weight, original, cut), graph, label)
        bias = bias_input(consumer)
        if bias is not None and np.any(reduction.bias_delta):
            node, index, factor = bias
            delta = reduction.bias_delta * factor
            old = constant_array(node.inputs[index])
            _set_constant(node, index, (old + delta.reshape(old.shape)).astype(old.dtype), graph, label)
        for entry in group.shapes:
            node = nodes[entry.node]
            shape = constant_array(node.inputs[entry.input_index]).copy()
            shape.reshape(-1)[entry.position] = entry.per_unit * k
            _set_constant(node, entry.input_index, shape, graph, label)
        _forget_shapes(graph, group)
        logger.info("%s: %d -> %d units", group.name, group.width, k)
        return True


def _forget_shapes(graph: ir.Graph, group: Group) -> None:
    """The group's tensors carry the old width in their recorded shapes: drop them; onnxruntime infers
    the new ones at load time."""
    names = set(group.values)
    for node in graph:
        for out in node.outputs:
            if out.name in names:
                out.shape = None


def moment_offer(groups: list[Group], all_groups: list[Group], problems: dict[str, UnitProblem], selector: str,
                 ridge: float, progress: bool = False) -> Offer:
    """Every width k = d..1 of every group as a candidate: bytes of its producer and consumer slices at k,
    predicted error the consumer's relative output error after a least-squares refit of k units (the
    selectors' error curve, computed when first asked for)."""
    sites, candidates = [], {}
    for g in groups:
        problem = problems[g.name]
        unit_bytes = g.params / g.width * problem.out_weight.dtype.itemsize
        sites.append(Site(g.name, "group", (g.width,), round(g.params * problem.out_weight.dtype.itemsize)))
        candidates[g.name] = [Candidate(g.name, "moment", f"{selector} k={k}", round(unit_bytes * k),
                                        partial(_curve_error, problem, k), known(k)) for k in range(g.width, 0, -1)]

    def rewrite(chosen: Mapping[str, Candidate]) -> MomentReductionPass:
        widths = {g.name: chosen[g.name].payload() if g.name in chosen else g.width for g in groups}
        return MomentReductionPass(make_plan(groups, widths, "moment", selector, ridge), all_groups, problems, progress)

    return Offer("moment", sites, candidates, rewrite)


def _curve_error(problem: UnitProblem, k: int) -> float:
    return float(problem.curve.relative_error[k])
