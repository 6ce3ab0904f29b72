"""Blocks: the graph cut into runs of nodes, in graph order, that can run one at a time.

After node i, the live values L_i are those made by nodes[:i] (or graph inputs) that nodes[i:] read or the graph
outputs; a block nodes[a:b] reads L_a and hands on L_b. Cuts are placed where few values are live (a transformer
layer's boundary carries the residual stream and its masks), each block's weights within `max_bytes` where one
node's allow. Values computed from weights alone (a tied head's transposed table) are never handed between blocks:
a block recomputes those it reads (its prelude). Analysis only: nothing is changed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir

from symshrink.runtime.subgraph import nested_reads, node_reads

__all__ = ["Block", "node_reads", "partition", "weight_bytes"]


@dataclass(frozen=True)
class Block:
    """Nodes `nodes` (graph order) read `inputs` (values live before them) and hand on `outputs` (values they make
    that later nodes or the graph outputs read); `carried` are values made before it and live after it (read by it
or not)."""

    nodes: tuple[ir.Node, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    carried: tuple[str, ...]
    weight_bytes: int
    prelude: tuple[ir.Node, ...] = ()  # nodes of earlier blocks computing constants it reads (a tied head's Transpose)

    @property
    def all_nodes(self) -> tuple[ir.Node, ...]:
        """The nodes its model runs: the prelude, then its own."""
        return (*self.prelude, *self.nodes)


def weight_bytes(node: ir.Node, initializers: dict[str, ir.Value]) -> int:
    """Bytes of the initializers a node reads (its subgraphs' too)."""
    return sum(initializers[name].const_value.nbytes for name in node_reads(node)
               if name in initializers and initializers[name].const_value is not None)


def _constants(nodes: Sequence[ir.Node], initializers: set[str], outputs: set[str]) -> dict[str, ir.Node]:
    """Values computed from initializers alone (not graph outputs), by their producing node."""
    known, producers = set(initializers), {}
    for node in nodes:
        inputs = [v for v in node.inputs if v is not None]
        constant = node.op_type == "Constant" or (inputs and all(v.name in known for v in inputs)
                                                  and not node.op_type.startswith("Random") and not nested_reads(node))
        if constant and not {v.name for v in node.outputs} & outputs:
            for value in node.outputs:
                known.add(value.name)
                producers[value.name] = node
    return producers


def partition(graph: ir.Graph, max_bytes: int) -> list[Block]:
    """The graph's nodes cut into blocks of at most `max_bytes` of weights (more when one node needs it): from each
    cut, the next is the position within that budget where the fewest values are live, the furthest of those."""
    nodes = list(graph)
    initializers = dict(graph.initializers)
    constants = _constants(nodes, set(initializers), {v.name for v in graph.outputs})
    reads = [node_reads(node) - set(initializers) - set(constants) for node in nodes]
    costs = [weight_bytes(node, initializers) for node in nodes]
    last_read = {v.name: len(nodes) for v in graph.outputs}
    for i, names in enumerate(reads):
        for name in names:
            last_read[name] = max(last_read.get(name, -1), i)
    made_at = {v.name: -1 for v in graph.inputs if v.name not in initializers}
    for i, node in enumerate(nodes):
        for value in node.outputs:
            if value.name not in constants:
                made_at.setdefault(value.name, i)
    live = _live_counts(len(nodes), made_at, last_read)
    cuts, start = [0], 0
    while start < len(nodes):
        end, spent = start + 1, costs[start]
        best = end
        while end < len(nodes) and spent + costs[end] <= max_bytes:
            spent += costs[end]
            end += 1
            if live[end] <= live[best]:
                best = end
        start = best if end < len(nodes) else len(nodes)
        cuts.append(start)
    order = {id(node): i for i, node in enumerate(nodes)}
    return [_block(nodes, reads, costs, a, b, made_at, last_read, _prelude(nodes[a:b], constants, order, initializers))
            for a, b in zip(cuts, cuts[1:])]


def _prelude(block: Sequence[ir.Node], constants: dict[str, ir.Node], order: dict[int, int],
             initializers: dict[str, ir.Value]) -> tuple[tuple[ir.Node, ...], int]:
    """The constant nodes of other blocks whose values `block` reads (and those they read), in graph order, and
    their weights' bytes."""
    inside = {id(node) for node in block}
    needed, stack = {}, [name for node in block for name in node_reads(node) if name in constants]
    while stack:
        producer = constants[stack.pop()]
        if id(producer) in inside or id(producer) in needed:
            continue
        needed[id(producer)] = producer
        stack += [name for name in node_reads(producer) if name in constants]
    prelude = tuple(sorted(needed.values(), key=lambda node: order[id(node)]))
    return prelude, sum(weight_bytes(node, initializers) for node in prelude)


def _live_counts(count: int, made_at: dict[str, int], last_read: dict[str, int]) -> list[int]:
    """live[i]: how many values are made before position i and read at or after it."""
    change = [0] * (count + 2)
    for name, made in made_at.items():
        last = last_read.get(name, made)
        if last > made:
            change[made + 1] += 1
            change[last + 1] -= 1
    live, running = [], 0
    for i in range(count + 1):
        running += change[i]
        live.append(running)
    return live


def _block(nodes: Sequence[ir.Node], reads: Sequence[set[str]], costs: Sequence[int], a: int, b: int,
           made_at: dict[str, int], last_read: dict[str, int], prelude: tuple[tuple[ir.Node, ...], int]) -> Block:
    read = set().union(*reads[a:b])
    inputs = sorted(name for name in read if made_at.get(name, -1) < a)
    outputs = sorted(name for node in nodes[a:b] for value in node.outputs
                     if (name := value.name) in made_at and last_read.get(name, -1) >= b)
    carried = sorted(name for name, made in made_at.items() if made < a and last_read.get(name, -1) >= b)
    return Block(tuple(nodes[a:b]), tuple(inputs), tuple(outputs), tuple(carried), sum(costs[a:b]) + prelude[1],
                 prelude[0])
