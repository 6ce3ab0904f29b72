"""Array backends of the executor: numpy on the CPU, CuPy on an NVIDIA GPU. The op code is the same; only `xp`
(and the few functions numpy lacks, such as erf) change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType

import numpy as np

from symshrink.errors import BadInput

__all__ = ["Backend", "is_host", "cpu_backend", "cuda_backend", "get_backend", "gpu_available", "DEVICES", "ENGINES"]

DEVICES = ("cpu", "cuda")
ENGINES = ("auto", "hybrid", "executor")  # what runs a model on a device: `runtime.hybrid.open_runtime`


@dataclass(frozen=True)
class Backend:
    """`xp` is the array module; `erf` its error function; arrays move with `to_device` / `to_host`."""

    name: str
    xp: ModuleType
    erf: Callable

    def to_device(self, array: np.ndarray):
        return self.xp.asarray(array)

    def to_host(self, array) -> np.ndarray:
        return array if is_host(array) else self.xp.asnumpy(array)

    def memory_line(self) -> str | None:
        """What the device's memory pool holds now and has reserved (CuPy; None on the CPU)."""
        if self.name != "cuda":
            return None
        pool = self.xp.get_default_memory_pool()
        return f"device memory: {pool.used_bytes() / 2**20:.1f} MiB in use, {pool.total_bytes() / 2**20:.1f} MiB reserved"


def is_host(array) -> bool:
    """A numpy array (not a device array; an exact type test, so that an ndarray subclass can stand for a
    device array in tests)."""
    return type(array) is np.ndarray


@cache
def cpu_backend() -> Backend:
    from scipy.special import erf  # noqa: PLC0415

    return Backend("cpu", np, erf)


def _import_cupy() -> ModuleType | None:
    try:
        import cupy  # noqa: PLC0415
    except ImportError:
        return None
    return cupy


def gpu_available() -> bool:
    """CuPy is installed and sees a CUDA device (on a machine without one, array creation would raise)."""
    cupy = _import_cupy()
    try:
        return cupy is not None and bool(cupy.cuda.is_available())
    except Exception:  # noqa: BLE001 (a broken driver or runtime library counts as no GPU)
        return False


def cuda_backend() -> Backend:
    cupy = _import_cupy()
    if cupy is None:
        raise BadInput("--device cuda needs CuPy: pip install 'symshrink[gpu]'")
    if not gpu_available():
        raise BadInput("--device cuda: no CUDA GPU on this machine (cupy.cuda.is_available() is False)")
    from cupyx.scipy.special import erf  # noqa: PLC0415

    return Backend("cuda", cupy, erf)


def get_backend(device: str) -> Backend:
    if device not in DEVICES:
        raise BadInput(f"unknown device {device!r}: one of {', '.join(DEVICES)}")
    return cpu_backend() if device == "cpu" else cuda_backend()
