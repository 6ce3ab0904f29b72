"""Calibration and evaluation feeds: a zoo data set name, an .npz (input name -> array) or a folder
of <input name>.npy files. Random inputs only when asked for explicitly."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from symshrink.errors import BadInput
from symshrink.models.types import Feeds, InputSpec

__all__ = ["load_feeds", "check_feeds", "random_feeds", "split_holdout"]

logger = logging.getLogger(__name__)
BATCH = 64  # rows per feed when a file gives one large batch


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise BadInput(f"{path}: folder has no .npy files")
        try:
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        except ValueError as err:
            raise BadInput(f"{path}: unreadable .npy file ({err})") from None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise BadInput(f"{path}: not a readable .npz file ({err})") from None


def _split_rows(arrays: dict[str, np.ndarray]) -> list[Feeds]:
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise BadInput(f"calibration arrays disagree on the batch size: {sorted(rows)}")
    (n,) = rows
    return [{k: v[i:i + BATCH] for k, v in arrays.items()} for i in range(0, n, BATCH)]


def check_feeds(feeds: Sequence[Feeds], inputs: Sequence[InputSpec]) -> None:
    """Names, ranks, fixed dimensions and dtypes must fit the model's inputs."""
    if not feeds:
        raise BadInput("no calibration samples")
    wanted = {spec.name: spec for spec in inputs}
    for feed in feeds[:1]:
        missing = sorted(set(wanted) - set(feed))
        extra = sorted(set(feed) - set(wanted))
        if missing or extra:
            raise BadInput(f"calibration data does not fit the model: missing inputs {missing}, unknown {extra}")
    for feed in feeds:
        for name, array in feed.items():
            spec = wanted[name]
            if array.ndim != len(spec.shape):
                raise BadInput(f"input {name!r}: rank {array.ndim}, model expects shape {list(spec.shape)}")
            for got, want in zip(array.shape, spec.shape):
                if isinstance(want, int) and want > 0 and got != want:
                    raise BadInput(f"input {name!r}: shape {list(array.shape)}, model expects {list(spec.shape)}")
            if np.dtype(spec.dtype) != array.dtype:
                raise BadInput(f"input {name!r}: dtype {array.dtype}, model expects {spec.dtype}")


def random_feeds(inputs: Sequence[InputSpec], n: int, seed: int = 0) -> list[Feeds]:
    """Gaussian (float) or small non-negative integer inputs; dynamic axes become 1 (batch) or 16."""
    logger.warning("calibrating on RANDOM inputs: the reduced model fits noise, not your data")
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for spec in inputs:
            shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else 16) for i, d in enumerate(spec.shape)]
            if np.dtype(spec.dtype).kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                feed[spec.name] = rng.integers(0, 2 if "mask" in spec.name else 100, shape).astype(spec.dtype)
        feeds.append(feed)
    return feeds


def load_feeds(spec: str, inputs: Sequence[InputSpec], split: str = "calib", samples: int | None = None) -> list[Feeds]:
    """Feeds from a zoo data set name, an .npz file or a folder of .npy files."""
    path = Path(spec)
    if path.exists():
        feeds = _split_rows(_read_arrays(path))
        if samples is not None:
            feeds = _limit_rows(feeds, samples)
    else:
        from symshrink.models.registry import DATASETS  # noqa: PLC0415

        if spec not in DATASETS:
            raise BadInput(f"{spec}: no such file, and not a zoo data set ({', '.join(sorted(DATASETS))})")
        feeds = DATASETS[spec].load(list(inputs), split, samples)
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
