"""The model zoo: real models and data that ship inside PyPI/Debian packages, behind one registry.

A `ZooModel` says how to materialise an .onnx file from its installed package (cached under
`cache_dir()`), which data set calibrates it and which task measures it. Data sets and tasks are
global: a data set builds feeds for whatever inputs a model declares, so `--data lee` works for a
zoo model and for a compressed copy of it alike.
"""

from __future__ import annotations

from symshrink.models.types import (
    Dataset,
    Feeds,
    InputSpec,
    Split,
    Task,
    ZooModel,
    cache_dir,
)

__all__ = [
    "InputSpec", "Feeds", "Split", "Dataset", "Task", "ZooModel", "cache_dir",
    "ZOO", "DATASETS", "TASKS", "get_model", "get_task",
]


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


def get_task(name: str) -> Task:
    return _lookup(TASKS, "task", name)
