"""Find permutation-symmetric groups: sets of units whose order does not change the function.

FFN / conv groups: a producer (MatMul, Gemm, Conv) makes a unit axis, per-unit ops act on each unit
alone, consumers (MatMul, Gemm, Conv) sum over it; any other reader of the group's tensors couples the
units to the rest of the graph and the candidate is rejected with that reason. Attention groups:
heads between the Q/K/V projections and the output projection. Analysis returns plain data only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import attr, constant_array, constant_tensor, ensure_names, is_constant, node_label
from symshrink.passes.analysis.handlers import CONSUMERS, PASSTHROUGH, PRODUCERS, Cut, Fit, ShapeEntry

__all__ = ["Group", "analyse", "find_unit_groups", "find_attention_groups"]

logger = logging.getLogger(__name__)


@dataclass
class Group:
    """One symmetric group (or a rejected candidate, `reason` set). Plain, JSON-serialisable data."""

    name: str
    kind: str  # "ffn", "swiglu", "conv", "heads"
    width: int  # number of units (heads for "heads")
    params: int  # weights in the slices that belong to the units
    where: str  # the producer node(s)
    producers: list[Cut] = field(default_factory=list)
    passthrough: list[Cut] = field(default_factory=list)
    consumers: list[Cut] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)  # per-unit op types, in walk order
    probe: str = ""  # the value the consumers read: the unit activations
    values: list[str] = field(default_factory=list)  # every tensor that carries the unit axis
    shapes: list[ShapeEntry] = field(default_factory=list)  # shape constants that count the units
    reason: str = ""  # empty when the group is usable
    detail: dict = field(default_factory=dict)  # kind-specific facts, e.g. head_dim, kv_heads

    @property
    def ok(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict:
        return asdict(self)


def _node_by_name(graph: ir.Graph) -> dict[str, ir.Node]:
    return {node.name: node for node in graph}


def _cut_params(nodes: dict[str, ir.Node], cuts: Iterable[Cut]) -> int:
    return sum(int(np.prod(constant_tensor(nodes[c.node].inputs[c.input_index]).shape)) for c in cuts)


class _Walk:
    """Grows one candidate group from a producer through per-unit ops to its consumers."""

    def __init__(self, graph: ir.Graph, start: ir.Node, fit: Fit):
        self.graph = graph
        self.unit_axis = fit.unit_axis
        self.width = fit.width
        self.producers: list[ir.Node] = [start]
        self.cuts_producers = list(fit.cuts)
        self.cuts_passthrough: list[Cut] = []
        self.cuts_consumers: list[Cut] = []
        self.ops: list[str] = []
        self.region: set[ir.Value] = set(start.outputs[:1])
        self.consumer_inputs: set[ir.Value] = set()
        self.pending: dict[ir.Value, ir.Node] = {}  # joined tensors that must turn out to be in the group
        self.reason = ""

    def _check_width(self, fit: Fit, node: ir.Node) -> bool:
        if fit.width is not None and fit.width != self.width:
            self.reason = f"{node_label(node)} has width {fit.width}, expected {self.width}"
            return False
        return True

    def _try_second_root(self, value: ir.Value, node: ir.Node) -> bool:
        """A binary op joins another tensor: accept it when a producer of the same width makes it
        (the SwiGLU form gate * up), otherwise the op mixes the group with something else."""
        producer = value.producer()
        handler = PRODUCERS.get(producer.op_type) if producer is not None else None
        fit = handler(producer, -1, -1) if handler else "not a producer"
        if isinstance(fit, str) or fit.unit_axis != self.unit_axis or fit.width != self.width:
            # maybe a later per-unit op of this group makes it (x * erf(x) in GELU): check at the end
            self.pending[value] = node
            return True
        if len(value.uses()) != 1:
            self.reason = f"{value.name!r} (second producer) has other readers"
            return False
        self.producers.append(producer)
        self.cuts_producers.extend(fit.cuts)
        self.region.add(value)
        return True

    def run(self) -> None:
        queue = list(self.region)
        while queue and not self.reason:
            value = queue.pop(0)
            if value.is_graph_output():
                self.reason = f"{value.name!r} is a graph output"
                return
            if not value.uses():
                self.reason = f"{value.name!r} has no readers"
                return
            for use in value.uses():
                if not self._visit(use.node, use.idx, value, queue):
                    return
        outside = [(v, n) for v, n in self.pending.items() if v not in self.region]
        if outside and not self.reason:
            value, node = outside[0]
            self.reason = f"{node_label(node)} mixes the group with {value.name!r}"

    def _visit(self, node: ir.Node, index: int, value: ir.Value, queue: list) -> bool:
        consumer = CONSUMERS.get(node.op_type)
        fit = consumer(node, index, self.unit_axis) if consumer else None
        if isinstance(fit, Fit):
            if not self._check_width(fit, node):
                return False
            if node.name not in {c.node for c in self.cuts_consumers}:
                self.cuts_consumers.extend(fit.cuts)
            self.consumer_inputs.add(value)
            return True
        passthrough = PASSTHROUGH.get(node.op_type)
        step = passthrough(node, index, self.unit_axis) if passthrough else None
        if not isinstance(step, Fit):
            why = step or fit or "it is not a per-unit op"
            self.reason = f"{value.name!r} is read by {node.op_type} {node_label(node)}: {why}"
            return False
        if not self._check_width(step, node):
            return False
        for other in node.inputs:
            if other is None or other in self.region or is_constant(other):
                continue
            if not self._try_second_root(other, node):
                return False
            if other in self.region:
                queue.append(other)
        if node.op_type not in self.ops or node.outputs[0] not in self.region:
            self.ops.append(node.op_type)
        self.cuts_passthrough.extend(c for c in step.cuts if c not in self.cuts_passthrough)
        for out in node.outputs[:1]:
            if out not in self.region:
                self.region.add(out)
                queue.append(out)
        return True


def _unit_group(walk: _Walk, nodes: dict[str, ir.Node]) -> Group:
    producer_ops = {p.op_type for p in walk.producers}
    kind = "conv" if producer_ops == {"Conv"} else ("swiglu" if len(walk.producers) == 2 else "ffn")
    where = " + ".join(node_label(p) for p in walk.producers)
    reason = walk.reason
    if not reason and not walk.cuts_consumers:
        reason = "no consumer sums over the units"
    if not reason and len(walk.consumer_inputs) != 1:
        reason = "consumers read different tensors of the group"
    cuts = walk.cuts_producers + walk.cuts_passthrough + (walk.cuts_consumers if not reason else [])
    return Group(
        name="",
        kind=kind,
        width=int(walk.width),
        params=_cut_params(nodes, cuts),
        where=where,
        producers=walk.cuts_producers,
        passthrough=walk.cuts_passthrough,
        consumers=walk.cuts_consumers if not reason else [],
        ops=walk.ops,
        probe=next(iter(walk.consumer_inputs)).name if len(walk.consumer_inputs) == 1 else "",
        values=sorted(v.name for v in walk.region),
        reason=reason,
    )


def find_unit_groups(graph: ir.Graph) -> list[Group]:
    """FFN, SwiGLU and conv-channel groups, plus each rejected producer with its reason."""
    nodes = _node_by_name(graph)
    groups: list[Group] = []
    claimed: set[str] = set()
    for node in graph:
        handler = PRODUCERS.get(node.op_type)
        if handler is None or node.name in claimed:
            continue
        fit = handler(node, -1, -1)
        if isinstance(fit, str):
            continue  # not a weight layer (e.g. the scores MatMul of attention): not a candidate
        walk = _Walk(graph, node, fit)
        walk.run()
        group = _unit_group(walk, nodes)
        claimed.update(p.name for p in walk.producers)
        groups.append(group)
    return groups


# ---------------------------------------------------------------- attention heads
_THROUGH = {"Transpose", "Reshape", "Mul", "Div", "Add", "Sub", "Cast", "Identity", "Expand",
            "Unsqueeze", "Squeeze", "Concat", "Slice", "Neg", "Where"}


def _projection_behind(value: ir.Value, limit: int = 24) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from an attention operand to the constant-weight projection that makes it, through
    reshapes, transposes, scaling and rotary embedding ops. Returns (projection, ops passed)."""
    passed: list[ir.Node] = []
    frontier = [value]
    while frontier and len(passed) < limit:
        node = frontier.pop(0).producer()
        if node is None:
            continue
        if node.op_type in ("MatMul", "Gemm") and is_constant(node.inputs[1]):
            return node, passed
        if node.op_type not in _THROUGH:
            continue
        passed.append(node)
        # follow the data input first: the largest non-constant input
        frontier.extend(v for v in node.inputs if v is not None and not is_constant(v))
    return None, passed


def _shape_entries(value: ir.Value) -> list[int] | None:
    """A Reshape target shape with -1 for entries only known at run time (Concat of dims)."""
    shape = constant_array(value)
    if shape is not None:
        return [int(s) for s in shape.reshape(-1)]
    node = value.producer()
    if node is None or node.op_type != "Concat":
        return None
    entries: list[int] = []
    for part in node.inputs:
        array = constant_array(part)
        entries.extend([int(s) for s in array.reshape(-1)] if array is not None else [-1])
    return entries


def _heads_of(passed: list[ir.Node], out_width: int) -> tuple[int, int] | None:
    """(heads, head_dim) read off the shape of a Reshape that splits the projection into heads."""
    for node in passed:
        if node.op_type != "Reshape":
            continue
        shape = _shape_entries(node.inputs[1])
        if shape is None or len(shape) < 3:
            continue
        heads, head_dim = shape[-2], shape[-1]
        if heads > 0 and head_dim > 0 and heads * head_dim == out_width:
            return heads, head_dim
        if heads > 0 and head_dim <= 0 and out_width % heads == 0:
            return heads, out_width // heads
        if head_dim > 0 and heads <= 0 and out_width % head_dim == 0:
            return out_width // head_dim, head_dim
    return None


def _is_scalar(value: ir.Value) -> bool:
    """Rank 0 by its recorded shape, or a Gather of one dimension out of a Shape (x.size(i) in torch)."""
    if value.shape is not None:
        return value.shape.rank() == 0
    node = value.producer()
    index = constant_array(node.inputs[1]) if node is not None and node.op_type == "Gather" else None
    return index is not None and index.ndim == 0


def _shape_parts(reshape: ir.Node) -> list[tuple[str, int, int, int | None]] | str:
    """Each entry of a Reshape's target shape as (node, input index, flat position, constant value or
    None for a run-time dimension), for a constant shape or a Concat of constants and scalar dims."""
    shape = reshape.inputs[1]
    array = constant_array(shape)
    if array is not None:
        return [(reshape.name, 1, i, int(v)) for i, v in enumerate(array.reshape(-1))]
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return f"the shape of {node_label(reshape)} is not a constant or a Concat"
    parts = []
    for index, part in enumerate(node.inputs):
        part_array = constant_array(part)
        producer = part.producer()
        if part_array is not None:
            parts += [(node.name, index, i, int(v)) for i, v in enumerate(part_array.reshape(-1))]
        elif producer is not None and producer.op_type == "Unsqueeze" and _is_scalar(producer.inputs[0]):
            parts.append((node.name, index, 0, None))
        else:
            return f"the shape of {node_label(reshape)} has parts of unknown length"
    return parts


def _shape_entry(reshape: ir.Node, axis: int, width: int, parts=None) -> ShapeEntry | str | None:
    """The constant behind entry `axis` of a Reshape's target shape, as a ShapeEntry when it counts
    `width` units; None when the entry is a run-time dimension or -1 and needs no change."""
    parts = _shape_parts(reshape) if parts is None else parts
    if isinstance(parts, str):
        return parts
    owner, index, position, value = parts[axis]
    if value is None or value == -1:
        return None
    if value <= 0 or value % width:
        return f"entry {value} of the shape of {node_label(reshape)} does not count the {width} heads"
    return ShapeEntry(owner, index, position, value // width)


def _merge_shapes(context: ir.Node, wo: ir.Node, heads: int) -> list[ShapeEntry | str | None]:
    """Shape entries on the way from the per-head context [.., heads, seq, head_dim] to the output
    projection. The head axis is followed through Transposes; a Reshape that keeps the rank keeps it
    where it was, one that merges puts heads * head_dim last."""
    entries: list[ShapeEntry | str | None] = []
    value, axis, rank = context.outputs[0], -3, 4
    while (node := next(u.node for u in value.uses() if u.node.op_type != "Shape")) is not wo:
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None)
            perm = list(perm) if perm is not None else list(range(rank))[::-1]  # ONNX default: reverse the axes
            axis = perm.index(axis % rank) - rank
        elif node.op_type == "Reshape":
            parts = _shape_parts(node)
            if isinstance(parts, str):
                return [parts]
            merged = len(parts) < rank
            rank = len(parts)
            axis = -1 if merged else axis
            entries.append(_shape_entry(node, axis, heads, parts))
        value = node.outputs[0]
    return entries


def _forward_region(starts: list[ir.Node], stop: ir.Node, limit: int = 400) -> list[str]:
    """Names of the values computed between the projections and the output projection."""
    seen: set[str] = set()
    frontier = [v for node in starts for v in node.outputs]
    while frontier and len(seen) < limit:
        value = frontier.pop()
        if value.name in seen:
            continue
        seen.add(value.name)
        frontier.extend(out for use in value.uses() if use.node is not stop for out in use.node.outputs)
    return sorted(seen)


def _out_width(node: ir.Node) -> int:
    w = constant_array(node.inputs[1])
    return int(w.shape[0] if node.op_type == "Gemm" and node.attributes.get("transB") else w.shape[1])


def _output_projection(value: ir.Value, limit: int = 8) -> ir.Node | None:
    """From the per-head context (softmax(QK^T) V) forward through Transpose/Reshape to Wo."""
    for _ in range(limit):
        uses = [u for u in value.uses() if u.node.op_type != "Shape"]  # shape reads do not see values
        if len(uses) != 1:
            return None
        node = uses[0].node
        if node.op_type in ("MatMul", "Gemm") and uses[0].idx == 0 and is_constant(node.inputs[1]):
            return node
        if node.op_type not in ("Transpose", "Reshape", "Identity"):
            return None
        value = node.outputs[0]
    return None


def _context_matmul(softmax: ir.Node, limit: int = 4) -> ir.Node | None:
    """The MatMul of the attention weights with V, past a NaN guard (IsNaN/Where) or a Cast."""
    value = softmax.outputs[0]
    for _ in range(limit):
        uses = value.uses()
        matmul = next((u.node for u in uses if u.node.op_type == "MatMul" and u.idx == 0), None)
        if matmul is not None:
            return matmul
        passing = [u.node for u in uses if u.node.op_type in ("Where", "Cast", "Identity", "Dropout")]
        if len(passing) != 1:
            return None
        value = passing[0].outputs[0]
    return None


def _attention_group(softmax: ir.Node, nodes: dict[str, ir.Node]) -> Group | None:
    scores_node = None
    frontier = [softmax.inputs[0]]
    while frontier:
        node = frontier.pop(0).producer()
        if node is None:
            continue
        if node.op_type == "MatMul" and not is_constant(node.inputs[1]):
            scores_node = node
            break
        if node.op_type in ("Add", "Mul", "Div", "Sub", "Where", "Cast"):
            frontier.extend(v for v in node.inputs if v is not None and not is_constant(v))
    context = _context_matmul(softmax)
    if scores_node is None or context is None:
        return None
    q, q_path = _projection_behind(scores_node.inputs[0])
    k, k_path = _projection_behind(scores_node.inputs[1])
    v, v_path = _projection_behind(context.inputs[1])
    wo = _output_projection(context.outputs[0])
    where = node_label(softmax)
    if q is None or k is None or v is None:
        return Group("", "heads", 0, 0, where, reason="could not trace the Q/K/V projections")
    q_heads = _heads_of(q_path, _out_width(q))
    kv_heads = _heads_of(v_path, _out_width(v))
    if q_heads is None or kv_heads is None:
        return Group("", "heads", 0, 0, where, reason="head count not readable from a constant Reshape")
    heads = q_heads[0]
    cuts_p = [Cut(n.name, 1, 0 if n.op_type == "Gemm" and n.attributes.get("transB") else 1) for n in (q, k, v)]
    reason = "" if wo is not None else "the heads' context does not reach a constant output projection"
    if not reason and kv_heads[0] != heads:
        reason = "grouped-query attention: removing whole KV groups is not implemented"
    cuts_c = [Cut(wo.name, 1, 0)] if wo is not None else []
    biases, shapes = [], []
    for projection, path in ((q, q_path), (k, k_path), (v, v_path)):
        for node in path:
            if node.op_type == "Add":
                for index, other in enumerate(node.inputs):
                    array = constant_array(other)
                    if array is not None and array.ndim == 1 and array.shape[0] == _out_width(projection):
                        biases.append(Cut(node.name, index, 0))
            if node.op_type == "Reshape":
                shapes.append(_shape_entry(node, -2, heads))
    if wo is not None:
        shapes += _merge_shapes(context, wo, heads)
    problems = [entry for entry in shapes if isinstance(entry, str)]
    reason = reason or (problems[0] if problems else "")
    return Group(
        name="",
        kind="heads",
        width=heads,
        params=_cut_params(nodes, cuts_p + biases + cuts_c),
        where=f"{node_label(q)} (+ k, v)",
        producers=cuts_p,
        passthrough=biases,
        consumers=cuts_c,
        ops=["Softmax"],
        probe=wo.inputs[0].name if wo is not None else context.outputs[0].name,
        values=_forward_region([q, k, v], wo) if wo is not None else [],
        shapes=[entry for entry in shapes if isinstance(entry, ShapeEntry)],
        reason=reason,
        detail={"head_dim": q_heads[1], "kv_heads": kv_heads[0], "grouped_query": kv_heads[0] != q_heads[0]},
    )


def find_attention_groups(graph: ir.Graph) -> list[Group]:
    nodes = _node_by_name(graph)
    found = (_attention_group(node, nodes) for node in graph if node.op_type == "Softmax")
    return [g for g in found if g is not None]


def analyse(model: ir.Model) -> list[Group]:
    """All symmetric groups of the main graph, usable ones first, each with a stable name."""
    ensure_names(model.graph)
    attention = find_attention_groups(model.graph)
    in_attention = {c.node for g in attention for c in g.producers + g.consumers}
    groups = []
    for group in find_unit_groups(model.graph):
        first = group.producers[0].node if group.producers else ""
        if group.reason and first in in_attention:
            group.reason = f"attention projection (heads group); {group.reason}"
        groups.append(group)
    ordered = sorted(attention + groups, key=lambda g: (not g.ok, g.kind == "heads"))
    counters: dict[str, int] = {}
    for group in ordered:
        key = group.kind if group.ok else "skip"
        group.name = f"{key}.{counters.get(key, 0)}"
        counters[key] = counters.get(key, 0) + 1
    logger.info("analysis: %d usable groups, %d rejected", sum(g.ok for g in ordered),
                sum(not g.ok for g in ordered))
    return ordered
