"""Calibration and evaluation feeds. A feed is one complete model run ({input name: array}); a source is
a zoo data set name, an .npz (input name -> array) or a folder of <input name>.npy files (split on axis 0
into batches, or with layout "runs" one run per index of a leading run axis), a folder of one .npz per
run, an iterable of feed dicts, or an onnxruntime CalibrationDataReader. Every feed is checked against
the model's inputs (names, ranks, fixed dimensions, dtypes, finite values) before any work. Random
inputs only when asked for explicitly."""

from __future__ import annotations

import itertools
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from symshrink.errors import BadInput
from symshrink.models.types import Feeds, InputSpec

__all__ = ["load_feeds", "check_feeds", "random_feeds", "split_holdout", "LAYOUTS", "MAX_RANDOM_FEEDS",
           "MAX_RANDOM_ELEMENTS"]

logger = logging.getLogger(__name__)
BATCH = 64  # rows per feed when a file gives one large batch
LAYOUTS = ("batch", "runs")  # how arrays in a file become feeds: split on axis 0, or one run per leading index
MAX_RANDOM_FEEDS = 4096  # random feeds are for smoke tests; more would only fill memory
MAX_RANDOM_ELEMENTS = 2**26  # elements of one random run (256 MB of float32): larger declared inputs are refused


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if not zipfile.is_zipfile(path) and magic != b"\x93NUMPY":  # else np.load guesses a pickle and says so
            raise ValueError("not a zip archive of .npy arrays, as numpy.savez writes")
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("an .npy array, not an .npz archive of named arrays")
            arrays = {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise BadInput(f"{path}: not a readable .npz file ({err})") from None
    if not arrays:
        raise BadInput(f"{path}: the .npz file holds no arrays (give one array per model input)")
    return arrays


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise BadInput(f"{path}: folder has no .npy files (nor .npz files, one per run)")
        try:
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        except (ValueError, OSError, EOFError) as err:
            raise BadInput(f"{path}: unreadable .npy file ({type(err).__name__}: {err})") from None
    return _read_npz(path)


def _file_feeds(path: Path, layout: str, samples: int | None, batch: int | None = None) -> list[Feeds]:
    """Feeds from a file or folder, at most `samples` rows (batches) or runs; a folder of .npz files is one run
    per file, whatever the layout. `batch`: the model's fixed batch size (rows per feed), if it has one."""
    if layout not in LAYOUTS:
        raise BadInput(f"unknown calibration layout {layout!r}; available: {', '.join(LAYOUTS)}")
    if not path.is_file() and not path.is_dir():  # a pipe or a device: a read could block or never end
        raise BadInput(f"{path}: not a regular file or folder: give an .npz file or a folder of .npy files")
    if path.is_dir() and any(path.glob("*.npz")):
        return [_read_npz(f) for f in sorted(path.glob("*.npz"))[:samples]]
    arrays = _read_arrays(path)
    if layout == "runs":
        return _split_runs(arrays)[:samples]
    feeds = _split_rows(arrays, batch)
    return feeds if samples is None else _limit_rows(feeds, samples)


def _fixed_batch(inputs: Sequence[InputSpec]) -> int | None:
    """The batch size every input fixes on axis 0 (None: some input leaves it open, or they differ)."""
    sizes = {spec.shape[0] if spec.shape else None for spec in inputs}
    (size,) = sizes if len(sizes) == 1 else (None,)
    return size if isinstance(size, int) and size > 0 else None


def _split_runs(arrays: dict[str, np.ndarray]) -> list[Feeds]:
    runs = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(runs) != 1 or 0 in runs:
        raise BadInput(f"layout runs: every array needs the same leading run axis, got lengths {sorted(runs)}")
    (n,) = runs
    return [{k: np.asarray(v[i]) for k, v in arrays.items()} for i in range(n)]  # a run of 0-d arrays, not scalars


def _split_rows(arrays: dict[str, np.ndarray], batch: int | None = None) -> list[Feeds]:
    """Feeds of BATCH rows (the last one shorter), or of exactly `batch` rows (a model's fixed batch size: the rows
    left over are dropped)."""
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if rows == {0} and all(a.ndim for a in arrays.values()):
        raise BadInput(f"the calibration arrays have no rows (shapes {[list(a.shape) for a in arrays.values()]})")
    if len(rows) != 1 or 0 in rows:
        raise BadInput(f"calibration arrays disagree on the batch size (axis 0): {sorted(rows)}; for inputs that are "
                       "scalars or not batched on axis 0, give one run per leading index (--calib-layout runs) or a "
                       "folder of one .npz per run")
    (n,) = rows
    if batch is None:
        return [{k: v[i:i + BATCH] for k, v in arrays.items()} for i in range(0, n, BATCH)]
    if n < batch:
        raise BadInput(f"the calibration arrays have {n} rows, fewer than the model's fixed batch size {batch}")
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n - batch + 1, batch)]


def check_feeds(feeds: Sequence[Feeds], inputs: Sequence[InputSpec]) -> None:
    """Names, ranks, fixed dimensions, dtypes and finite values must fit the model's inputs."""
    if not feeds:
        raise BadInput("no calibration samples")
    wanted = {spec.name: spec for spec in inputs}
    for i, feed in enumerate(feeds):
        missing = sorted(set(wanted) - set(feed))
        extra = sorted(set(feed) - set(wanted))
        if missing or extra:
            raise BadInput(f"calibration feed {i} does not fit the model: missing inputs {missing}, unknown {extra}")
        for name, array in feed.items():
            spec = wanted[name]
            if not isinstance(array, np.ndarray):
                raise BadInput(f"input {name!r}: a numpy array, not {type(array).__name__}")
            if spec.shape is None:
                pass  # any rank
            elif array.ndim != len(spec.shape):
                hint = " (if axis 0 counts runs: --calib-layout runs)" if array.ndim == len(spec.shape) + 1 else ""
                raise BadInput(f"input {name!r}: rank {array.ndim}, model expects shape {list(spec.shape)}{hint}")
            _check_no_empty_dimension(spec)
            for got, want in zip(array.shape, spec.shape or ()):
                if isinstance(want, int) and want > 0 and got != want:
                    raise BadInput(f"input {name!r}: shape {list(array.shape)}, model expects {list(spec.shape)}")
            if _dtype(spec) != array.dtype:
                raise BadInput(f"input {name!r}: dtype {array.dtype}, model expects {spec.dtype}")
            if array.size == 0:
                raise BadInput(f"input {name!r}: calibration feed {i} is empty (shape {list(array.shape)})")
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise BadInput(f"input {name!r}: calibration feed {i} has NaN or infinite values")


def _dtype(spec: InputSpec) -> np.dtype:
    """The numpy dtype of a model input (BadInput for types symshrink cannot feed, e.g. bfloat16)."""
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        raise BadInput(f"input {spec.name!r} has type {spec.dtype}, which symshrink cannot feed: give a model whose "
                       "inputs are float, integer or bool tensors") from None


def _check_no_empty_dimension(spec: InputSpec) -> None:
    if spec.shape is not None and 0 in spec.shape:
        raise BadInput(f"input {spec.name!r} declares shape {list(spec.shape)}, a dimension of size 0: there is "
                       "nothing to calibrate on")


def random_feeds(inputs: Sequence[InputSpec], n: int, seed: int = 0) -> list[Feeds]:
    """Gaussian (float) or small non-negative integer inputs; dynamic axes become 1 (batch) or 16. Checked before
    anything is allocated: ranks, sizes (at most MAX_RANDOM_ELEMENTS a feed) and types."""
    if not 1 <= n <= MAX_RANDOM_FEEDS:
        raise BadInput(f"random feeds: between 1 and {MAX_RANDOM_FEEDS}, not {n}")
    shapes = {}
    for spec in inputs:
        if spec.shape is None:
            raise BadInput(f"input {spec.name!r} has no fixed rank in the model: random inputs cannot be made for it; "
                           "give calibration data")
        _check_no_empty_dimension(spec)
        _dtype(spec)
        shapes[spec.name] = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(spec.shape)]
    elements = sum(math.prod(shape) for shape in shapes.values())
    if elements > MAX_RANDOM_ELEMENTS:
        declared = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise BadInput(f"the model's inputs declare {elements} elements a run ({declared}), too large for random inputs "
                       f"(at most {MAX_RANDOM_ELEMENTS}): give calibration data")
    logger.warning("calibrating on RANDOM inputs: the reduced model fits noise, not your data")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for spec in inputs:
            shape = shapes[spec.name]
            if np.dtype(spec.dtype).kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feed[spec.name] = rng.integers(0, 2 if "mask" in spec.name else 100, shape).astype(spec.dtype)
        feeds.append(feed)
    return feeds


def _feeds_of(source: object, samples: int | None) -> list[Feeds]:
    """An iterable of {input name: array} dicts, or an onnxruntime CalibrationDataReader (get_next until None);
    at most `samples` of them are read."""
    if hasattr(source, "get_next"):
        runs = iter(source.get_next, None)
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Mapping)):
        runs = iter(source)
    else:
        raise BadInput(f"calibration: a zoo data set name, a path (.npz or folder), an iterable of feed dicts or a "
                       f"CalibrationDataReader, not {type(source).__name__}")
    feeds = []
    for i, run in enumerate(itertools.islice(runs, samples)):
        if not isinstance(run, Mapping):
            raise BadInput(f"calibration feed {i}: a dict of input name -> array, not {type(run).__name__}")
        try:
            feeds.append({str(k): np.asarray(v) for k, v in run.items()})
        except ValueError as err:
            raise BadInput(f"calibration feed {i}: not arrays ({err})") from None
    return feeds


def load_feeds(source: object, inputs: Sequence[InputSpec], split: str = "calib", samples: int | None = None,
               layout: str = "batch") -> list[Feeds]:
    """Feeds from any calibration source (see the module docstring), checked against `inputs`. `samples` caps
    the rows (layout batch) or the runs."""
    if samples is not None and samples < 1:
        raise BadInput(f"the number of samples must be positive, not {samples}")
    if isinstance(source, (str, os.PathLike)) and Path(source).exists():
        feeds = _file_feeds(Path(source), layout, samples, _fixed_batch(inputs))
    elif isinstance(source, str):
        from symshrink.models.registry import DATASETS  # noqa: PLC0415

        if source not in DATASETS:
            raise BadInput(f"{source}: no such file, and not a zoo data set ({', '.join(sorted(DATASETS))})")
        feeds = DATASETS[source].load(list(inputs), split, samples)
    elif isinstance(source, os.PathLike):
        raise BadInput(f"{source}: no such file or folder")
    else:
        feeds = _feeds_of(source, samples)
    check_feeds(feeds, inputs)
    return feeds


def _limit_rows(feeds: list[Feeds], samples: int) -> list[Feeds]:
    kept, total = [], 0
    for feed in feeds:
        if total >= samples:
            break
        take = min(samples - total, next(iter(feed.values())).shape[0])
        kept.append({k: v[:take] for k, v in feed.items()})
        total += take
    return kept


def split_holdout(feeds: list[Feeds], fraction: float = 0.2) -> tuple[list[Feeds], list[Feeds]]:
    """(fit, held-out): the last `fraction` of feeds (at least one) is held out for verification.
    A single feed is split along its batch axis."""
    if len(feeds) == 1:
        (feed,) = feeds
        rows = next(iter(feed.values())).shape[0]
        if rows < 2:
            raise BadInput("need at least 2 calibration samples (one to fit, one to verify)")
        cut = rows - max(1, int(rows * fraction))
        return [{k: v[:cut] for k, v in feed.items()}], [{k: v[cut:] for k, v in feed.items()}]
    cut = len(feeds) - max(1, int(len(feeds) * fraction))
    return feeds[:cut], feeds[cut:]
