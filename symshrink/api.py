"""The Python API: `compress(model, calibration, **options)` returns the compressed ModelProto and the report;
`save(model, path)` writes it under the same contract as the CLI (atomic, never over an input, existing files
only with `force`). Bad arguments raise BadInput with one sentence, never a TypeError from inside."""

from __future__ import annotations

import os
import typing
from pathlib import Path

import onnx
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.modelio import check_proto, claim_output, input_files, load_model, model_bytes_on_disk, resolve_model, save_model
from symshrink.options import CompressOptions, options_from
from symshrink.pipeline import calibration_feeds, check_options, compress_file_streamed, compress_model, streams
from symshrink.report import CompressReport
from symshrink.runtime.ort import input_specs, session_for_model

__all__ = ["compress", "save", "CompressOptions", "CompressReport"]

_NOT_OPTIONS = {"calib", "random_calib", "plan_out"}  # the file-to-file job's: the API takes data, not paths

def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[ir.Model, str, int]:
    """The IR model, a name for reports and its size in bytes, from a path, a zoo name or a ModelProto."""
    if isinstance(model, onnx.ModelProto):
        check_proto(model, "the model")
        return ir.from_proto(model), "(ModelProto)", model.ByteSize()
    loaded, path = load_model(model)
    return loaded, str(path), model_bytes_on_disk(path)


def compress(model: str | os.PathLike | onnx.ModelProto, calibration: object = None, *,
             random_calibration: bool = False, calib_samples: int | None = None, calib_layout: str = "batch",
             **options: object) -> tuple[onnx.ModelProto, CompressReport]:
    """Compress `model` (a path, a zoo model name or an onnx.ModelProto; never modified) calibrated on
    `calibration`: a zoo data set name, a path (.npz or folder), an iterable of {input name: array} dicts or an
    onnxruntime CalibrationDataReader (None: the zoo model's data set). `options` are the run's and the
    methods' options, flat (method="ternary", block=32, keep=0.5, max_error=0.05...: symshrink.options).
    Returns the compressed model and the report; when the gate failed, `report.passed` is False and
    `report.failures` says why (the model is returned for inspection)."""
    if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise BadInput(f"model: a path, a zoo model name or an onnx.ModelProto, not {type(model).__name__}")
    for name in _NOT_OPTIONS & set(options):
        raise BadInput(f"option {name} belongs to the command line; here give `calibration` and call save()")
    settings = options_from(calib_samples=calib_samples, calib_layout=calib_layout, **options)
    settings.calib, settings.random_calib = calibration, random_calibration
    check_options(settings)
    path = None if isinstance(model, onnx.ModelProto) else resolve_model(model)
    size = model_bytes_on_disk(path) if path is not None and path.is_file() else 0
    if streams(settings, size):
        if path is None:
            raise BadInput("stream=True reads the model block by block from its file: give its path, not a ModelProto")
        ir_model, report = compress_file_streamed(model, settings, size)
        ir.external_data.load_to_model(ir_model)  # the weights left on disk go inside the returned model
        compressed = ir.to_proto(ir_model)
        report.bytes_after = compressed.ByteSize()
        return compressed, report
    ir_model, source, before = _load(model)
    session = session_for_model(ir_model, settings.threads)
    feeds = calibration_feeds(settings, model if isinstance(model, str) else None, input_specs(session, ir_model))
    report = compress_model(ir_model, source, feeds, settings, before, session,
                            model if isinstance(model, str) else None)
    compressed = ir.to_proto(ir_model)
    report.bytes_after = compressed.ByteSize()
    return compressed, report


def save(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
         inputs: typing.Sequence[str | os.PathLike] = ()) -> Path:
    """Write `model` atomically (external data when over 2 GB); an existing file is replaced only with `force`,
    and never one of `inputs` (say, the model it was compressed from)."""
    if not isinstance(model, onnx.ModelProto):
        raise BadInput(f"save: an onnx.ModelProto, not {type(model).__name__}")
    protected = [file for p in inputs for file in input_files(resolve_model(p))]
    out = claim_output(path, force=force, inputs=protected)
    return save_model(ir.from_proto(model), out, force=force, inputs=protected)
