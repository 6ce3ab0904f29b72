"""Upgrading a model's default-domain opset when a rewrite needs newer ops (onnxscript's version converter,
falling back to onnx's), or refusing with the converter's reason."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnxscript.version_converter

from symshrink.errors import BadInput

__all__ = ["ensure_opset"]


def ensure_opset(model: ir.Model, version: int, purpose: str) -> bool:
    """Upgrade to at least `version`, which `purpose` (a phrase: "2-bit DequantizeLinear") needs. True if the
    model changed."""
    current = model.opset_imports.get("", 1)
    if current >= version:
        return False
    converter_log = logging.getLogger("onnxscript.version_converter")
    level = converter_log.level
    converter_log.setLevel(logging.ERROR)  # it warns whenever it hands over to onnx's converter, the usual case
    try:
        onnxscript.version_converter.convert_version(model, version, fallback=True)
    except Exception as err:  # noqa: BLE001 (the converters raise their own exception types for unsupported ops)
        raise BadInput(f"cannot upgrade the model from opset {current} to {version}, which {purpose} needs: "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    finally:
        converter_log.setLevel(level)
    if model.opset_imports.get("", 1) < version:
        raise BadInput(f"cannot upgrade the model from opset {current} to {version}, which {purpose} needs")
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)]))
    return True
