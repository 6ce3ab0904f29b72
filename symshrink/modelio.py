"""Load and save models under the error contract: one clear line for bad input, the input is never
modified, output is written atomically (temporary files in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from symshrink.errors import BadInput, write_failure
from symshrink.lazyweights import load_lazy, slim_proto

__all__ = ["resolve_model", "load_model", "check_proto", "save_model", "claim_output", "claim_outputs", "write_atomically",
           "external_files", "input_files", "canonical", "model_bytes_on_disk", "MAX_OPSET", "TWO_GB"]

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
            needed = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
            if not data.is_file():
                raise BadInput(f"missing external data file {data} (needed by tensor {value.name!r})")
            if data.stat().st_size < needed:
                raise BadInput(f"external data file {data} is truncated ({data.stat().st_size} < {needed} bytes)")


def check_proto(proto: onnx.ModelProto, name: str, folder: Path | None = None) -> None:
    """The checks every model gets before any work (nothing allocated yet): a graph with nodes and outputs, a default
    opset this install runs, every value written once, every tensor holding the bytes its shape declares, and
    external data only in `folder` (the model's; None: a model in memory, which may not refer to files)."""
    if not proto.graph.node:
        raise BadInput(f"{name}: not an ONNX model (no graph nodes)")
    if not proto.graph.output:
        raise BadInput(f"{name}: the graph declares no outputs: there is nothing to compute or verify")
    opsets = {o.domain: o.version for o in proto.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None:
        raise BadInput(f"{name}: the model imports no ONNX opset (opset_import has no default-domain entry)")
    if not MIN_OPSET <= default <= MAX_OPSET:
        raise BadInput(f"{name}: unsupported opset {default} (this install supports {MIN_OPSET}..{MAX_OPSET})")
    for graph in _graphs(proto.graph):
        _check_single_writes(graph, name)
        for tensor in graph.initializer:
            _check_tensor(tensor, name, folder)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph in it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _graphs(sub)


def _check_single_writes(graph: onnx.GraphProto, name: str) -> None:
    """Each value of a graph is written once: by a graph input, an initializer or one node output."""
    written = {value.name: "a graph input" for value in graph.input}
    written |= {tensor.name: "an initializer" for tensor in graph.initializer}
    for node in graph.node:
        for output in node.output:
            if output and output in written:
                raise BadInput(f"{name}: not a valid ONNX graph: value {output!r} is written by {written[output]} and "
                               f"again by node {node.name or node.op_type!r}")
            written[output] = f"node {node.name or node.op_type!r}"


# bits per element of the tensor types with a fixed size (strings and types not listed: not checked)
_T = onnx.TensorProto
_ELEMENT_BITS = {_T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32, _T.INT64: 64,
                 _T.BOOL: 8, _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64, _T.COMPLEX64: 64,
                 _T.COMPLEX128: 128, _T.BFLOAT16: 16, _T.FLOAT8E4M3FN: 8, _T.FLOAT8E4M3FNUZ: 8, _T.FLOAT8E5M2: 8,
                 _T.FLOAT8E5M2FNUZ: 8, _T.UINT4: 4, _T.INT4: 4, _T.FLOAT4E2M1: 4}
_PACKED = (_T.UINT4, _T.INT4, _T.FLOAT4E2M1)  # two elements a byte (a byte an int32_data entry)
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _declared_bytes(tensor: onnx.TensorProto, count: int) -> int | None:
    """The bytes `count` elements of the tensor's type take as raw data (None: a type not checked)."""
    bits = _ELEMENT_BITS.get(tensor.data_type)
    return None if bits is None else -(-count * bits // 8)


def _declared_values(tensor: onnx.TensorProto, count: int) -> int:
    """How many entries of its typed field (float_data, int32_data...) `count` elements of the tensor take."""
    if tensor.data_type in _PACKED:
        return -(-count // 2)
    return 2 * count if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else count


def _check_tensor(tensor: onnx.TensorProto, name: str, folder: Path | None) -> None:
    """The tensor's shape against the bytes it stores (inline or as external data, whose location must stay in the
    model's folder): a tiny file declaring 10^12 elements is refused here, before anything is allocated."""
    dims = list(tensor.dims)
    what = f"{name}: tensor {tensor.name!r} declares shape {dims}"
    if any(d < 0 for d in dims):
        raise BadInput(f"{what}, a negative dimension: the file is corrupt")
    count = math.prod(dims)
    needed = _declared_bytes(tensor, count)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        entries = {entry.key: entry.value for entry in tensor.external_data}
        _check_location(tensor.name, entries.get("location", ""), name, folder)
        length = entries.get("length")
        if length is not None and needed is not None and (not length.isdigit() or int(length) != needed):
            raise BadInput(f"{what} ({needed} bytes) but its external data has length {length}: the file is corrupt")
        return
    if tensor.raw_data or needed == 0:
        if needed is not None and len(tensor.raw_data) != needed:
            raise BadInput(f"{what} ({needed} bytes) but stores {len(tensor.raw_data)}: the file is corrupt or truncated")
        return
    stored = sum(len(getattr(tensor, field)) for field in _TYPED_FIELDS)
    if stored != _declared_values(tensor, count):
        raise BadInput(f"{what} ({count} elements) but stores {stored} values: the file is corrupt or truncated")


def _check_location(tensor: str, location: str, name: str, folder: Path | None) -> None:
    """External data stays in the model's folder: a relative path without `..`, not through a symlink that leaves it
    (onnx-ir refuses those too, as a path traversal)."""
    if not location:
        raise BadInput(f"{name}: tensor {tensor!r} is declared external data without a location: the file is corrupt")
    if folder is None:
        raise BadInput(f"{name}: tensor {tensor!r} is stored in the external data file {location}: give the model's "
                       "path, or load it with its external data (onnx.load) first")
    base = os.path.realpath(folder)
    given = os.path.join(base, location)
    target = os.path.realpath(given)
    if os.path.isabs(location) or ".." in Path(location).parts or os.path.commonpath([base, target]) != base:
        if os.path.normpath(given) == os.path.join(base, Path(name).name):  # --stream reads the weights from the model
            raise BadInput(f"{name} is a link to {target}, in another folder: give that path (the weights are read "
                           "from the file itself)")
        link = "" if os.path.normpath(given) == target else f" (a link to {target})"
        raise BadInput(f"{name}: tensor {tensor!r} reads its external data from {location}{link}, outside the model's "
                       "folder: refused (keep the data files beside the model)")


def load_model(spec: str | os.PathLike, lazy: bool = False) -> tuple[ir.Model, Path]:
    """Parse and validate a model; returns the IR model and the resolved path. With `lazy`, the weights stay on disk
    (`symshrink.lazyweights`): each is read when a pass asks for it."""
    path = resolve_model(spec)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # onnx's note that its .onnxtxt format is experimental
            proto = slim_proto(path) if lazy else onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, json_format.ParseError, text_format.ParseError,
            onnx.parser.ParseError) as err:  # the formats onnx.load reads by the suffix: .onnx, .json, .textproto, .onnxtxt
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(err).__name__})") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    check_proto(proto, str(path), path.parent)
    if lazy:
        model = load_lazy(proto, path.parent)
        _check_external_data(model, path.parent)
        return model, path
    del proto  # parsed only to validate; onnx-ir reads the file itself and resolves external data
    model = ir.load(path)
    _check_external_data(model, path.parent)
    # rewrites and temporary sessions save copies elsewhere: external tensors must not point back here
    ir.external_data.load_to_model(model)
    return model, path


def _total_initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def external_files(path: str | os.PathLike) -> list[Path]:
    """The .onnx and the external data files its tensors name (those that exist). Read without the weights
    (`lazyweights.slim_proto`): a model of any size costs its graph's bytes here."""
    path = Path(path)
    files = {path}
    try:
        proto = slim_proto(path)
    except Exception:  # noqa: BLE001 (not binary protobuf: onnx's readers, for .json or .textproto; else the file alone)
        try:
            with warnings.catch_warnings():  # onnx warns that its text formats are experimental
                warnings.simplefilter("ignore")
                proto = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001
            return [path]
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sorted(f for f in files if f.exists())


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def claim_output(out: str | os.PathLike, *, force: bool = False, inputs: Sequence[Path] = (),
                 what: str = "output") -> Path:
    """`out` as an absolute Path, checked before any work: its folder exists and is writable; it is none of
    `inputs` (never, even with force); it is not a folder, device or other non-regular file (never); an
    existing regular file is replaced only with `force`."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise BadInput(f"{what} {out}: its folder does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {out}: its folder is not writable")
    if len(f".{out.name}.data{STAGING_TAG}{os.getpid()}.xxxxxxxx".encode()) > 255:
        raise BadInput(f"{what} {out}: the file name is too long to stage beside it (at most about 200 bytes)")
    if not out.exists() and not out.is_symlink():
        return out
    if any(_same_file(out, p) for p in inputs):
        raise BadInput(f"{what} {out} is an input of this run: give another path (the input is never modified)")
    if out.is_symlink() or not out.is_file():
        raise BadInput(f"{what} {out} exists and is not a regular file: symshrink writes only regular files")
    if not force:
        raise BadInput(f"{what} {out} exists: give --force to replace it")
    return out


def claim_outputs(outputs: dict[str, str | os.PathLike | None], *, force: bool, inputs: Sequence[Path]) -> dict[str, Path]:
    """claim_output for each named output that is given; two outputs may not share a path."""
    claimed = {what: claim_output(path, force=force, inputs=inputs, what=what)
               for what, path in outputs.items() if path is not None}
    seen: dict[Path, str] = {}
    for what, path in claimed.items():
        real = canonical(path)
        if real in seen:
            raise BadInput(f"{what} {path} is the same file as {seen[real]}")
        seen[real] = what
    return claimed


def canonical(path: Path) -> Path:
    """The path with its folder's symlinks and `..` resolved (the file itself need not exist)."""
    return Path(os.path.realpath(path.parent)) / path.name


def input_files(path: str | os.PathLike) -> list[Path]:
    """What a run reads from a path the user gave: the model and its external data, a file, or a folder's files."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    if path.suffix == ".onnx":
        return external_files(path)
    return [path] if path.exists() else []


STAGING_TAG = ".symshrink-"


def _sweep_stale_staging(folder: Path, name: str) -> None:
    """Remove staging folders of `name` left by runs that were killed: a folder of this user named exactly
    `.{name}.symshrink-{pid}.{random}` whose process is gone and which holds nothing but `name` and `name.data`."""
    pattern = re.compile(re.escape(f".{name}{STAGING_TAG}") + r"(\d{1,9})\.[A-Za-z0-9_]{8}")
    for stale in folder.glob(glob.escape(f".{name}{STAGING_TAG}") + "*"):
        match = pattern.fullmatch(stale.name)
        if not match or int(match.group(1)) == os.getpid() or stale.is_symlink() or not stale.is_dir():
            continue
        if stale.stat().st_uid != os.getuid() or {p.name for p in stale.iterdir()} - {name, f"{name}.data"}:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass  # alive, or someone else's: leave it


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` for files that are renamed into place when complete. It is removed on
    any exception and on SIGTERM (the CLI turns it into SystemExit); one left by kill -9 is swept by the next
    write to the same name (its name carries the dead process's id)."""
    _sweep_stale_staging(out.parent, out.name)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}{STAGING_TAG}{os.getpid()}.") as tmp:
            yield Path(tmp)
    except OSError as err:  # a full disk, a quota, a size limit or a read-only file system: one sentence, exit 2
        failure = write_failure(err, out)
        if failure is None:
            raise
        raise failure from None


def save_model(model: ir.Model, out: str | os.PathLike, external_data: bool | None = None, force: bool = False,
               inputs: Sequence[Path] = ()) -> Path:
    """Write atomically. Models whose weights exceed 2 GB (or when asked) get one external data file
    `<name>.data` beside the .onnx; both appear in place only after both are fully written. An existing
    `<name>.data` is replaced only with `force`, and never deleted."""
    out = Path(out).absolute()
    if out.exists() and out.is_dir():
        raise BadInput(f"{out}: is a folder")
    folder = out.parent
    if not folder.is_dir():
        raise BadInput(f"{folder}: output folder does not exist")
    use_external = external_data if external_data is not None else _total_initializer_bytes(model) >= TWO_GB - 2**24
    data_name = out.name + ".data"
    if use_external:
        claim_output(folder / data_name, force=force, inputs=inputs, what="external data file")
    if not use_external:  # weights still on disk (a lazy load) go inside the new file
        ir.external_data.load_to_model(model)
    with _staging(out) as tmp:
        tmp_model = tmp / out.name
        ir.save(model, tmp_model, external_data=data_name if use_external else None)
        if use_external:
            os.replace(tmp / data_name, folder / data_name)
        os.replace(tmp_model, out)
    return out


def write_atomically(out: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """`write(handle)` into a new file in a temporary folder beside `out` (created with the umask's mode, as
    any new file), synced and renamed over `out` when done: no partial file on failure. The caller has
    claimed `out` (claim_output)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        raise BadInput(f"{out}: its folder does not exist")
    with _staging(out) as tmp:
        path = tmp / out.name
        with open(path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path, out)
    return out


def model_bytes_on_disk(path: str | os.PathLike) -> int:
    """Bytes of the .onnx plus its external data files."""
    return sum(f.stat().st_size for f in external_files(path))
