"""Plain data types shared by the model zoo modules (no imports of zoo members, so no cycles).

`symshrink.models.registry` re-exports everything here; `text` and `vision` import from this module
because the registry's body imports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["InputSpec", "Feeds", "Split", "Dataset", "Task", "ZooModel", "cache_dir"]

Feeds = dict[str, np.ndarray]
Split = Literal["calib", "eval"]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype name and shape (ints, or strings/None for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None  # None: the model leaves the rank open


@dataclass(frozen=True)
class Dataset:
    """Real samples for a model's inputs. `load(inputs, split, n)` returns a list of feeds (batches).

    `split="calib"` and `split="eval"` never share a sample. `n` caps the number of samples
    (None: the data set's default). Raises `BadInput` when the inputs do not fit the data.
    """

    name: str
    description: str
    load: Callable[[Sequence[InputSpec], Split, int | None], list[Feeds]]


@dataclass(frozen=True)
class Task:
    """A task metric. `evaluate(session)` runs an onnxruntime session over the task's evaluation
    data and returns the metric (float)."""

    name: str
    description: str
    higher_is_better: bool
    evaluate: Callable[[object], float]


@dataclass(frozen=True)
class ZooModel:
    """A real model. `materialise(cache)` writes (once) and returns the .onnx path inside `cache`."""

    name: str
    description: str
    source: str  # "package==version" it comes from
    params: str  # e.g. "17.2 M"
    extra: str | None  # pip extra needed to materialise it (None: core install suffices)
    calib: str  # default calibration data set name
    task: str  # task metric name
    reference_metric: float  # fp32 figure from shared/docs/models.md
    materialise: Callable[[Path], Path]


def cache_dir() -> Path:
    """Where materialised models live: $SYMSHRINK_CACHE or ~/.cache/symshrink."""
    root = Path(os.environ.get("SYMSHRINK_CACHE", Path.home() / ".cache" / "symshrink"))
    root.mkdir(parents=True, exist_ok=True)
    return root
