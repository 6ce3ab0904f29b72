"""Weight sites: the constant matrices a weight codec may replace, read off the graph as plain data.

Every site is a y = x W product with x [..., K] an activation and W [K, N] a constant: MatMul's second
input, Gemm's B (transposed when transB = 1, scaled by alpha). An embedding table E [V, D] read by Gather
(axis 0) is a site too, W = E^T [D, V] (a lookup is x W for x one-hot): a `table` site, asked for apart,
since its input is token ids and has no second moment. A table also read as a tied head, y = x E^T through a
Transpose (SmolLM2's LM head), is one site, the head's, `tied` to the Gather: one set of codes serves both.
A Conv of weight [Cout, Cin / g, kh, kw] is a site W [kh kw Cin / g, Cout] read by the patches of its input maps
(`patch`: x is a patch, taps first), asked for apart. With g > 1 groups (depthwise convs) each column reads its own
group's patches: no one second moment serves them, so their codes are rounded to nearest, per output channel.
A registry of per-op handlers says how each op holds its weight, so codecs never switch on op types.
Analysis only: nothing is changed here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.passes.analysis.graph import attr, constant_array, constant_tensor, ensure_names, is_constant
from symshrink.runtime.formats import conv_matrix
from symshrink.runtime.subgraph import subgraphs

__all__ = ["Patch", "WeightSite", "find_weight_sites", "weight_matrix", "SITE_HANDLERS", "MIN_ELEMENTS"]

MIN_ELEMENTS = 4096  # smaller weights cost less than their codec's scales and an extra node


@dataclass(frozen=True)
class Patch:
    """The patches a Conv multiplies its weight by: kh x kw taps of its input maps, `strides` apart, over the maps
    padded by `pads` (ONNX order: top, left, bottom, right), `dilations` between taps."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv, stride 1, no pads: a MatMul over the channels at every pixel."""
        return self == Patch((1, 1))

    def __str__(self) -> str:
        return (f"k{self.kernel[0]}x{self.kernel[1]} s{self.strides[0]}x{self.strides[1]} "
                f"p{'.'.join(map(str, self.pads))} d{self.dilations[0]}x{self.dilations[1]}")


@dataclass(frozen=True)
class WeightSite:
    """Node `node` multiplies activation `activation` [..., rows] by constant `weight` ([rows, cols] as
    x W; stored [cols, rows] when `transposed`) times `alpha`."""

    node: str
    op: str
    weight: str
    activation: str
    rows: int
    cols: int
    transposed: bool = False
    alpha: float = 1.0
    weight_input: int = 1  # the node's input holding the weight
    tied: str | None = None  # a head x E^T: the Gather node that looks up rows of the same table E
    patch: Patch | None = None  # a Conv: the patches of its input that its weight multiplies
    groups: int = 1  # a grouped Conv: rows are one group's patch, each column reads its own group's

    @property
    def elements(self) -> int:
        return self.rows * self.cols

    @property
    def data_input(self) -> int:
        """The node's input holding the activation (a table: the ids)."""
        return 1 - self.weight_input

    @property
    def statistic(self) -> str | None:
        """The name of the input rows whose moments the site's codes see: the activation, or its conv patches (None:
        no one second moment serves the site, `moments`)."""
        if not self.moments:
            return None
        return self.activation if self.patch is None else f"{self.activation} {self.patch}"

    @property
    def moments(self) -> bool:
        """Whether one second moment of its input rows serves every column (not for ids, nor grouped convs)."""
        return not self.table and self.groups == 1

    @property
    def table(self) -> bool:
        """A lookup table (Gather): its input is indices, not an activation with moments."""
        return self.op == "Gather"


def _matmul_site(node: ir.Node) -> WeightSite | str:
    data, weight = node.inputs[0], node.inputs[1]
    shape = constant_tensor(weight).shape if is_constant(weight) else None
    if shape is None or len(shape) != 2:
        return "second input is not a constant matrix"
    if is_constant(data):
        return "both inputs are constants"
    return WeightSite(node.name, node.op_type, weight.name, data.name, int(shape[0]), int(shape[1]))


def _gemm_site(node: ir.Node) -> WeightSite | str:
    if attr(node, "transA", 0):
        return "Gemm with transA = 1"
    data, weight = node.inputs[0], node.inputs[1]
    if not is_constant(weight) or is_constant(data):
        return "B is not a constant or A is"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None or bias.size != constant_tensor(weight).shape[1 - attr(node, "transB", 0)]:
            return "C is not a constant per-output vector"
    rows, cols = constant_tensor(weight).shape
    transposed = bool(attr(node, "transB", 0))
    if transposed:
        rows, cols = cols, rows
    return WeightSite(node.name, node.op_type, weight.name, data.name, int(rows), int(cols), transposed,
                      float(attr(node, "alpha", 1.0)))


def _gather_site(node: ir.Node) -> WeightSite | str | None:
    table, indices = node.inputs[0], node.inputs[1]
    tensor = constant_tensor(table) if is_constant(table) else None
    if tensor is None or len(tensor.shape) != 2 or not tensor.dtype.is_floating_point():
        return None  # a Gather of activations, shapes or integer tables: no weights, nothing to report
    shape = tensor.shape
    if attr(node, "axis", 0) not in (0, -2):
        return "Gather along the table's columns"
    if is_constant(indices):
        return "both inputs are constants"
    return WeightSite(node.name, node.op_type, table.name, indices.name, int(shape[1]), int(shape[0]), True,
                      weight_input=0)


def _conv_site(node: ir.Node) -> WeightSite | str | None:
    data, weight = node.inputs[0], node.inputs[1]
    tensor = constant_tensor(weight) if is_constant(weight) else None
    if tensor is None or not tensor.dtype.is_floating_point():
        return None  # weights computed in the graph: nothing to code
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) != 4:
        return f"{len(shape) - 2}-D convolution (2-D only)"
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"auto_pad={attr(node, 'auto_pad', 'NOTSET')} (explicit pads only)"
    if is_constant(data):
        return "both inputs are constants"
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
        return "its bias is not a constant"
    kernel = shape[2:]
    patch = Patch(kernel, tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "pads", [0, 0, 0, 0])),
                  tuple(attr(node, "dilations", [1, 1])))
    return WeightSite(node.name, node.op_type, weight.name, data.name, shape[1] * kernel[0] * kernel[1], shape[0],
                      patch=patch, groups=int(attr(node, "group", 1)))


# op -> handler(node) answering with the node's weight site, or why it has none (None: nothing to say)
SITE_HANDLERS: dict[str, Callable[[ir.Node], WeightSite | str | None]] = {"MatMul": _matmul_site, "Gemm": _gemm_site,
                                                                   "Gather": _gather_site, "Conv": _conv_site}


def _tied_heads(model: ir.Model) -> dict[str, WeightSite]:
    """Head node -> its tied site, for each table read by exactly one Gather and one MatMul(x, Transpose(E))."""
    heads = {}
    for gather in model.graph:
        site = _gather_site(gather) if gather.op_type == "Gather" and gather.domain in ("", "ai.onnx") else None
        if not isinstance(site, WeightSite):
            continue
        others = [user for user, _ in gather.inputs[0].uses() if user is not gather]
        if len(others) != 1 or others[0].op_type != "Transpose" or list(attr(others[0], "perm", [1, 0])) != [1, 0]:
            continue
        readers = others[0].outputs[0].uses()
        head = readers[0][0] if len(readers) == 1 else None
        if head is None or head.op_type != "MatMul" or readers[0][1] != 1 or is_constant(head.inputs[0]):
            continue
        heads[head.name] = WeightSite(head.name, head.op_type, site.weight, head.inputs[0].name, site.rows, site.cols,
                                      True, tied=gather.name)
    return heads


def find_weight_sites(model: ir.Model, exclude: Sequence[str] = (), min_elements: int = MIN_ELEMENTS,
                      tables: bool = False, convs: bool = False) -> tuple[list[WeightSite], dict[str, str]]:
    """The graph's weight sites in graph order (with `tables`, the Gather tables and tied heads too; with `convs`,
    the Conv weights), and the nodes passed over (label -> why). `exclude` holds fnmatch patterns matched against
    node and weight names."""
    asked = {"Gather": tables, "Conv": convs}
    ensure_names(model.graph)
    heads = _tied_heads(model) if tables else {}
    tied_gathers = {site.tied: site.node for site in heads.values()}
    sites: list[WeightSite] = []
    passed: dict[str, str] = {}
    for node in model.graph:
        handler = SITE_HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None or not asked.get(node.op_type, True):
            continue
        if node.name in tied_gathers:
            passed[node.name] = f"table read with its tied head {tied_gathers[node.name]} (one site)"
            continue
        site = heads.get(node.name) or handler(node)
        if site is None:
            continue
        if isinstance(site, str):
            passed[node.name] = site
        elif any(fnmatch.fnmatchcase(name, p) for p in exclude for name in (site.node, site.weight, site.tied) if name):
            passed[node.name] = "excluded by --exclude"
        elif site.elements < min_elements:
            passed[node.name] = f"{site.rows}x{site.cols} weight is below {min_elements} elements"
        elif site.tied is None and len(node.inputs[site.weight_input].uses()) > 1:
            passed[node.name] = f"weight {site.weight} is also read by other nodes (tied)"
        else:
            sites.append(site)
    for owner, inner in _subgraph_nodes(model.graph):
        if SITE_HANDLERS.get(inner.op_type) is not None and inner.domain in ("", "ai.onnx"):
            passed[inner.name or f"{inner.op_type} in {owner.name}"] = (
                f"inside the {owner.op_type} {owner.name}'s subgraph: weights in control-flow bodies stay fp32")
    return sites, passed


def _subgraph_nodes(graph: ir.Graph):
    """(the control-flow node owning it, node) for every node of every subgraph (If, Loop, Scan bodies), nested too."""
    for node in graph:
        for body in subgraphs(node):
            for inner in body:
                yield node, inner
            yield from _subgraph_nodes(body)


def weight_matrix(site: WeightSite, nodes: dict[str, ir.Node]) -> np.ndarray:
    """The site's effective [rows, cols] matrix (transposed and scaled as the op reads it; a tied head: the table
    its Gather reads, transposed; a Conv: `formats.conv_matrix`, rows tap-major)."""
    holder = nodes[site.tied].inputs[0] if site.tied else nodes[site.node].inputs[site.weight_input]
    array = constant_array(holder)
    if site.patch is not None:
        return conv_matrix(array)
    array = array.T if site.transposed else array
    return array * np.asarray(site.alpha, array.dtype) if site.alpha != 1.0 else array
