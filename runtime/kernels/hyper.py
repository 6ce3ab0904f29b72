"""Hyperfunction-coded matmul with the indices kept packed on the device: y = x @ W, each pair
(W[r, c], W[r, c + 1]) = table[index], table = c + L * (u_j s_k) per tensor (float32, the ONNX body's order).

Fused for `HyperDecode` (per tensor, pairs) -> MatMul with W [K, N], N a multiple of 16: a row of eight
indices is then 16 columns of one weight row, and the packed rows are used as they are.
`hyper_matmul_reference` is the numpy reference of the CUDA kernel, with the same signature.
An embedding table read by Gather (axis 0) decodes only the rows gathered (`hyper_gather`, array code that
runs as it is on numpy or CuPy arrays).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from symshrink.passes.hyper_codec import row_unpacking, unpack_rows
from symshrink.runtime.kernels.launch import COLUMNS_PER_THREAD, cuda_launcher, device_target_blocks, sliced_matmul

__all__ = ["HyperWeight", "function_weight", "hyper_matmul_reference", "hyper_matmul_cuda", "dense_hyper",
           "ERROR_BUDGET", "fusable", "hyper_gather"]

# |y - y_exact| <= ERROR_BUDGET * (|x| @ |W|): float32 sums over the depth, in any order the kernel splits it
ERROR_BUDGET = 1e-5
PAIR = 2


@dataclass(frozen=True)
class HyperWeight:
    packed: np.ndarray  # uint8 [K * N / 16, bits]: rows of eight indices, pair p = (r N + c) / 2
    table: np.ndarray  # float32 [entries, 2]: decoded pairs
    bits: int
    depth: int  # K
    cols: int  # N, a multiple of 16

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.table.nbytes)

    def to(self, backend) -> HyperWeight:
        return HyperWeight(backend.to_device(self.packed), backend.to_device(self.table), self.bits, self.depth,
                           self.cols)


def decoded_table(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """c + L * T, T[j + codes k] = offsets[j] band_scales[k]: the per-tensor HyperDecode body's table."""
    dims = inputs["offsets"].shape[1]
    table = (inputs["band_scales"].reshape(-1, 1, 1) * inputs["offsets"]).reshape(-1, dims)
    return (inputs["centres"] + table * inputs["spans"]).astype(np.float32)


def fusable(inputs: dict[str, np.ndarray]) -> str | None:
    """Why a per-tensor HyperDecode cannot feed the kernel (None: it can)."""
    shape = [int(v) for v in inputs["shape"]]
    if inputs["offsets"].shape[1] != PAIR:
        return "the kernel decodes pairs, not triples"
    if len(shape) != 2 or shape[1] % COLUMNS_PER_THREAD:
        return f"the kernel needs a [K, N] weight with N a multiple of {COLUMNS_PER_THREAD}; it is {shape}"
    return None


def function_weight(inputs: dict[str, np.ndarray]) -> HyperWeight:
    """The weight of a per-tensor HyperDecode node from its constant inputs (`hyper_function.INPUTS`)."""
    depth, cols = (int(v) for v in inputs["shape"])
    bits = inputs["packed"].shape[1]
    if inputs["packed"].shape[0] * 8 * PAIR < depth * cols:
        raise ValueError("HyperDecode: fewer packed indices than the shape needs")
    return HyperWeight(np.ascontiguousarray(inputs["packed"]), decoded_table(inputs), bits, depth, cols)


def dense_hyper(weight: HyperWeight) -> np.ndarray:
    """The float32 weight [K, N] (numpy)."""
    indices = unpack_rows(weight.packed, weight.bits, weight.depth * weight.cols // PAIR)
    return weight.table[indices].reshape(weight.depth, weight.cols)


def hyper_matmul_reference(x: np.ndarray, weight: HyperWeight) -> np.ndarray:
    """numpy reference of the kernel: the indices cut from their rows, the pairs gathered, then x @ W."""
    return np.asarray(x, np.float32) @ dense_hyper(weight)


def hyper_gather(indices, weight: HyperWeight):
    """W[indices] (Gather on axis 0, negative indices from the end), decoding only the rows it reads."""
    xp = np if isinstance(indices, np.ndarray) else sys.modules["cupy"]
    per_row = weight.cols // COLUMNS_PER_THREAD  # packed rows of eight indices a weight row
    rows = xp.asarray(indices, dtype=xp.int64) % weight.depth
    packed_rows = (rows.reshape(-1, 1) * per_row + xp.arange(per_row)).reshape(-1)
    byte_weights, shifts, modulus = (xp.asarray(a) for a in row_unpacking(weight.bits))
    index = (weight.packed[packed_rows].astype(xp.int32) @ byte_weights) // shifts % modulus
    return weight.table[index.reshape(-1)].reshape(*rows.shape, weight.cols)


def hyper_matmul_cuda(x, weight: HyperWeight):
    """The CUDA kernel on CuPy arrays (weight on the device: `weight.to(backend)`)."""
    import cupy  # noqa: PLC0415

    words = weight.cols // COLUMNS_PER_THREAD
    return sliced_matmul(cupy, cuda_launcher, "hyper_matmul", x, (weight.packed, weight.table), weight.depth, words,
                         weight.bits, device_target_blocks())
