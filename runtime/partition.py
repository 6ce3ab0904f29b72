"""Hybrid partitions: a compressed graph cut into standard segments, which onnxruntime runs, and packed nodes, which
the runtime's kernels run with their codes still packed on the device. Analysis only: the plan is printable data.

A node is packed when a kernel rule matches it (ternary and hyperfunction readers, whose decode nodes belong to no
segment; MatMulNBits) or when it is a low-bit contrib op, but not where the standard provider runs that op at its bit
width itself (`Capabilities`). Phases, as soon as possible: a standard node's phase is the latest of its standard producers' and
one past its packed producers'; a packed node's is the latest of all its producers'. Phase k runs standard segment
k, then its packed nodes in graph order, so only a chain standard -> packed -> standard adds segments, not parallel
branches (an attention layer's Q, K and V projections share one phase).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.runtime.kernels import Match, match_kernels, unneeded
from symshrink.runtime.ops import op_key
from symshrink.runtime.subgraph import node_reads

__all__ = ["LOW_BIT_OPS", "Capabilities", "Segment", "Plan", "Moves", "plan_partitions", "HOST", "DEVICE"]

HOST, DEVICE = "host", "device"
LOW_BIT_OPS = ("com.microsoft::MatMulNBits", "com.microsoft::GatherBlockQuantized")  # codes packed in bytes, `bits` wide


def _low_bit(node: ir.Node) -> bool:
    return op_key(node.domain, node.op_type) in LOW_BIT_OPS


@dataclass(frozen=True)
class Capabilities:
    """The bit widths of each low-bit op the standard provider runs with its codes packed (found by
    `hybrid.probe_capabilities`); any other op it runs as it is."""

    provider: str
    widths: Mapping[str, frozenset[int]]  # op key -> bits

    def runs(self, node: ir.Node) -> bool:
        key = op_key(node.domain, node.op_type)
        return not _low_bit(node) or node.attributes.get_int("bits", 4) in self.widths.get(key, frozenset())

    def line(self) -> str:
        widths = "; ".join(f"{key.split('::')[1]} {'/'.join(map(str, sorted(bits))) + '-bit' if bits else 'none'}"
                           for key, bits in sorted(self.widths.items()))
        return f"{self.provider} runs packed: {widths}"


@dataclass(frozen=True)
class Segment:
    """Nodes of one kind run together: `inputs` are values made elsewhere (graph inputs, earlier segments),
    `outputs` values later segments or the graph outputs read."""

    kind: str  # "standard" or "packed"
    phase: int
    nodes: tuple[ir.Node, ...]  # graph order; packed: the kernels' readers and the low-bit ops
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernels: tuple[str, ...] = ()  # packed: what runs each node (a kernel name, or the op run as it is)


@dataclass(frozen=True)
class Moves:
    """Copies per run between host and device memory."""

    uploads: int
    downloads: int

    @property
    def total(self) -> int:
        return self.uploads + self.downloads


@dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    inputs: tuple[str, ...]  # the graph's inputs that feeds give
    outputs: tuple[str, ...]
    matches: Mapping[int, Match]  # kernel fusions by id of their reader
    dropped: frozenset[int]  # ids of the nodes no segment runs (decodes and Transposes a kernel replaces)
    capabilities: Capabilities

    def count(self, kind: str) -> int:
        return sum(1 for s in self.segments if s.kind == kind)

    def homes(self, standard: str, packed: str) -> dict[str, str]:
        """Where each value crossing a segment boundary is made: graph inputs on the host, others where their
        segment's engine keeps its results."""
        homes = dict.fromkeys(self.inputs, HOST)
        for segment in self.segments:
            homes.update(dict.fromkeys(segment.outputs, standard if segment.kind == "standard" else packed))
        return homes

    def moves(self, standard: str, packed: str) -> Moves:
        """The copies a run makes when standard segments keep their values in `standard` memory and packed ones in
        `packed` (HOST or DEVICE): one per value and memory that reads it away from home, the outputs read on the
        host."""
        homes = self.homes(standard, packed)
        reads = {(name, standard if s.kind == "standard" else packed) for s in self.segments for name in s.inputs}
        reads |= {(name, HOST) for name in self.outputs}
        moved = Counter(place for name, place in reads if name in homes and homes[name] != place)
        return Moves(moved[DEVICE], moved[HOST])

    def lines(self) -> list[str]:
        kernels = Counter(k for s in self.segments for k in s.kernels)
        packed = ", ".join(f"{n} x {name}" for name, n in sorted(kernels.items())) or "none"
        standard_nodes = sum(len(s.nodes) for s in self.segments if s.kind == "standard")
        return [f"partitions: {self.count('standard')} standard ({standard_nodes} nodes, {self.capabilities.provider}), "
                f"{self.count('packed')} packed ({packed}); {len(self.dropped)} decode nodes replaced",
                self.capabilities.line()]


def _constants(graph: ir.Graph) -> dict[str, np.ndarray]:
    """The arrays the kernel rules read: initializers and the values of Constant nodes holding a tensor."""
    constants = {name: v.const_value.numpy() for name, v in graph.initializers.items() if v.const_value is not None}
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in node.attributes:
            constants[node.outputs[0].name] = node.attributes["value"].as_tensor().numpy()
    return constants


def _live(nodes: list[ir.Node], reads: dict[int, set[str]], outputs: set[str]) -> list[ir.Node]:
    """The nodes a graph output depends on (graph order): a segment of dead nodes would hand on nothing."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(v.name in needed for v in node.outputs):
            live.append(node)
            needed |= reads[id(node)]
    return live[::-1]


def plan_partitions(model: ir.Model, capabilities: Capabilities) -> Plan:
    graph = model.graph
    # a low-bit op the provider runs packed stays there, with its inputs
    fused = {id(m.reader): m for m in match_kernels(graph, _constants(graph))
             if not (_low_bit(m.reader) and capabilities.runs(m.reader))}
    dropped = unneeded(list(fused.values()), graph)
    initializers = set(graph.initializers)
    taken = {id(m.reader): {m.reader.inputs[i].name for node, i in m.taken if node is m.reader} for m in fused.values()}
    reads = {id(node): node_reads(node) - initializers - taken.get(id(node), set()) for node in graph}
    nodes = _live([node for node in graph if id(node) not in dropped], reads, {v.name for v in graph.outputs})
    producer: dict[str, ir.Node] = {}
    phase: dict[int, int] = {}
    packed: dict[int, str] = {}  # id -> what runs it
    for node in nodes:
        if id(node) in fused:
            packed[id(node)] = fused[id(node)].kernel
        elif not capabilities.runs(node):
            packed[id(node)] = f"{node.op_type} {node.attributes.get_int('bits', 4)}-bit"
        before = [producer[name] for name in reads[id(node)] if name in producer]
        is_packed = id(node) in packed
        phase[id(node)] = max((phase[id(p)] + (id(p) in packed and not is_packed) for p in before), default=0)
        producer.update((v.name, node) for v in node.outputs)
    groups: dict[tuple[int, str], list[ir.Node]] = {}  # (phase, kind) -> nodes in graph order
    for node in nodes:
        groups.setdefault((phase[id(node)], "packed" if id(node) in packed else "standard"), []).append(node)
    order = sorted(groups, key=lambda key: (key[0], key[1] == "packed"))  # a phase's standard segment, then packed
    outputs = tuple(v.name for v in graph.outputs)
    later, plan_segments = set(outputs), []  # later: what the segments after this one (and the outputs) read
    for k, kind in reversed(order):
        members = groups[k, kind]
        made = {v.name for n in members for v in n.outputs}
        read = set().union(*(reads[id(n)] for n in members))
        plan_segments.append(Segment(kind, k, tuple(members), tuple(sorted(read - made)), tuple(sorted(made & later)),
                                     tuple(packed[id(n)] for n in members) if kind == "packed" else ()))
        later |= read
    graph_inputs = tuple(v.name for v in graph.inputs if v.name not in initializers)
    return Plan(tuple(plan_segments[::-1]), graph_inputs, outputs, fused, frozenset(dropped), capabilities)
