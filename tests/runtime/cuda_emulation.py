"""The CUDA kernels' source compiled as host C++ (g++) and run over an emulated grid on the CPU.

The kernels use no shared memory, shuffles or barriers, so running every (block, thread) in turn computes
exactly what the device would, up to the order of float additions, which is the same within a thread.
This tests the kernels' index arithmetic and bit unpacking on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from functools import cache
from pathlib import Path

import numpy as np

from symshrink.runtime.kernels.launch import CUDA_SOURCES, LaunchConfig

KERNELS_DIR = Path(__file__).resolve().parents[2] / "runtime" / "kernels"
# the pointer arguments between x and partial (the weight's arrays), and how many int arguments follow
WEIGHT_ARGUMENTS = {"hyper_matmul": ["const unsigned char*", "const float*", "const float*"],
                    "hyper_matmul_t": ["const unsigned char*", "const float*", "const float*"],
                    **{f"grid_matmul_b{bits}": ["const unsigned int*", "const float*", "const unsigned char*"]
                       for bits in (2, 4, 8)}}
INT_ARGUMENTS = {"hyper_matmul": 6, "hyper_matmul_t": 6,
                 **{f"grid_matmul_b{bits}": 6 for bits in (2, 4, 8)}}

HARNESS = r"""
#include <cstddef>
#include <cstring>
static inline float __int_as_float(int bits) { float value; std::memcpy(&value, &bits, sizeof value); return value; }
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __fadd_rn(a, b) ((a) + (b))
#define __fmul_rn(a, b) ((a) * (b))
#include "SOURCE"
extern "C" void launch(const unsigned int* grid, const unsigned int* block, const float* x, void** weight,
                       float* partial, const int* ints) {
    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    for (unsigned int bz = 0; bz < grid[2]; ++bz)
    for (unsigned int by = 0; by < grid[1]; ++by)
    for (unsigned int bx = 0; bx < grid[0]; ++bx)
    for (unsigned int tz = 0; tz < block[2]; ++tz)
    for (unsigned int ty = 0; ty < block[1]; ++ty)
    for (unsigned int tx = 0; tx < block[0]; ++tx) {
        blockIdx = dim3{bx, by, bz};
        threadIdx = dim3{tx, ty, tz};
        KERNEL(x, WEIGHT_ARGUMENTS, partial, INT_ARGUMENTS);
    }
}
"""


def compiler() -> str | None:
    return shutil.which("g++")


@cache
def _library(kernel: str, entry: str, build_dir: str) -> ctypes.CDLL:
    source = Path(build_dir) / f"{entry}_host.cpp"
    source.write_text(HARNESS.replace("SOURCE", str(KERNELS_DIR / CUDA_SOURCES[kernel])))
    library = Path(build_dir) / f"{entry}_host.so"
    arguments = ", ".join(f"({kind})weight[{i}]" for i, kind in enumerate(WEIGHT_ARGUMENTS[kernel]))
    ints = ", ".join(f"ints[{i}]" for i in range(INT_ARGUMENTS[kernel]))
    subprocess.run([compiler(), "-O2", "-shared", "-fPIC", "-std=c++17", f"-DKERNEL={entry}",
                    f"-DWEIGHT_ARGUMENTS={arguments}", f"-DINT_ARGUMENTS={ints}", str(source), "-o", str(library)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(library))


def host_launcher(build_dir: Path):
    """A launcher for `launch.sliced_matmul` that runs the kernel's C++ on the CPU."""

    def launch(kernel: str, config: LaunchConfig, args: tuple) -> None:
        count = INT_ARGUMENTS[kernel]
        x, *weight, partial = args[:-count]
        assert len(args[-count:]) == count and all(isinstance(i, int) for i in args[-count:])
        for array in (x, *weight, partial):
            assert array.flags.c_contiguous
        pointer = ctypes.c_void_p
        weight_pointers = (pointer * len(weight))(*(a.ctypes.data for a in weight))
        _library(kernel, config.entry(kernel), str(build_dir)).launch(
            np.array(config.grid, np.uint32).ctypes.data_as(pointer), np.array(config.block, np.uint32).ctypes.data_as(pointer),
            x.ctypes.data_as(pointer), weight_pointers, partial.ctypes.data_as(pointer),
            np.array(args[-count:], np.int32).ctypes.data_as(pointer))

    return launch
