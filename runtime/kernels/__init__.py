"""Kernels for symshrink-domain weights: each runs y = x @ W (or W[indices]) with W still compressed on the
device.

`RULES` is the registry of fusions: each looks at one node (the MatMul or Gather, or a TernaryMatMul call) and
returns what it would replace, or None. `KERNELS` names each kernel's numpy reference (the CPU backend runs
it) and its CUDA version (CuPy backend), which have the same signature: (x, weight) -> y.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from symshrink.passes.graph import FUNCTION_DOMAIN
from symshrink.passes.hyper_function import INPUTS as HYPER_INPUTS
from symshrink.passes.ternary_function import INPUTS as TERNARY_INPUTS
from symshrink.runtime.backend import Backend
from symshrink.runtime.kernels import hyper, ternary

__all__ = ["KernelStep", "Kernel", "KERNELS", "RULES", "Match", "plan_kernels"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    reference: Callable  # numpy
    cuda: Callable  # CuPy, same signature


KERNELS = {"ternary_matmul": Kernel(ternary.ternary_matmul_reference, ternary.ternary_matmul_cuda),
           "hyper_matmul": Kernel(hyper.hyper_matmul_reference, hyper.hyper_matmul_cuda),
           "hyper_gather": Kernel(hyper.hyper_gather, hyper.hyper_gather)}  # array code: the same on both


@dataclass(frozen=True)
class Match:
    kernel: str
    nodes: list[ir.Node]  # replaced, in graph order; the kernel runs at the last one
    x: str  # the input it takes at run time: the activation (MatMul) or the indices (Gather)
    weight: ternary.TernaryWeight | hyper.HyperWeight


@dataclass
class KernelStep:
    """One fused kernel call standing for `nodes`: outputs[0] = kernel(inputs[0], weight)."""

    kernel: str
    nodes: list[ir.Node]
    inputs: list[str]
    outputs: list[str]
    weight: ternary.TernaryWeight | hyper.HyperWeight
    call: Callable

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def run(self, backend: Backend, x):
        return self.call(x, self.weight)


def _constants(node: ir.Node, names: tuple[str, ...], constants: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The node's inputs after the first as arrays by name, or None if one is not a constant."""
    arrays = {key: constants.get(v.name) if v is not None else None for key, v in zip(names, node.inputs[1:])}
    return None if any(a is None for a in arrays.values()) else arrays


WEIGHT_INPUT = {"MatMul": 1, "Gather": 0}  # where each fused reader takes the weight


def _producer_of_weight(node: ir.Node, op_type: str, domain: str = "") -> ir.Node | None:
    """The node making a MatMul's B (a Gather's data), if it is `op_type` and `node` is its only reader."""
    if node.op_type not in WEIGHT_INPUT or node.domain not in ("", "ai.onnx"):
        return None
    weight = node.inputs[WEIGHT_INPUT[node.op_type]]
    producer = weight.producer() if weight is not None else None
    if producer is None or producer.op_type != op_type or producer.domain != domain:
        return None
    if len(weight.uses()) != 1 or weight.is_graph_output():
        logger.debug("%s: %s output has other readers; not fused", node.name, op_type)
        return None
    return producer


def ternary_function_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """`ai.symshrink.TernaryMatMul` (base 4) or `TernaryMatMulBase3` with constant codes."""
    radix = {"TernaryMatMul": 4, "TernaryMatMulBase3": 3}.get(node.op_type)
    if node.domain != FUNCTION_DOMAIN or radix is None:
        return None
    arrays = _constants(node, TERNARY_INPUTS[1:], constants)
    if arrays is None:
        return None
    return Match("ternary_matmul", [node], node.inputs[0].name, ternary.function_weight(arrays, radix))


def dequantize_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """MatMul(x, DequantizeLinear(q uint2 [K, N], scale, zero point 1)): per column or blocked along K."""
    dequantize = _producer_of_weight(node, "DequantizeLinear")
    if dequantize is None or node.op_type != "MatMul":
        return None
    q, scale, zero_point = (constants.get(v.name) if v is not None else None for v in
                            (list(dequantize.inputs) + [None] * 3)[:3])
    if q is None or scale is None or zero_point is None or q.dtype.name != "uint2" or q.ndim != 2:
        return None
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
    weight = ternary.ternary_weight(codes, scales.astype(np.float32), block)
    return Match("ternary_matmul", [dequantize, node], node.inputs[0].name, weight)


def hyper_rule(node: ir.Node, constants: dict[str, np.ndarray]) -> Match | None:
    """MatMul(x, HyperDecode(...)) or Gather(HyperDecode(...), indices, axis 0), with a per-tensor code of pairs
    and W [K, N], N a multiple of 16."""
    decode = _producer_of_weight(node, "HyperDecode", FUNCTION_DOMAIN)
    if decode is None or (node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0):
        return None
    arrays = {key: constants.get(v.name) for key, v in zip(HYPER_INPUTS["HyperDecode"], decode.inputs)}
    if any(a is None for a in arrays.values()):
        return None
    reason = hyper.fusable(arrays)
    if reason:
        logger.debug("%s: not fused: %s", node.name, reason)
        return None
    if node.op_type == "Gather":
        return Match("hyper_gather", [decode, node], node.inputs[1].name, hyper.function_weight(arrays))
    return Match("hyper_matmul", [decode, node], node.inputs[0].name, hyper.function_weight(arrays))


RULES: list[Callable[[ir.Node, dict[str, np.ndarray]], Match | None]] = [ternary_function_rule, dequantize_rule,
                                                                          hyper_rule]


def plan_kernels(graph, constants: dict[str, np.ndarray], backend: Backend) -> dict[int, KernelStep]:
    """Kernel steps by id of the node where each runs, their weights placed on the backend's device."""
    steps: dict[int, KernelStep] = {}
    for node in graph:
        for rule in RULES:
            match = rule(node, constants)
            if match is not None:
                kernel = KERNELS[match.kernel]
                call = kernel.reference if backend.name == "cpu" else kernel.cuda
                steps[id(node)] = KernelStep(match.kernel, match.nodes, [match.x], [node.outputs[0].name],
                                             match.weight.to(backend), call)
                break
    return steps
