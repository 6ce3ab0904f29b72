"""Ternary matmul with the codes kept 2-bit on the device: y = x @ W, W[r, c] = t[r, c] * scales[r / block, c].

The device layout holds the digits t + 1 16 to a uint32 word, rows of `words` words (columns padded to a
multiple of 16 with t = 0, scales with 0). Both graph forms land here: `ai.symshrink.TernaryMatMul` (base 4
or base 3, repacked to base 4) and MatMul(x, DequantizeLinear(uint2 q, scale, zero point 1)).
`ternary_matmul_reference` is the numpy reference of the CUDA kernel, with the same signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from symshrink.runtime.formats import pack_codes, unpack_ternary_function
from symshrink.runtime.kernels.launch import COLUMNS_PER_THREAD, DeviceWeight, cuda_matmul

__all__ = ["TernaryWeight", "ternary_weight", "function_weight", "ternary_matmul_reference", "ternary_matmul_cuda",
           "dense_ternary", "ERROR_BUDGET"]

# |y - y_exact| <= ERROR_BUDGET * (|x| @ |W|): float32 sums over the depth, in any order the kernel splits it
ERROR_BUDGET = 1e-5


@dataclass(frozen=True)
class TernaryWeight(DeviceWeight):
    words: np.ndarray  # uint32 [depth, words]: 16 digits t + 1 a word, digit j at bits 2j
    scales: np.ndarray  # float32 [blocks, 16 words]
    block: int  # rows per scale block
    cols: int  # N, the real columns

    def arrays(self) -> list:
        return [self.words, self.scales]

    def format_ints(self) -> tuple[int, ...]:
        """The kernel's integer arguments after the shapes."""
        return (self.block,)

    def to(self, backend, tables: dict) -> TernaryWeight:
        """On the backend's device (`tables`: arrays shared between weights; ternary weights share none)."""
        return TernaryWeight(backend.to_device(self.words), backend.to_device(self.scales), self.block, self.cols)


def ternary_weight(codes: np.ndarray, scales: np.ndarray, block: int) -> TernaryWeight:
    """Codes int8 [K, N] in {-1, 0, 1}, scales [ceil(K / block), N] -> the device layout."""
    depth, cols = codes.shape
    padded_cols = COLUMNS_PER_THREAD * math.ceil(cols / COLUMNS_PER_THREAD)
    padded = np.zeros((depth, padded_cols), np.int8)
    padded[:, :cols] = codes
    words = pack_codes(padded, 4).view("<u4").reshape(depth, padded_cols // COLUMNS_PER_THREAD)
    wide_scales = np.zeros((scales.shape[0], padded_cols), np.float32)
    wide_scales[:, :cols] = scales
    return TernaryWeight(np.ascontiguousarray(words), wide_scales, int(block), int(cols))


def function_weight(inputs: dict[str, np.ndarray], radix: int) -> TernaryWeight:
    """The weight of a TernaryMatMul node from its constant inputs (`formats.TERNARY_INPUTS`)."""
    ternary = unpack_ternary_function(inputs, radix)
    return ternary_weight(ternary.codes, ternary.scales, ternary.block)


def _codes(weight: TernaryWeight) -> np.ndarray:
    """t as float32 [K, 16 words]: digit j of a word at bits 2j, minus 1."""
    digits = (weight.words[:, :, None] >> (2 * np.arange(COLUMNS_PER_THREAD, dtype=np.uint32))) & 3
    return digits.reshape(weight.words.shape[0], -1).astype(np.float32) - 1


def dense_ternary(weight: TernaryWeight) -> np.ndarray:
    """The float32 weight [K, N] the layout stands for (numpy)."""
    depth, codes = weight.words.shape[0], _codes(weight)
    rows_scales = weight.scales[np.arange(depth) // weight.block]
    return (codes * rows_scales)[:, : weight.cols]


def ternary_matmul_reference(x: np.ndarray, weight: TernaryWeight) -> np.ndarray:
    """numpy reference of the kernel: per scale block, the sum of x * t, then times the block's scales."""
    depth, codes = weight.words.shape[0], _codes(weight)
    x = np.asarray(x, np.float32)
    y = np.zeros((*x.shape[:-1], codes.shape[1]), np.float32)
    for b, start in enumerate(range(0, depth, weight.block)):
        rows = slice(start, min(start + weight.block, depth))
        y += (x[..., rows] @ codes[rows]) * weight.scales[b]
    return y[..., : weight.cols]


def ternary_matmul_cuda(x, weight: TernaryWeight):
    """The CUDA kernel on CuPy arrays (weight on the device: `weight.to(backend, {})`)."""
    depth, words = weight.words.shape
    return cuda_matmul("ternary_matmul", x, weight, depth, words)[..., : weight.cols]
