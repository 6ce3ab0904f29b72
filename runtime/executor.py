"""Run an ONNX graph node by node over an array backend (numpy on the CPU, CuPy on a GPU).

Load -> prepare (attributes read once, Constant nodes evaluated, kernel fusions planned, constants placed)
-> run. Values that depend only on host constants (shapes, axes, index arithmetic) stay numpy arrays on the
host, and ops read their shape-like inputs there (`ops.HOST_INPUTS`), so shape arithmetic does not wait on
the device; everything else lives on the backend's device, and a host value a device op needs is copied
there once per run. A value is dropped after its last reader. symshrink-domain nodes run as fused kernels
where a rule in `runtime.kernels` matches, and otherwise through their model-local function bodies.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.models.types import InputSpec
from symshrink.runtime.backend import Backend, cpu_backend, is_host
from symshrink.runtime.formats import pack_low_bits
from symshrink.runtime.kernels import KernelStep, plan_kernels
from symshrink.runtime.ops import HOST_INPUTS, OPS, PACKED_INPUTS, OpContext, op_key, unpack_low_bits

__all__ = ["Executor", "ExecutorSummary", "PackedConstant", "widened"]

NARROW_INTEGERS = {"int2", "uint2", "int4", "uint4"}
HOST_LIMIT = 64  # constants up to this many elements stay on the host (shapes, axes, Resize scales, scalars)


@dataclass(frozen=True)
class PackedConstant:
    """A 2- or 4-bit constant (DequantizeLinear's codes) held as ONNX packs it, element 0 in the low bits, and
    unpacked at each use: its memory is the packed bytes, its unpacked form lives only during the op."""

    packed: Any  # uint8 [1, bytes], on the backend's device
    shape: tuple[int, ...]
    bits: int
    signed: bool

    @classmethod
    def of(cls, array: np.ndarray, backend: Backend) -> PackedConstant:
        bits = 2 if array.dtype.name.endswith("2") else 4
        codes = array.reshape(1, -1).astype(np.int8).view(np.uint8) & np.uint8((1 << bits) - 1)  # two's complement
        return cls(backend.to_device(pack_low_bits(codes, bits)), array.shape, bits, array.dtype.name.startswith("int"))

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes)

    def unpack(self, xp):
        codes = unpack_low_bits(xp, self.packed, self.bits, math.prod(self.shape))
        if self.signed:  # sign-extend: the top bit of the code counts -2^(bits-1)
            codes = codes - ((codes >> (self.bits - 1)) << self.bits)
        return codes.astype(xp.int8 if self.signed else xp.uint8).reshape(self.shape)


def widened(array: np.ndarray) -> np.ndarray:
    """2- and 4-bit integers (ml_dtypes, one per byte in numpy) as int8/uint8, which CuPy can hold; others as they are."""
    if array.dtype.name not in NARROW_INTEGERS:
        return array
    return array.astype(np.int8 if array.dtype.name.startswith("int") else np.uint8)


def _attribute(attr: ir.Attr) -> Any:
    if attr.is_ref():
        raise BadInput(f"attribute {attr.name!r} refers to a function attribute, which the executor does not take")
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, ir.Graph | ir.Function) or (isinstance(value, list | tuple) and value
                                                     and isinstance(value[0], ir.Graph)):
        raise BadInput(f"attribute {attr.name!r} holds a subgraph (If/Loop/Scan), which the executor does not run")
    return list(value) if isinstance(value, list | tuple) else value


def _function_key(node: ir.Node) -> tuple[str, str, str]:
    return node.domain, node.op_type, node.overload


@dataclass
class _NodeStep:
    node: ir.Node
    attrs: dict[str, Any]
    inputs: list[str | None]
    outputs: list[str]
    function: _Program | None = None  # the body of a model-local function call


@dataclass
class _Program:
    """A graph (the main one or a function body) ready to run: its steps and the values each step drops."""

    inputs: list[str]
    outputs: list[str]
    opset: int
    steps: list[_NodeStep | KernelStep]
    drops: list[list[str]] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)  # initializers and Constant outputs, placed


def _unpackable_codes(node, constants: dict[str, np.ndarray]) -> np.dtype | None:
    """The type of the constant an op that unpacks bytes (`PACKED_INPUTS`) would misread there (not uint8), else
    None (no such op, a uint8 constant or a computed value)."""
    index = PACKED_INPUTS.get(op_key(node.domain, node.op_type))
    if index is None or index >= len(node.inputs) or node.inputs[index] is None:
        return None
    array = constants.get(node.inputs[index].name)
    return None if array is None or array.dtype == np.uint8 else array.dtype


@dataclass
class ExecutorSummary:
    device: str
    nodes: int
    kernels: dict[str, int]  # kernel name -> fused nodes it runs
    function_calls: dict[str, int]  # symshrink functions run through their bodies
    constant_bytes: int  # what the constants take on the device

    def lines(self) -> list[str]:
        kernels = ", ".join(f"{n} x {name}" for name, n in sorted(self.kernels.items())) or "none"
        bodies = ", ".join(f"{n} x {name}" for name, n in sorted(self.function_calls.items())) or "none"
        return [f"device {self.device}: {self.nodes} nodes, constants {self.constant_bytes / 2**20:.1f} MiB",
                f"fused kernels: {kernels}", f"function bodies: {bodies}"]


class Executor:
    """`Executor(model, backend).run(feeds)` -> outputs by name, as numpy arrays."""

    def __init__(self, model: ir.Model, backend: Backend | None = None, fuse: bool = True):
        self.backend = backend or cpu_backend()
        self.host = cpu_backend()
        self.model = model
        self._kernel_counts: Counter[str] = Counter()
        self._function_counts: Counter[str] = Counter()
        self._missing: set[str] = set()
        self._bodies: dict[tuple[str, str, str], _Program] = {}
        self._host_constants: set[int] = set()  # ids of the small constants kept on the host
        self._resident: dict[int, tuple[np.ndarray, Any]] = {}  # their device copies, made when first needed
        initializers = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()
                        if value.const_value is not None}
        self.program = self._compile(model.graph, model.opset_imports.get("", 1), fuse, initializers)
        if self._missing:
            raise BadInput(f"the executor has no implementation of {', '.join(sorted(self._missing))} "
                           f"(it covers {len(OPS)} standard ops: symshrink.runtime.ops.supported_ops())")

    # -- prepare ---------------------------------------------------------------------------------------------

    def _compile(self, graph, opset: int, fuse: bool, constants: dict[str, np.ndarray]) -> _Program:
        """Steps of `graph` (Constant nodes folded into `constants` first, so that fusions see them), then its
        read constants placed."""
        folded = set()
        for node in graph:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
                constants[node.outputs[0].name] = OPS["Constant"](OpContext(self.host, opset, attrs))
                folded.add(id(node))
        kernel_steps, unneeded = plan_kernels(graph, constants, self.backend) if fuse else ({}, set())
        steps: list[_NodeStep | KernelStep] = []
        for node in graph:
            if id(node) in kernel_steps:
                steps.append(kernel_steps[id(node)])
                self._kernel_counts[kernel_steps[id(node)].kernel] += 1
                continue
            if id(node) in unneeded or id(node) in folded:
                continue
            attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
            inputs = [v.name if v is not None else None for v in node.inputs]
            outputs = [v.name for v in node.outputs]
            body = None
            key = _function_key(node)
            if key in self.model.functions:
                if key not in self._bodies:  # compiled and its constants placed once, for every call
                    function = self.model.functions[key]
                    self._bodies[key] = self._compile(function, function.opset_imports.get("", opset), fuse, {})
                body = self._bodies[key]
                self._function_counts[node.op_type] += 1
            elif op_key(node.domain, node.op_type) not in OPS:
                self._missing.add(f"{node.domain}::{node.op_type}" if node.domain else node.op_type)
            elif (misread := _unpackable_codes(node, constants)) is not None:
                self._missing.add(f"{node.op_type} over {misread} codes")
            steps.append(_NodeStep(node, attrs, inputs, outputs, body))
        inputs = [v.name for v in graph.inputs]
        outputs = [v.name for v in graph.outputs]
        read = {name for step in steps for name in step.inputs if name} | set(outputs)
        placed = {name: self._place(array) for name, array in constants.items() if name in read}
        return _Program(inputs, outputs, opset, steps, self._drops(steps, outputs), placed)

    @staticmethod
    def _drops(steps: list, outputs: list[str]) -> list[list[str]]:
        last: dict[str, int] = {}
        for i, step in enumerate(steps):
            for name in step.inputs:
                if name:
                    last[name] = i
        drops: list[list[str]] = [[] for _ in steps]
        for name, i in last.items():
            if name not in outputs:
                drops[i].append(name)
        return drops

    def _place(self, array: np.ndarray):
        """Small constants stay on the host (shapes, axes, scales that ops read there; device ops get a copy
        made once); the rest go to the device. 2- and 4-bit integers (ml_dtypes, one per byte in numpy) stay packed
        on the device (`PackedConstant`), or, when small, become int8/uint8, which CuPy can hold."""
        if array.dtype.name in NARROW_INTEGERS and array.size > HOST_LIMIT:
            return PackedConstant.of(array, self.backend)
        array = widened(array)
        if array.size <= HOST_LIMIT and self.backend.name != "cpu":
            self._host_constants.add(id(array))
            return array
        return self.backend.to_device(array)

    # -- run -------------------------------------------------------------------------------------------------

    def summary(self) -> ExecutorSummary:
        nbytes = self._constant_bytes(self.program)
        return ExecutorSummary(self.backend.name, sum(1 for _ in self.model.graph), dict(self._kernel_counts),
                               dict(self._function_counts), nbytes)

    def output_names(self) -> list[str]:
        return list(self.program.outputs)

    def input_specs(self) -> list[InputSpec]:
        """The graph inputs that feeds must give (name, numpy dtype, shape with dynamic axes as names)."""
        def dim(d) -> int | str | None:
            return d if isinstance(d, int) else (d.value if d is not None else None)

        return [InputSpec(v.name, v.dtype.numpy().name, tuple(dim(d) for d in v.shape) if v.shape else ())
                for v in self.model.graph.inputs if v.name not in self.program.constants]

    def _constant_bytes(self, program: _Program) -> int:
        total = sum(int(a.nbytes) for a in program.constants.values())
        arrays = {id(a): a for step in program.steps if isinstance(step, KernelStep) for a in step.weight.arrays()}
        total += sum(int(a.nbytes) for a in arrays.values())  # shared weights and codebook tables count once
        bodies = {id(step.function): step.function for step in program.steps
                  if isinstance(step, _NodeStep) and step.function is not None}
        return total + sum(self._constant_bytes(body) for body in bodies.values())

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.program.inputs if name not in feeds and name not in self.program.constants]
        if missing:
            raise BadInput(f"missing inputs: {', '.join(missing)}")
        env = {name: self.backend.to_device(np.asarray(feeds[name])) for name in self.program.inputs if name in feeds}
        outputs = self._run(self.program, env, {})
        return {name: self.backend.to_host(self._unpacked(outputs[name])) for name in self.program.outputs}

    def _unpacked(self, value):
        return value.unpack(self.backend.xp) if isinstance(value, PackedConstant) else value

    def _run(self, program: _Program, env: dict[str, Any], uploads: dict[int, tuple]) -> dict[str, Any]:
        """Run the steps; `uploads` keeps, for this run, the device copy of each host value sent there."""
        env = program.constants | env
        for step, drops in zip(program.steps, program.drops):
            args = [env[name] if name else None for name in step.inputs]
            if isinstance(step, KernelStep):
                results = [step.run(*(self._on_device(a, uploads) for a in args))]
            elif step.function is not None:
                done = self._run(step.function, dict(zip(step.function.inputs, args)), uploads)
                results = [done[name] for name in step.function.outputs]
            else:
                results = self._run_node(step, program.opset, args, uploads)
            env.update(zip(step.outputs, results))
            for name in drops:
                env.pop(name, None)
        return env

    def _on_device(self, array, uploads: dict[int, tuple]):
        """The device copy of a host array: made once for a small constant, once a run for a value computed on
        the host (the entries keep the host arrays alive, so their ids are not reused meanwhile)."""
        if self.backend.name == "cpu" or not is_host(array):
            return array
        cache = self._resident if id(array) in self._host_constants else uploads
        if id(array) not in cache:
            cache[id(array)] = (array, self.backend.to_device(array))
        return cache[id(array)][1]

    def _run_node(self, step: _NodeStep, opset: int, args: list, uploads: dict[int, tuple]) -> list:
        op_type = op_key(step.node.domain, step.node.op_type)
        args = [self._unpacked(a) for a in args]
        on_host = self.backend.name != "cpu" and all(a is None or is_host(a) for a in args)
        backend = self.host if on_host else self.backend
        if not on_host:
            host_inputs = HOST_INPUTS.get(op_type, ())
            args = [a if i in host_inputs else self._on_device(a, uploads) for i, a in enumerate(args)]
        try:
            result = OPS[op_type](OpContext(backend, opset, step.attrs), *args)
        except BadInput:
            raise
        except Exception as err:
            raise RuntimeError(f"{op_type} node {step.node.name!r}: {err}") from err
        return list(result) if isinstance(result, tuple) else [result]
