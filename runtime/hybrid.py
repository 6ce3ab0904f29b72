"""Hybrid execution: the standard segments of a `partition.Plan` run as onnxruntime sessions (CUDA provider where
onnxruntime-gpu is installed, else the CPU's), the packed nodes as the runtime's kernels on the backend's device
with their codes packed; values cross between them by IOBinding, bound where they lie (pointers to numpy or CuPy
memory, no copy), and are copied between host and device only where the two engines keep them apart, once per
value and run (`Plan.moves` says how many; `HybridRunner.moves` counts them).

`open_runtime` picks the engine users deploy: hybrid over onnxruntime when it can run the standard segments on the
same memory as the kernels, else the node-by-node `Executor` (the reference oracle) on the device.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from symshrink.errors import BadInput
from symshrink.models.types import InputSpec
from symshrink.runtime.backend import ENGINES, Backend, cpu_backend
from symshrink.runtime.executor import Executor, widened
from symshrink.runtime.formats import (
    CONTRIB_DOMAIN,
    decode_gather,
    decode_matmul_nbits,
    gather_arrays,
    matmul_nbits_arrays,
    quantize_grid,
)
from symshrink.runtime.kernels import KernelStep, kernel_steps
from symshrink.runtime.ops import OPS, OpContext, op_key
from symshrink.runtime.ort import graph_input_specs, session_options
from symshrink.runtime.partition import DEVICE, HOST, LOW_BIT_OPS, Capabilities, Moves, Plan, Segment, plan_partitions
from symshrink.runtime.subgraph import subgraph_proto

__all__ = ["HybridRunner", "HybridSummary", "OrtSegment", "probe_capabilities", "providers_for", "open_runtime",
           "PROBE_WIDTHS"]

PROBE_WIDTHS = {"com.microsoft::MatMulNBits": (2, 4, 8), "com.microsoft::GatherBlockQuantized": (4, 8)}  # symshrink's
PROBE_RTOL = 1e-2  # the probe's product against numpy: MatMulNBits may quantise activations to int8
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def providers_for(provider: str, device_id: int = 0) -> list:
    """onnxruntime's provider list for "cpu" or "cuda" on that device (the CPU's as the fallback for ops CUDA lacks)."""
    if provider == "cuda":
        if PROVIDERS["cuda"] not in ort.get_available_providers():
            raise BadInput("onnxruntime's CUDA provider is not installed: pip install 'symshrink[gpu]' "
                           "(onnxruntime-gpu), or --engine executor")
        return [(PROVIDERS["cuda"], {"device_id": device_id}), PROVIDERS["cpu"]]
    return [PROVIDERS["cpu"]]


def _probe_model(op: str, bits: int) -> tuple[bytes, dict[str, np.ndarray], np.ndarray]:
    """A one-node model of `op` at `bits` bits (a 64 x 32 weight in blocks of 32), its feed, and numpy's output."""
    rng = np.random.default_rng(bits)
    weight = quantize_grid(rng.standard_normal((64, 32)).astype(np.float32), 32, bits)
    if op.endswith("MatMulNBits"):
        stored = matmul_nbits_arrays(weight)
        x = rng.standard_normal((2, 64)).astype(np.float32)
        expected, inputs, feed = x @ decode_matmul_nbits(stored), ["x", *stored.arrays], {"x": x}
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain=CONTRIB_DOMAIN, **stored.attributes)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    else:
        stored = gather_arrays(weight)
        indices = np.array([[0, 5, 31]], np.int64)
        expected, feed = decode_gather(stored).T[indices], {"x": indices}
        node = helper.make_node("GatherBlockQuantized", ["data", "x", *list(stored.arrays)[1:]], ["y"],
                                domain=CONTRIB_DOMAIN, **stored.attributes)
        x_info = helper.make_tensor_value_info("x", TensorProto.INT64, [1, 3])
    graph = helper.make_graph([node], "probe", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(a, name) for name, a in stored.arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return model.SerializeToString(), feed, expected


@cache
def probe_capabilities(provider: str) -> Capabilities:
    """Which widths of the low-bit ops onnxruntime's `provider` runs itself, packed: each probed on a one-node model
    with the fallback to the CPU provider disabled, its output checked against numpy (a width it accepts but
    computes wrongly counts as not run)."""
    providers = providers_for(provider)[:1]
    widths: dict[str, set[int]] = {}
    for op in LOW_BIT_OPS:
        widths[op] = set()
        for bits in PROBE_WIDTHS[op]:
            data, feed, expected = _probe_model(op, bits)
            options = session_options()
            if provider != "cpu":
                options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            try:
                (y,) = ort.InferenceSession(data, options, providers=providers).run(None, feed)
            except Exception:  # noqa: BLE001 (onnxruntime refuses a width with its own exception classes)
                continue
            if np.linalg.norm(y - expected) <= PROBE_RTOL * np.linalg.norm(expected):
                widths[op].add(bits)
    return Capabilities(provider, {op: frozenset(bits) for op, bits in widths.items()})


def _cupy_view(value: ort.OrtValue):
    """A CuPy array over an OrtValue's device memory (the array keeps the OrtValue alive)."""
    import cupy  # noqa: PLC0415

    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.element_type()))
    shape = tuple(value.shape())
    if not math.prod(shape):  # no memory behind it (a null pointer)
        return cupy.empty(shape, dtype)
    memory = cupy.cuda.UnownedMemory(value.data_ptr(), math.prod(shape) * dtype.itemsize, value)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))


def _cuda_device() -> int:
    import cupy  # noqa: PLC0415

    return int(cupy.cuda.Device().id)


class OrtSegment:
    """A standard segment as an onnxruntime session, made at its first run from the dtypes its inputs have, run
    through IOBinding: inputs bound where they lie, outputs left where the provider makes them."""

    def __init__(self, model: ir.Model, segment: Segment, provider: str, threads: int | None = None):
        self.model, self.segment, self.provider, self.threads = model, segment, provider, threads
        self.memory = DEVICE if provider == "cuda" else HOST
        self.device = ("cuda", _cuda_device()) if provider == "cuda" else ("cpu", 0)  # onnxruntime's names
        self._sessions: dict[tuple, ort.InferenceSession] = {}

    def session(self, dtypes: tuple) -> ort.InferenceSession:
        if dtypes not in self._sessions:
            types = dict(zip(self.segment.inputs, dtypes))
            proto = subgraph_proto(self.model, self.segment.nodes, self.segment.inputs, self.segment.outputs, types,
                                   name=f"segment{self.segment.phase}")
            try:
                self._sessions[dtypes] = ort.InferenceSession(proto.SerializeToString(), session_options(self.threads),
                                                              providers=providers_for(self.provider, self.device[1]))
            except Exception as err:  # noqa: BLE001 (onnxruntime's own exception classes)
                raise BadInput(f"onnxruntime cannot load a standard segment of this model: "
                               f"{str(err).splitlines()[0]}") from None
        return self._sessions[dtypes]

    def run(self, values: Mapping[str, Any]) -> dict[str, Any]:
        arrays = [values[name] for name in self.segment.inputs]
        session = self.session(tuple(np.dtype(a.dtype).name for a in arrays))
        binding = session.io_binding()
        device, device_id = self.device
        if device == "cuda":
            import cupy  # noqa: PLC0415

            cupy.cuda.get_current_stream().synchronize()  # the kernels that wrote the inputs have finished
        kept = []  # contiguous copies must outlive the run
        for name, array in zip(self.segment.inputs, arrays):
            if array.size == 0:  # no memory to point at (CuPy's pointer is null): an empty OrtValue of its shape
                empty = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, device, device_id)
                kept.append(empty)
                binding.bind_ortvalue_input(name, empty)
                continue
            if not array.flags.c_contiguous:  # (not np.ascontiguousarray: it makes a 0-d array 1-d)
                array = array.copy(order="C")
            kept.append(array)
            pointer = array.ctypes.data if device == "cpu" else array.data.ptr
            binding.bind_input(name, device, device_id, array.dtype, list(array.shape), pointer)
        for name in self.segment.outputs:
            binding.bind_output(name, device, device_id)
        session.run_with_iobinding(binding)
        if device == "cuda":
            binding.synchronize_outputs()
            return {name: _cupy_view(v) for name, v in zip(self.segment.outputs, binding.get_outputs())}
        return {name: v.numpy() for name, v in zip(self.segment.outputs, binding.get_outputs())}


@dataclass
class _OpStep:
    """A low-bit op the provider cannot run, run as it is by the runtime's op (its codes unpacked per call)."""

    node: ir.Node
    attrs: dict[str, Any]
    opset: int

    def run(self, backend: Backend, args: list) -> list:
        result = OPS[op_key(self.node.domain, self.node.op_type)](OpContext(backend, self.opset, self.attrs), *args)
        return list(result) if isinstance(result, tuple) else [result]


class HybridRunner:
    """`HybridRunner(model, backend, provider).run(feeds)` -> outputs by name, as numpy arrays; the Executor's
    interface (summary, input_specs, output_names)."""

    def __init__(self, model: ir.Model, backend: Backend | None = None, provider: str = "cpu",
                 capabilities: Capabilities | None = None, threads: int | None = None):
        self.backend = backend or cpu_backend()
        self.model = model
        self.plan: Plan = plan_partitions(model, capabilities or probe_capabilities(provider))
        self.places = {"standard": DEVICE if provider == "cuda" else HOST,
                       "packed": HOST if self.backend.name == "cpu" else DEVICE}
        self.moves = Moves(0, 0)  # counted over the last run
        opset = model.opset_imports.get("", 1)
        initializers = model.graph.initializers
        steps = kernel_steps([self.plan.matches[id(n)] for s in self.plan.segments for n in s.nodes
                              if id(n) in self.plan.matches], self.backend)
        self._constants: dict[str, Any] = {}
        self._runs: list[tuple[Segment, Any]] = []
        for segment in self.plan.segments:
            if segment.kind == "standard":
                self._runs.append((segment, OrtSegment(model, segment, provider, threads)))
                continue
            packed = []
            for node in segment.nodes:
                step = steps.get(id(node)) or _OpStep(node, {name: a.value for name, a in node.attributes.items()}, opset)
                reads = step.inputs if isinstance(step, KernelStep) else [v.name for v in node.inputs if v is not None]
                for name in reads:  # a bias, an op's codes and scales: placed once
                    if name in initializers and name not in self._constants:
                        self._constants[name] = self._place(initializers[name].const_value.numpy())
                packed.append(step)
            self._runs.append((segment, packed))
        self._last_read = self._last_reads()
        self._constant_outputs = {name: initializers[name].const_value.numpy() for name in self.plan.outputs
                                  if name in initializers}

    def _place(self, array: np.ndarray):
        array = widened(array)
        return self.backend.to_device(array) if self.places["packed"] == DEVICE else array

    def _last_reads(self) -> dict[str, int]:
        last = {}
        for i, (segment, _) in enumerate(self._runs):
            last.update(dict.fromkeys(segment.inputs, i))
        return last

    # -- run -------------------------------------------------------------------------------------------------

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.plan.inputs if name not in feeds]
        if missing:
            raise BadInput(f"missing inputs: {', '.join(missing)}")
        values: dict[str, dict[str, Any]] = {name: {HOST: np.asarray(feeds[name])} for name in self.plan.inputs}
        values |= {name: {HOST: array} for name, array in self._constant_outputs.items()}
        counts = {HOST: 0, DEVICE: 0}

        def read(name: str, place: str):
            held = values[name]
            if place not in held:  # made in the other memory: one copy this run
                array = next(iter(held.values()))
                held[place] = self.backend.to_device(array) if place == DEVICE else self.backend.to_host(array)
                counts[place] += 1
            return held[place]

        for i, (segment, engine) in enumerate(self._runs):
            place = self.places[segment.kind]
            if segment.kind == "standard":
                made = engine.run({name: read(name, place) for name in segment.inputs})
            else:
                made = self._run_packed(engine, {name: read(name, place) for name in segment.inputs})
            for name in segment.outputs:
                values[name] = {place: made[name]}
            for name in segment.inputs:
                if self._last_read.get(name) == i and name not in self.plan.outputs:
                    values.pop(name, None)
        results = {name: read(name, HOST) for name in self.plan.outputs}
        self.moves = Moves(counts[DEVICE], counts[HOST])
        return results

    def _run_packed(self, steps: list, env: dict[str, Any]) -> dict[str, Any]:
        env = dict(env)
        for step in steps:
            if isinstance(step, KernelStep):
                env[step.outputs[0]] = step.run(*(self._constants.get(name, env.get(name)) for name in step.inputs))
            else:
                args = [None if v is None else self._constants.get(v.name, env.get(v.name)) for v in step.node.inputs]
                env.update(zip((v.name for v in step.node.outputs), step.run(self.backend, args)))
        return env

    # -- the Executor's interface ----------------------------------------------------------------------------

    def output_names(self) -> list[str]:
        return list(self.plan.outputs)

    def input_specs(self) -> list[InputSpec]:
        return graph_input_specs(self.model)

    def summary(self) -> HybridSummary:
        kernels = Counter(k for s in self.plan.segments for k in s.kernels)
        weights = {id(a): a for _, engine in self._runs if isinstance(engine, list)
                   for step in engine if isinstance(step, KernelStep) for a in step.weight.arrays()}
        constant_bytes = sum(int(a.nbytes) for a in [*weights.values(), *self._constants.values()])
        return HybridSummary(self.backend.name, dict(kernels), constant_bytes, self.plan,
                             self.plan.moves(self.places["standard"], self.places["packed"]))


@dataclass
class HybridSummary:
    device: str  # where the packed nodes run
    kernels: dict[str, int]  # packed kernel or op -> nodes
    constant_bytes: int  # the packed side's constants (kernel weights, shared tables once); onnxruntime holds the rest
    plan: Plan
    moves: Moves  # host-device copies a run makes
    function_calls: dict[str, int] = field(default_factory=dict)  # none: onnxruntime runs what is not packed

    def lines(self) -> list[str]:
        first, *rest = self.plan.lines()
        return [f"device {self.device} (hybrid engine): {first}", *rest,
                f"packed constants {self.constant_bytes / 2**20:.1f} MiB; host-device copies per run: "
                f"{self.moves.uploads} up, {self.moves.downloads} down"]


def open_runtime(model: ir.Model, backend: Backend, engine: str = "auto", threads: int | None = None):
    """The runtime for `model` on `backend`: "executor" the node-by-node executor; "hybrid" onnxruntime for the
    standard segments (its CUDA provider on a GPU, else the CPU's: values then cross to the device and back);
    "auto" hybrid where onnxruntime runs on the kernels' memory (the CPU; a GPU with onnxruntime-gpu), else the
    executor."""
    if engine not in ENGINES:
        raise BadInput(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    on_gpu = backend.name == "cuda"
    cuda_provider = PROVIDERS["cuda"] in ort.get_available_providers()
    if engine == "executor" or (engine == "auto" and on_gpu and not cuda_provider):
        return Executor(model, backend)
    return HybridRunner(model, backend, "cuda" if on_gpu and cuda_provider else "cpu", threads=threads)

