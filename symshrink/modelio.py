"""Load and save models under the error contract: one clear line for bad input, the input is never
modified, output is written atomically (temporary files in the same folder, then rename)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from symshrink.errors import BadInput
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
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if not data.is_file():
                raise BadInput(f"missing external data file {data} (needed by tensor {value.name!r})")
            if data.stat().st_size < needed:
                raise BadInput(f"external data file {data} is truncated ({data.stat().st_size} < {needed} bytes)")


def check_proto(proto: onnx.ModelProto, name: str) -> None:
    """The checks every model gets before any work: a graph with nodes, a default opset this install runs."""
    if not proto.graph.node:
        raise BadInput(f"{name}: not an ONNX model (no graph nodes)")
    opsets = {o.domain: o.version for o in proto.opset_import}
    default = opsets.get("", opsets.get("ai.onnx"))
    if default is None or not MIN_OPSET <= default <= MAX_OPSET:
        raise BadInput(f"{name}: unsupported opset {default} (this install supports {MIN_OPSET}..{MAX_OPSET})")


def load_model(spec: str | os.PathLike, lazy: bool = False) -> tuple[ir.Model, Path]:
    """Parse and validate a model; returns the IR model and the resolved path. With `lazy`, the weights stay on disk
    (`symshrink.lazyweights`): each is read when a pass asks for it."""
    path = resolve_model(spec)
    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    try:
        proto = slim_proto(path) if lazy else onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise BadInput(f"{path}: not an ONNX model or truncated ({type(err).__name__})") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot read ({err.strerror})") from None
    check_proto(proto, str(path))
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
    """The .onnx and the external data files its tensors name (those that exist)."""
    path = Path(path)
    files = {path}
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 (not a model: the file alone)
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
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}{STAGING_TAG}{os.getpid()}.") as tmp:
        yield Path(tmp)


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
