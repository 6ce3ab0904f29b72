"""Helpers for users' own tests: diff two models on the same inputs inside pytest."""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.models.types import Feeds
from symshrink.runtime.diff import compare_outputs, format_diffs, gate_failures
from symshrink.runtime.ort import make_session, run_all, session_for_model

__all__ = ["assert_outputs_close"]


def _session(model: str | os.PathLike | onnx.ModelProto):
    if isinstance(model, onnx.ModelProto):
        return session_for_model(ir.from_proto(model))
    if isinstance(model, (str, os.PathLike)):
        return make_session(model)
    raise BadInput(f"a model path or an onnx.ModelProto, not {type(model).__name__}")


def assert_outputs_close(reference: str | os.PathLike | onnx.ModelProto, candidate: str | os.PathLike | onnx.ModelProto,
                         feeds: Sequence[Feeds],
                         max_rel_error: float | None = None, min_cosine: float | None = None) -> None:
    """Run both models (paths or ModelProtos) in onnxruntime on `feeds`; raise AssertionError (with the diff table) when any
    output's relative L2 error exceeds `max_rel_error` or its cosine falls below `min_cosine`."""
    if max_rel_error is None and min_cosine is None:
        raise ValueError("give max_rel_error and/or min_cosine: a check without a tolerance checks nothing")
    diffs = compare_outputs(run_all(_session(reference), feeds), run_all(_session(candidate), feeds))
    failures = gate_failures(diffs, max_rel_error, min_cosine)
    if failures:
        raise AssertionError("; ".join(failures) + "\n" + format_diffs(diffs))
