"""A stand-in GPU for the executor's placement logic, on the CPU: "device" arrays are an ndarray subclass,
and like CuPy, any operation that mixes them with plain numpy (host) arrays raises. The executor then
runs as it would with `--device cuda` (host shape arithmetic, uploads, device ops), numerics aside."""

from __future__ import annotations

import functools
import types

import numpy as np
from scipy.special import erf

from symshrink.runtime.backend import Backend

TRANSFERS = {"asarray", "array", "ascontiguousarray"}  # explicit host -> device copies, as in CuPy


class DeviceArray(np.ndarray):
    """An array that refuses host arrays as operands (CuPy raises TypeError for them too)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _device_call(getattr(ufunc, method), inputs, kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        return _device_call(func, args, kwargs)


def _check(value) -> None:
    if type(value) is np.ndarray and value.ndim > 0:
        raise TypeError(f"a host array {value.shape} {value.dtype} in a device operation")
    if isinstance(value, list | tuple):
        for item in value:
            _check(item)


def _plain(value):
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, dict):  # keyword arguments, out= among them
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _device(value):
    if isinstance(value, np.ndarray | np.generic) and not isinstance(value, DeviceArray):
        return np.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    if isinstance(value, list):
        return [_device(v) for v in value]
    return value


def _device_call(func, args, kwargs):
    _check(args)
    _check(list(kwargs.values()))
    return _device(func(*_plain(args), **_plain(kwargs)))


def _namespace_function(name: str, func):
    @functools.wraps(func)
    def call(*args, **kwargs):
        if name in TRANSFERS:
            return _device(func(*_plain(args), **_plain(kwargs)))
        return _device_call(func, args, kwargs)
    return call


class StrictNamespace(types.SimpleNamespace):
    """numpy's functions on device arrays; dtypes and constants as they are. `downloads` counts the copies
    back to the host (each one a wait on a real device)."""

    downloads = 0

    def __getattr__(self, name: str):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type) and not isinstance(attr, np.dtype):
            return _namespace_function(name, attr)
        return attr

    def asnumpy(self, array) -> np.ndarray:
        self.downloads += 1
        return np.array(array.view(np.ndarray) if isinstance(array, DeviceArray) else array)


def strict_backend() -> Backend:
    return Backend("strict-device", StrictNamespace(), erf)
