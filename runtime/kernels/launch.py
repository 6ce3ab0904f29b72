"""Launching the row-sliced matmul kernels: the grid (a pure function, shared by the GPU path and the CPU
emulation in the tests), the CuPy module cache, and the fixed-order sum of the slices' partial results.

The kernels take (x, codes..., partial, rows_x, depth, threads a row of x needs, <format ints>, rows_per_slice):
a thread owns `columns` output columns (`GEOMETRY`) and a tile of rows of x (`TILE_ROWS`), over a slice of the depth; the
slices make enough blocks to fill the device at batch 1, and their partials are added afterwards in a fixed
order (deterministic).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

__all__ = ["LaunchConfig", "launch_config", "sliced_matmul", "cuda_matmul", "cuda_source", "cuda_code", "CUDA_SOURCES",
           "cuda_launcher", "DeviceWeight", "TILE_ROWS", "COLUMNS_PER_THREAD", "device_target_blocks", "GEOMETRY",
           "NVRTC_OPTIONS"]

TILE_ROWS = (1, 4)  # rows of x a thread carries: the kernels' entry points <kernel>_m1 and <kernel>_m4
COLUMNS_PER_THREAD = 16
THREADS = 128
MIN_ROWS_PER_SLICE = 16
BLOCKS_PER_SM = 4
NVRTC_OPTIONS = ("--std=c++17",)  # CuPy adds the architecture and -ftz=true
INCLUDE = re.compile(r'^#include "([a-z_]+\.cuh)"$', re.MULTILINE)
CUDA_SOURCES = {"hyper_matmul": "hyper_matmul.cu", "hyper_matmul_t": "hyper_matmul.cu",
                **{f"grid_matmul_b{bits}": "grid_matmul.cu" for bits in (2, 4, 8)}}


class DeviceWeight:
    """A weight in a kernel's layout: `arrays()` as the kernel takes them (after x), `format_ints()` after the shapes."""

    def arrays(self) -> list:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays())


@dataclass(frozen=True)
class Geometry:
    columns: int  # output columns a thread owns
    depth_step: int  # a slice of the depth is a multiple of this


GEOMETRY = {"hyper_matmul": Geometry(COLUMNS_PER_THREAD, 1), "hyper_matmul_t": Geometry(1, COLUMNS_PER_THREAD),
            **{f"grid_matmul_b{bits}": Geometry(32 // bits, 1) for bits in (2, 4, 8)}}  # a word's codes


@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    rows_per_slice: int
    tile: int  # rows of x a thread carries

    def entry(self, kernel: str) -> str:
        """The kernel's entry point for this tile."""
        return f"{kernel}_m{self.tile}"

    @property
    def slices(self) -> int:
        return self.grid[1]


def launch_config(rows_x: int, depth: int, workers: int, target_blocks: int, depth_step: int = 1) -> LaunchConfig:
    """`workers` threads across the output columns; slices of the depth (multiples of `depth_step`) until
    about `target_blocks` blocks run."""
    tile = TILE_ROWS[0] if rows_x == 1 else TILE_ROWS[1]  # batch 1 wastes no work on empty rows
    threads = min(THREADS, 32 * math.ceil(workers / 32))
    column_blocks, row_tiles = math.ceil(workers / threads), math.ceil(rows_x / tile)
    wanted = max(1, math.ceil(target_blocks / (column_blocks * row_tiles)))
    rows_per_slice = max(MIN_ROWS_PER_SLICE, math.ceil(depth / wanted))
    rows_per_slice = depth_step * math.ceil(rows_per_slice / depth_step)
    slices = math.ceil(depth / rows_per_slice)
    # grid.x runs the row tiles' column blocks one after another (2^31 - 1 blocks); y and z stop at 65535
    return LaunchConfig((column_blocks * row_tiles, slices, 1), (threads, 1, 1), rows_per_slice, tile)


Launcher = Callable[[str, LaunchConfig, tuple], None]


def sliced_matmul(xp, launch: Launcher, kernel: str, x, codes: tuple, depth: int, workers: int,
                  format_ints: tuple[int, ...], target_blocks: int):
    """y [..., workers * columns a thread] = x [..., depth] @ W through `kernel`, the slices' partials added
    in order."""
    geometry = GEOMETRY[kernel]
    if x.shape[-1] != depth:
        raise ValueError(f"{kernel}: x has {x.shape[-1]} columns, the weight {depth} rows")
    lead, columns = x.shape[:-1], workers * geometry.columns
    x2d = xp.ascontiguousarray(x.reshape(-1, depth), dtype=xp.float32)
    rows_x = x2d.shape[0]
    if rows_x == 0:
        return xp.zeros((*lead, columns), xp.float32)
    config = launch_config(rows_x, depth, workers, target_blocks, geometry.depth_step)
    partial = xp.empty((config.slices, rows_x, columns), xp.float32)
    launch(kernel, config, (x2d, *codes, partial, rows_x, depth, workers, *format_ints, config.rows_per_slice))
    return (partial[0] if config.slices == 1 else partial.sum(axis=0)).reshape(*lead, columns)


def cuda_source(kernel: str) -> Path:
    """The CUDA file of a kernel (it includes slices.cuh from the same folder)."""
    return Path(__file__).parent / CUDA_SOURCES[kernel]


def cuda_code(kernel: str) -> str:
    """The kernel's source with its headers pasted in: CuPy's cache of compiled modules is keyed by the source
    text, so an edited header must change it."""
    folder = Path(__file__).parent
    return INCLUDE.sub(lambda line: (folder / line.group(1)).read_text(), cuda_source(kernel).read_text())


@cache
def _cuda_function(kernel: str, entry: str):
    import cupy  # noqa: PLC0415

    return cupy.RawModule(code=cuda_code(kernel), options=NVRTC_OPTIONS).get_function(entry)


def cuda_launcher(kernel: str, config: LaunchConfig, args: tuple) -> None:
    """Launch on the current CuPy device; integers become int32 kernel arguments (the kernels take int)."""
    converted = tuple(np.int32(a) if isinstance(a, int | np.integer) else a for a in args)
    _cuda_function(kernel, config.entry(kernel))(config.grid, config.block, converted)


def cuda_matmul(kernel: str, x, weight, depth: int, workers: int):
    """`sliced_matmul` of CuPy arrays on the current device (the weight's arrays and integers as the kernel
    takes them)."""
    import cupy  # noqa: PLC0415

    return sliced_matmul(cupy, cuda_launcher, kernel, x, tuple(weight.arrays()), depth, workers,
                         weight.format_ints(), device_target_blocks())


@cache
def device_target_blocks() -> int:
    import cupy  # noqa: PLC0415

    return BLOCKS_PER_SM * int(cupy.cuda.Device().attributes["MultiProcessorCount"])
