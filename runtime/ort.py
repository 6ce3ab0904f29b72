"""onnxruntime sessions over IR models: run feeds, and read intermediate activations (probes)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from symshrink.errors import BadInput
from symshrink.models.types import Feeds, InputSpec

__all__ = ["make_session", "session_for_model", "run_all", "collect_probes", "input_specs"]

_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
           "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(bool)": "bool",
           "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def make_session(path: str | os.PathLike, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception classes for invalid graphs
        raise BadInput(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None


def session_for_model(model: ir.Model, threads: int | None = None, extra_outputs: Sequence[str] = ()):
    """A session over an in-memory IR model (written to a temporary folder so external data works)."""
    with tempfile.TemporaryDirectory(prefix="symshrink-") as tmp:
        path = Path(tmp) / "model.onnx"
        if extra_outputs:
            model = _with_outputs(model, extra_outputs)
        big = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        ir.save(model, path, external_data="model.onnx.data" if big > 2**30 else None)
        return make_session(path, threads)


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    copy = ir.from_proto(ir.to_proto(model))
    values = {v.name: v for node in copy.graph for v in node.outputs}
    present = {v.name for v in copy.graph.outputs}
    for name in names:
        if name not in present:
            copy.graph.outputs.append(values[name])
    return copy


def input_specs(session: ort.InferenceSession) -> list[InputSpec]:
    return [InputSpec(i.name, _DTYPES.get(i.type, i.type), tuple(i.shape)) for i in session.get_inputs()]


def run_all(session: ort.InferenceSession, feeds: Iterable[Feeds], names: Sequence[str] | None = None) -> list[dict]:
    """Outputs (name -> array) for each feed."""
    names = list(names) if names else [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in feeds]


def collect_probes(model: ir.Model, probes: dict[str, int], feeds: Sequence[Feeds], threads: int | None = None,
                   progress=None) -> dict[str, np.ndarray]:
    """Activations of each probe value, flattened to [rows, units] with the unit axis last.

    `probes` maps a value name to its unit axis (-1 for FFN hidden units, 1 for NCHW channels).
    """
    session = session_for_model(model, threads, extra_outputs=list(probes))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in probes}
    names = list(probes)
    for feed in feeds:
        for name, array in zip(names, session.run(names, feed)):
            axis = probes[name]
            moved = np.moveaxis(array, axis, -1) if axis != -1 else array
            chunks[name].append(moved.reshape(-1, moved.shape[-1]).astype(np.float32, copy=False))
        if progress is not None:
            progress.update(1)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
