"""Lazy weights: a model's graph read without its weights, each initializer's bytes left where they are on disk.

An initializer stored inside the .onnx file is a TensorProto whose raw_data (field 9) is one contiguous run of the
file's bytes. Walking the protobuf wire format (ModelProto.graph = field 7, GraphProto.initializer = field 5) finds
each run; the model is rebuilt without them and each such tensor is declared external data at its offset in the
.onnx file itself, so onnx-ir reads it (memory-mapped) only when a pass asks for it. Tensors already in external data
files stay there. Memory: the graph without its weights, whatever the file's size.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx
import onnx_ir as ir

__all__ = ["slim_proto", "load_lazy"]

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_INLINE_BYTES = 1024  # raw data up to this size stays in the proto (shapes, scalars)


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed protobuf (varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of the field's bytes incl. tag, start of payload, end) over a message."""
    pos = start
    while pos < end:
        tag_start = pos
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            payload = pos
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == 5:
            payload, pos = pos, pos + 4
        elif wire == 2:
            length, payload = _varint(buf, pos, end)
            pos = payload + length
        else:
            raise ValueError(f"malformed protobuf (wire type {wire})")
        if pos > end or number == 0:
            raise ValueError("truncated or malformed protobuf")
        yield number, wire, tag_start, payload, pos


def _length_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _slim_tensor(buf, start: int, end: int, runs: list[tuple[int, int] | None]) -> bytes:
    out, run = bytearray(), None
    for number, wire, tag_start, payload, stop in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == 2 and stop - payload > _INLINE_BYTES:
            run = (payload, stop - payload)
        else:
            out += buf[tag_start:stop]
    runs.append(run)
    return bytes(out)


def _slim_graph(buf, start: int, end: int, runs: list[tuple[int, int] | None]) -> bytes:
    out = bytearray()
    for number, wire, tag_start, payload, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == 2:
            out += _length_field(number, _slim_tensor(buf, payload, stop, runs))
        else:
            out += buf[tag_start:stop]
    return bytes(out)


def slim_proto(path: str | Path) -> onnx.ModelProto:
    """The model at `path` with every initializer's raw data over 1 KiB declared external data at its own offset in
    the .onnx file (location: the file's name): the weights stay on disk. ValueError when the file is not a
    well-formed protobuf."""
    path = Path(path)
    with open(path, "rb") as handle:
        if path.stat().st_size == 0:
            raise ValueError("empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out, runs = bytearray(), []
            for number, wire, tag_start, payload, stop in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == 2:
                    out += _length_field(number, _slim_graph(buf, payload, stop, runs))
                else:
                    out += buf[tag_start:stop]
    proto = onnx.ModelProto()
    proto.ParseFromString(bytes(out))
    for tensor, run in zip(proto.graph.initializer, runs):
        if run is not None:
            offset, length = run
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
    return proto


def load_lazy(proto: onnx.ModelProto, folder: Path) -> ir.Model:
    """The IR model of a slim proto: external tensors read from `folder` when first asked for."""
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, folder)
    return model
