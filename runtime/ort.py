"""onnxruntime sessions over IR models: run feeds, and read intermediate activations (probes)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from symshrink.errors import BadInput
from symshrink.models.types import Feeds, InputSpec

__all__ = ["make_session", "session_options", "session_for_model", "run_all", "stream_probes", "input_specs", "graph_input_specs"]

_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
           "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool",
           "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def session_options(threads: int | None = None, optimize: bool = True) -> ort.SessionOptions:
    """The options of every session symshrink makes: quiet, `threads` intra-op threads, optimised unless asked not."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def make_session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    options = session_options(threads, optimize)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 (onnxruntime raises its own exception classes for invalid graphs)
        raise BadInput(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def session_for_model(model: ir.Model, threads: int | None = None, extra_outputs: Sequence[str] = (),
                      optimize: bool = True):
    """A session over an in-memory IR model (written to a temporary folder so external data works).
    `extra_outputs` names intermediate values to expose as outputs (the model itself is left as it was)."""
    values = {v.name: v for node in model.graph for v in node.outputs}
    present = {v.name for v in model.graph.outputs}
    added = [values[name] for name in dict.fromkeys(extra_outputs) if name not in present]
    model.graph.outputs.extend(added)
    try:
        with tempfile.TemporaryDirectory(prefix="symshrink-") as tmp:
            path = Path(tmp) / "model.onnx"
            big = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
            ir.save(model, path, external_data="model.onnx.data" if big > 2**30 else None)
            return make_session(path, threads, optimize)
    finally:
        for _ in added:
            model.graph.outputs.pop()


def input_specs(session: ort.InferenceSession, model: ir.Model | None = None) -> list[InputSpec]:
    """The session's inputs; with the model at hand, an input whose rank the model leaves open gets shape None
    (onnxruntime reports it as [], like a scalar)."""
    open_rank = {v.name for v in model.graph.inputs if v.shape is None} if model is not None else set()
    return [InputSpec(i.name, _DTYPES.get(i.type, i.type), None if i.name in open_rank else tuple(i.shape))
            for i in session.get_inputs()]


def graph_input_specs(model: ir.Model) -> list[InputSpec]:
    """The graph's inputs as it declares them (no session needed): symbolic and unknown dimensions as str or None."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy().name if value.dtype is not None else "float32"
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else (d.value if d is not None else None)
                                                       for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def run_all(session: ort.InferenceSession, feeds: Iterable[Feeds], names: Sequence[str] | None = None) -> list[dict]:
    """Outputs (name -> array) for each feed."""
    names = list(names) if names else [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def stream_probes(model: ir.Model, names: Sequence[str], feeds: Iterable[Feeds],
                  threads: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """For each feed, the values of the named intermediate tensors or graph inputs (one batch in memory at
    a time). The session is unoptimised, every node its own kernel: onnxruntime's fusions change the last bits of
    a value and stop at probed ones, so the statistics would depend on what else is probed, or on where a
    block-by-block run cuts the graph."""
    inputs = {v.name for v in model.graph.inputs}
    computed = [name for name in dict.fromkeys(names) if name not in inputs]
    session = session_for_model(model, threads, extra_outputs=computed, optimize=False)
    for feed in feeds:
        values = dict(zip(computed, session.run(computed, feed))) if computed else {}
        yield values | {name: np.asarray(feed[name]) for name in names if name in inputs}
