"""Kernels for compressed weights: each runs y = x @ W, x @ W^T or W[indices] with W still compressed on the device.

`RULES` is the registry of fusions: each looks at one node that reads a weight (MatMul, Gemm, Gather, a
TernaryMatMul call, onnxruntime's MatMulNBits) and returns a `Match`, or None. The nodes upstream of a reader that
only fused readers use (the decode, a Transpose) are skipped; one read by anything else still runs. A weight read by
several fused readers (a tied embedding and LM head) is held on the device once. `KERNELS` names each kernel's
numpy reference (the CPU backend runs it) and its CUDA version (CuPy backend), which have the same
signature: (x, weight) -> y.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.runtime.backend import Backend, cpu_backend
from symshrink.runtime.formats import CONTRIB_DOMAIN, FUNCTION_DOMAIN, HYPER_INPUTS, TERNARY_INPUTS, TERNARY_RADIXES
from symshrink.runtime.kernels import grid, hyper, ternary

__all__ = ["KernelStep", "Kernel", "KERNELS", "RULES", "Match", "plan_kernels", "match_kernels", "kernel_steps",
           "unneeded"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    reference: Callable  # numpy
    cuda: Callable  # CuPy, same signature


KERNELS = {"ternary_matmul": Kernel(grid.grid_matmul_reference, grid.grid_matmul_cuda),  # 2-bit grid, zero point 1
           "hyper_matmul": Kernel(hyper.hyper_matmul_reference, hyper.hyper_matmul_cuda),
           "hyper_matmul_t": Kernel(hyper.hyper_matmul_t_reference, hyper.hyper_matmul_t_cuda),
           "hyper_gather": Kernel(hyper.hyper_gather, hyper.hyper_gather),  # array code: the same on both
           **{name: Kernel(grid.grid_matmul_reference, grid.grid_matmul_cuda) for name in grid.GRID_KERNELS.values()}}

Weight = grid.GridWeight | hyper.HyperWeight


@dataclass(frozen=True)
class Match:
    kernel: str
    reader: ir.Node  # where the kernel runs; its first output is the kernel's
    taken: list[tuple[ir.Node, int]]  # the input slots (node, index) whose values it no longer needs; their
    # producers (the decode, a Transpose between) become unneeded if nothing else reads them
    x: str  # the input it takes at run time: the activation, or the gathered indices
    weight: Weight
    source: ir.Node  # the node whose constant inputs hold the weight (one device copy per source)
    bias: str | None = None  # Gemm's C, added to the kernel's output


@dataclass
class KernelStep:
    """One fused kernel call at `match.reader`: outputs[0] = kernel(inputs[0], weight) (+ inputs[1])."""

    match: Match
    inputs: list[str]
    outputs: list[str]
    weight: Weight  # on the device
    call: Callable

    @property
    def kernel(self) -> str:
        return self.match.kernel

    def run(self, x, bias=None):
        y = self.call(x, self.weight)
        return y if bias is None else y + bias


def _is(node: ir.Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain in ((domain,) if domain else ("", "ai.onnx"))


def ternary_function_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """`ai.symshrink.TernaryMatMul` (base 4) or `TernaryMatMulBase3` with constant codes."""
    radix = TERNARY_RADIXES.get(node.op_type)
    if node.domain != FUNCTION_DOMAIN or radix is None:
        return None
    arrays = {key: constants.get(v.name) for key, v in zip(TERNARY_INPUTS[1:], node.inputs[1:])}
    if any(a is None for a in arrays.values()):
        return None
    return Match("ternary_matmul", node, [], node.inputs[0].name, ternary.function_weight(arrays, radix), node)


def dequantize_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """MatMul(x, DequantizeLinear(q uint2 [K, N], scale, zero point 1)): per column or blocked along K."""
    dequantize = node.inputs[1].producer() if _is(node, "MatMul") else None
    if not _is(dequantize, "DequantizeLinear") or len(dequantize.inputs) < 3:
        return None
    q, scale, zero_point = (constants.get(v.name) if v is not None else None for v in dequantize.inputs[:3])
    if q is None or scale is None or zero_point is None or q.dtype.name != "uint2" or q.ndim != 2:
        return None
    if scale.dtype != np.float32 or dequantize.attributes.get_int("output_dtype", 0) not in (0, ir.DataType.FLOAT):
        return None  # the kernel computes in float32 and returns float32
    codes = q.astype(np.int8) - 1
    if not np.all(zero_point.astype(np.int8) == 1) or codes.max(initial=0) > 1:
        return None
    depth, cols = q.shape
    block = dequantize.attributes.get_int("block_size", 0)
    axis = dequantize.attributes.get_int("axis", 1) % 2
    if block and axis == 0 and scale.shape == (-(-depth // block), cols):
        scales = scale
    elif not block and scale.size == cols and (axis == 1 or cols == 1):
        scales, block = scale.reshape(1, cols), depth
    else:
        return None
    weight = ternary.ternary_weight(codes, scales, block)
    return Match("ternary_matmul", node, [(node, 1)], node.inputs[0].name, weight, dequantize)


def _hyper_source(value: ir.Value | None, constants: dict[str, np.ndarray]):
    """(HyperDecode node, its weight, transposed, nodes between) behind a weight input, through at most one
    Transpose of a matrix; None when there is none or the kernels cannot take it."""
    producer = value.producer() if value is not None else None
    between, transposed = [], False
    if _is(producer, "Transpose") and producer.attributes.get_ints("perm", [1, 0]) == [1, 0]:
        between, transposed = [producer], True
        producer = producer.inputs[0].producer()
    if not (_is(producer, "HyperDecode", FUNCTION_DOMAIN) or _is(producer, "HyperDecodeGrouped", FUNCTION_DOMAIN)):
        return None
    arrays = {key: constants.get(v.name) for key, v in zip(HYPER_INPUTS[producer.op_type], producer.inputs)}
    if any(a is None for a in arrays.values()):
        return None
    reason = hyper.fusable(arrays)
    if reason:
        logger.debug("%s: not fused: %s", producer.name, reason)
        return None
    return producer, hyper.function_weight(arrays), transposed, between


def hyper_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """MatMul(x, W) or MatMul(x, Transpose(W)), Gemm(x, W, C) with transB (alpha = beta = 1, transA = 0), and
    Gather(W, indices) on axis 0, for W = HyperDecode(...) or HyperDecodeGrouped(...) (groups of a multiple of
    8 pairs), in pairs, rows a multiple of 16 long."""
    if _is(node, "Gather") and node.attributes.get_int("axis", 0) == 0:
        found = _hyper_source(node.inputs[0], constants)
        if found is None or found[2]:
            return None
        return Match("hyper_gather", node, [(node, 0)], node.inputs[1].name, found[1], found[0])
    bias, flip = None, False
    if _is(node, "Gemm"):
        attributes = node.attributes
        if attributes.get_float("alpha", 1.0) != 1.0 or attributes.get_float("beta", 1.0) != 1.0 \
                or attributes.get_int("transA", 0):
            return None
        flip = bool(attributes.get_int("transB", 0))
        bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2] is not None else None
    elif not _is(node, "MatMul"):
        return None
    found = _hyper_source(node.inputs[1], constants)
    if found is None:
        return None
    decode, weight, transposed, between = found
    kernel = "hyper_matmul_t" if transposed != flip else "hyper_matmul"
    taken = [(node, 1)] + [(transpose, 0) for transpose in between]
    return Match(kernel, node, taken, node.inputs[0].name, weight, decode, bias)


def matmul_nbits_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """onnxruntime's MatMulNBits (y = a @ B^T + bias) with constant codes, float32 scales and, if any, packed uint8
    zero points, 2, 4 or 8 bits, no g_idx."""
    if not _is(node, "MatMulNBits", CONTRIB_DOMAIN):
        return None
    values = [v.name if v is not None else None for v in node.inputs] + [None] * (6 - len(node.inputs))
    b, scales = constants.get(values[1]), constants.get(values[2])
    zero_points = constants.get(values[3]) if values[3] else None
    k, n, bits, block = (node.attributes.get_int(key, default) for key, default in
                         (("K", 0), ("N", 0), ("bits", 4), ("block_size", 0)))
    if b is None or scales is None or scales.dtype != np.float32 or values[4] or bits not in grid.GRID_KERNELS:
        return None
    if (values[3] and zero_points is None) or (zero_points is not None and zero_points.dtype != np.uint8):
        return None
    blocks = -(-k // block) if block > 0 else 0
    if not blocks or b.size != n * blocks * block * bits // 8 or scales.size != n * blocks or (
            zero_points is not None and zero_points.size != n * -(-blocks * bits // 8)):
        return None  # not the layout the schema describes: the op says why when it runs
    weight = grid.matmul_nbits_weight(b, scales, zero_points, k, n, bits, block)
    return Match(weight.kernel, node, [(node, 1)], values[0], weight, node, values[5])


RULES: list[Callable[[ir.Node, dict[str, np.ndarray]], Match | None]] = [ternary_function_rule, dequantize_rule,
                                                                          hyper_rule, matmul_nbits_rule]


def unneeded(matches: list[Match], graph) -> set[int]:
    """Ids of replaced nodes none of whose outputs is still read: every use is a slot a match took, at a
    fused reader or at another unneeded node (a Transpose between)."""
    readers = {id(m.reader) for m in matches}
    taken = {(id(node), index) for m in matches for node, index in m.taken}
    order = {id(node): i for i, node in enumerate(graph)}
    producers = (node.inputs[index].producer() for m in matches for node, index in m.taken)
    candidates = {id(n): n for n in producers if n is not None}
    dropped: set[int] = set()

    def gone(use) -> bool:
        return (id(use.node), use.idx) in taken and (id(use.node) in readers or id(use.node) in dropped)

    for node in sorted(candidates.values(), key=lambda n: -order[id(n)]):  # readers before what they read
        if all(not out.is_graph_output() and all(gone(use) for use in out.uses()) for out in node.outputs):
            dropped.add(id(node))
    return dropped


def match_kernels(graph, constants: dict[str, np.ndarray]) -> list[Match]:
    """The fusions `RULES` find in `graph`, in graph order (`unneeded` says which nodes they replace)."""
    matches = []
    for node in graph:
        match = next((m for m in (rule(node, constants) for rule in RULES) if m is not None), None)
        if match is not None:
            matches.append(match)
    return matches


def kernel_steps(matches: list[Match], backend: Backend) -> dict[int, KernelStep]:
    """Kernel steps by id of the node where each runs, weights placed on the backend's device (one copy per source:
    a tied table and head share theirs)."""
    on_gpu = backend.name == "cuda"
    placement = backend if on_gpu else cpu_backend()  # the references (every backend but CUDA) read host arrays
    placed: dict[int, Weight] = {}
    tables: dict = {}
    steps = {}
    for match in matches:
        if id(match.source) not in placed:
            placed[id(match.source)] = match.weight.to(placement, tables)
        kernel = KERNELS[match.kernel]
        inputs = [match.x] + ([match.bias] if match.bias else [])
        steps[id(match.reader)] = KernelStep(match, inputs, [match.reader.outputs[0].name], placed[id(match.source)],
                                             kernel.cuda if on_gpu else _reference_on(backend, kernel.reference))
    return steps


def _reference_on(backend: Backend, reference: Callable) -> Callable:
    """The reference as a kernel of `backend`: on a stand-in device (tests), its result goes back to the device as a
    device kernel's would."""
    if backend.name == "cpu":
        return reference
    return lambda x, weight: backend.to_device(reference(x, weight))


def plan_kernels(graph, constants: dict[str, np.ndarray], backend: Backend) -> tuple[dict[int, KernelStep], set[int]]:
    """Kernel steps by id of the node where each runs (`kernel_steps`), and the ids of the nodes they make unneeded."""
    matches = match_kernels(graph, constants)
    return kernel_steps(matches, backend), unneeded(matches, graph)
