"""The model zoo: real models and data that ship inside PyPI/Debian packages, behind one registry.

A `ZooModel` says how to materialise an .onnx file from its installed package (cached under
`cache_dir()`), which data set calibrates it and which task measures it. Data sets and tasks are
global: a data set builds feeds for whatever inputs a model declares, so `--data lee` works for a
zoo model and for a compressed copy of it alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "InputSpec", "Feeds", "Dataset", "Task", "ZooModel", "cache_dir",
    "ZOO", "DATASETS", "TASKS", "get_model", "get_dataset", "get_task",
]

Feeds = dict[str, np.ndarray]
Split = Literal["calib", "eval"]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype name and shape (ints, or strings/None for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


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


def _collect():
    from symshrink.models import text, vision  # noqa: PLC0415 (registry imports its members lazily)

    zoo = {m.name: m for mod in (text, vision) for m in mod.MODELS}
    datasets = {d.name: d for mod in (text, vision) for d in mod.DATASETS}
    tasks = {t.name: t for mod in (text, vision) for t in mod.TASKS}
    return zoo, datasets, tasks


ZOO, DATASETS, TASKS = _collect()


def _lookup(table: dict, kind: str, name: str):
    from symshrink.errors import BadInput  # noqa: PLC0415

    if name not in table:
        raise BadInput(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def get_model(name: str) -> ZooModel:
    return _lookup(ZOO, "zoo model", name)


def get_dataset(name: str) -> Dataset:
    return _lookup(DATASETS, "data set", name)


def get_task(name: str) -> Task:
    return _lookup(TASKS, "task", name)
