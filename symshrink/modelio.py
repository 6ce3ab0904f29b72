"""Load and save models under the error contract: one clear line for bad input, the input is never
modified, output is written atomically (temporary files in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from symshrink.errors import BadInput

__all__ = ["resolve_model", "load_model", "save_model", "check_output_folder", "write_atomically",
           "model_bytes_on_disk", "MAX_OPSET", "TWO_GB"]

MAX_OPSET = onnx.defs.onnx_opset_version()
MIN_OPSET = 7
TWO_GB = 2**31


def resolve_model(spec: str | os.PathLike) -> Path:
    """A path to an .onnx file, or a zoo model name (materialised into the cache on first use)."""
    path = Path(spec)
    if path.suffix == ".onnx" or path.exists() or os.sep in str(spec):
        return path
    from symshrink.models.registry import ZOO, cache_dir  # noqa: PLC0415 (zoo is optional at import)

    if str(spec) not in ZOO:
        raise BadInput(f"{spec}: no such file, and not a zoo model (see `symshrink zoo list`)")
    return ZOO[str(spec)].materialise(cache_dir())


def _check_external_data(model: ir.Model, base: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.base_dir or base) / tensor.location
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if not data.is_file():
                raise BadInput(f"missing external data file {data} (needed by tensor {value.name!r})")
            if data.stat().st_size < needed:
                raise BadInput(f"external data file {data} is truncated ({data.stat().st_size} < {needed} bytes)")


def load_model(spec: str | os.PathLike) -> tuple[ir.Model, Path]:
    """Parse and validate a model; returns the IR model and the resolved path."""
    path = resolve_model(spec)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(err).__name__})") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    if not proto.graph.node:
        raise BadInput(f"{path}: not an ONNX model (no graph nodes)")
    opsets = {o.domain: o.version for o in proto.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None or not MIN_OPSET <= default <= MAX_OPSET:
        raise BadInput(f"{path}: unsupported opset {default} (this install supports {MIN_OPSET}..{MAX_OPSET})")
    del proto  # parsed only to validate; onnx-ir reads the file itself and resolves external data
    model = ir.load(path)
    _check_external_data(model, path.parent)
    # rewrites and temporary sessions save copies elsewhere: external tensors must not point back here
    ir.external_data.load_to_model(model)
    return model, path


def _total_initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, out: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write atomically. Models whose weights exceed 2 GB (or when asked) get one external data file
    `<name>.data` beside the .onnx; both appear in place only after both are fully written."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise BadInput(f"{out}: is a folder")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"{folder}: output folder does not exist")
    use_external = external_data if external_data is not None else _total_initializer_bytes(model) >= TWO_GB - 2**24
    data_name = out.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{out.name}.") as tmp:
        tmp_model = Path(tmp) / out.name
        ir.save(model, tmp_model, external_data=data_name if use_external else None)
        if use_external:
            os.replace(Path(tmp) / data_name, folder / data_name)
        elif (folder / data_name).exists():
            with contextlib.suppress(OSError):
                (folder / data_name).unlink()  # a stale data file from an earlier external save
        os.replace(tmp_model, out)
    return out


def check_output_folder(out: str | os.PathLike) -> Path:
    """`out` as a Path, if its folder exists (bad input otherwise: say so before doing the work)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise BadInput(f"{out}: its folder does not exist")
    return out


def write_atomically(out: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """`write(handle)` into a new file in a temporary folder beside `out` (created with the umask's mode, as
    any new file), synced and renamed over `out` when done: no partial file on failure."""
    out = check_output_folder(out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        path = Path(tmp) / out.name
        with open(path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path, out)
    return out


def model_bytes_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the .onnx plus its external data files."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.exists())
