"""Small image data: Fashion-MNIST (Debian `dataset-fashion-mnist`) and scikit-learn's `load_digits`.

Fashion-MNIST comes as IDX gz files under `/usr/share/datasets/fashion-mnist` (override with
$SYMSHRINK_FMNIST_DIR). Calibration samples come from the 60k train images, evaluation samples
from the 10k test images, so the two never share a sample. Digits are split by a fixed permutation
into disjoint halves. The digits (1797 8x8 images, the test part of the UCI "Optical Recognition of
Handwritten Digits" set) ship with scikit-learn and with no package of their own on PyPI or Debian, so
they need the zoo-data extra: scikit-learn is imported only when they are used.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from symshrink.errors import BadInput
from symshrink.extras import require

__all__ = [
    "FMNIST_DIR", "fmnist_dir", "load_fmnist", "load_digits_split", "FMNIST_PACKAGE",
]

FMNIST_PACKAGE = "dataset-fashion-mnist"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DIGITS_SEED = 0


def fmnist_dir() -> Path:
    """The folder holding the Fashion-MNIST IDX files; raises BadInput when it is missing."""
    root = Path(os.environ.get("SYMSHRINK_FMNIST_DIR", FMNIST_DIR))
    if not (root / _FILES["test"][0]).is_file():
        raise BadInput(
            f"Fashion-MNIST not found in {root}: install the Debian package {FMNIST_PACKAGE} "
            "(apt-get install dataset-fashion-mnist) or set SYMSHRINK_FMNIST_DIR"
        )
    return root


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@functools.lru_cache(maxsize=2)
def load_fmnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `part` ("train" 60k or "test" 10k): uint8 images [n, 28, 28] and int64 labels."""
    if part not in _FILES:
        raise BadInput(f"unknown Fashion-MNIST part {part!r}; known: train, test")
    root = fmnist_dir()
    images = _read_idx(root / _FILES[part][0])
    labels = _read_idx(root / _FILES[part][1]).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = require("sklearn.datasets", "the digits data").load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SEED).permutation(len(y))
    return x, y, perm


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits scaled to [0, 1], [n, 64]: "train"/"calib" is the first half of a fixed
    permutation, "test"/"eval" the second half (898 + 899 samples, disjoint)."""
    x, y, perm = _digits()
    half = len(y) // 2
    if split in ("train", "calib"):
        idx = perm[:half]
    elif split in ("test", "eval"):
        idx = perm[half:]
    else:
        raise BadInput(f"unknown digits split {split!r}; known: calib, eval")
    return x[idx], y[idx]
