"""Integer-grid matmul with the codes kept packed on the device: y = x @ W, W[r, c] = (q - z) * scales per block of
rows, q of 2, 4 or 8 bits: onnxruntime's MatMulNBits (y = a @ B^T), repacked at load along the output columns, and
ternary weights (`kernels.ternary`: 2-bit digits t + 1, z = 1).

The device layout holds 32 / bits codes to a uint32 word, rows of `words` words (columns padded with q = 0 and scale
0), scales float32, and one zero point for every block and column (a symmetric grid's 2^(bits-1), ternary's 1) or a
byte per block and column. `grid_matmul_reference` is the numpy reference of the CUDA kernel, same signature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from symshrink.runtime.formats import unpack_low_bits
from symshrink.runtime.kernels.launch import DeviceWeight, cuda_matmul

__all__ = ["GridWeight", "GRID_KERNELS", "grid_weight", "matmul_nbits_weight", "dense_grid", "grid_matmul_reference",
           "grid_matmul_cuda", "ERROR_BUDGET"]

# |y - y_exact| <= ERROR_BUDGET * (|x| @ |W|): q - z is exact in float32, the sums over the depth are float32
ERROR_BUDGET = 1e-5
GRID_KERNELS = {bits: f"grid_matmul_b{bits}" for bits in (2, 4, 8)}
PACK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class GridWeight(DeviceWeight):
    words: np.ndarray  # uint32 [depth, words]: 32 / bits codes a word, column j at bits `bits` * j
    scales: np.ndarray  # float32 [blocks, padded columns]
    zero_points: np.ndarray  # uint8 [blocks, padded columns] when `zero` is -1, else one unused byte
    bits: int
    block: int  # rows per scale block
    cols: int  # N, the real columns
    zero: int  # the zero point of every block and column, or -1: `zero_points`

    @property
    def kernel(self) -> str:
        return GRID_KERNELS[self.bits]

    def arrays(self) -> list:
        return [self.words, self.scales, self.zero_points]

    def format_ints(self) -> tuple[int, ...]:
        """The kernel's integer arguments after the shapes."""
        return (self.block, self.zero)

    def to(self, backend, tables: dict) -> GridWeight:
        """On the backend's device (grid weights share no arrays)."""
        return GridWeight(*(backend.to_device(a) for a in self.arrays()), self.bits, self.block, self.cols, self.zero)


def grid_weight(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | int | None, bits: int,
                block: int) -> GridWeight:
    """Codes [K, N] (unsigned, below 2^bits), scales [ceil(K / block), N] and zero points (the same shape, one for
    all, or None: 2^(bits-1)) -> the device layout."""
    depth, cols = codes.shape
    per_word = 32 // bits
    padded_cols = per_word * math.ceil(cols / per_word)
    shifts = (bits * np.arange(per_word)).astype(np.uint32)
    words = np.empty((depth, padded_cols // per_word), np.uint32)
    step = max(1, PACK_ELEMENTS // padded_cols)  # rows at a time: a large weight's uint32 temporaries stay small
    for start in range(0, depth, step):
        padded = np.zeros((min(step, depth - start), padded_cols), np.uint32)
        padded[:, :cols] = codes[start:start + step]
        words[start:start + step] = np.bitwise_or.reduce(padded.reshape(len(padded), -1, per_word) << shifts, axis=2)
    wide_scales = np.zeros((scales.shape[0], padded_cols), np.float32)
    wide_scales[:, :cols] = scales
    zeros, zero = np.zeros(1, np.uint8), 1 << (bits - 1) if zero_points is None else zero_points
    if isinstance(zero, np.ndarray):
        zeros, zero = np.zeros((scales.shape[0], padded_cols), np.uint8), -1
        zeros[:, :cols] = zero_points
    return GridWeight(words, wide_scales, zeros, int(bits), int(block), int(cols), int(zero))


def matmul_nbits_weight(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                        block: int) -> GridWeight:
    """The weight W = B^T [K, N] of a MatMulNBits node from its constant inputs (B [N, blocks, block bytes], scales
    [N, blocks], zero points packed [N, bytes] or None)."""
    blocks = -(-k // block)
    codes = unpack_low_bits(b.reshape(n, -1), bits, blocks * block)[:, :k]
    zeros = None if zero_points is None else unpack_low_bits(zero_points.reshape(n, -1), bits, blocks).T
    return grid_weight(codes.T, scales.reshape(n, blocks).T, zeros, bits, block)


def _offsets(weight: GridWeight, xp=np):
    """q - z as float32 [K, padded columns] (array code: numpy, or CuPy for a weight on the device)."""
    depth = weight.words.shape[0]
    shifts = xp.arange(0, 32, weight.bits, dtype=xp.uint32)
    codes = ((weight.words[:, :, None] >> shifts) & ((1 << weight.bits) - 1)).reshape(depth, -1)
    zeros = xp.full(weight.scales.shape, weight.zero, xp.uint8) if weight.zero >= 0 else weight.zero_points
    rows = xp.arange(depth) // weight.block
    return codes.astype(xp.float32) - zeros[rows].astype(xp.float32)


def dense_grid(weight: GridWeight, xp=np):
    """The float32 weight [K, N] the layout stands for (numpy, or CuPy for a weight on the device: decoding the whole
    weight before a dense product, which the benchmarks set against the kernel at large batches)."""
    rows = xp.arange(weight.words.shape[0]) // weight.block
    return (_offsets(weight, xp) * weight.scales[rows])[:, : weight.cols]


def grid_matmul_reference(x: np.ndarray, weight: GridWeight) -> np.ndarray:
    """numpy reference of the kernel: per scale block, the sum of x * (q - z), then times the block's scales."""
    depth, offsets = weight.words.shape[0], _offsets(weight)
    x = np.asarray(x, np.float32)
    y = np.zeros((*x.shape[:-1], offsets.shape[1]), np.float32)
    for b, start in enumerate(range(0, depth, weight.block)):
        rows = slice(start, min(start + weight.block, depth))
        y += (x[..., rows] @ offsets[rows]) * weight.scales[b]
    return y[..., : weight.cols]


def grid_matmul_cuda(x, weight: GridWeight):
    """The CUDA kernel on CuPy arrays (weight on the device: `weight.to(backend, {})`)."""
    depth, words = weight.words.shape
    return cuda_matmul(weight.kernel, x, weight, depth, words)[..., : weight.cols]
