"""Hyperfunction codes (issue 6, first part): index packing and the v1 winding codebook, in exact arithmetic.

Groups of `dims` weights, scaled into [0, 1)^dims, are coded as the index theta of the nearest point of
frac(theta * a), theta = 0..n-1, with a_j = 1 / ((pi + j) R) (a Kronecker sequence). frac(theta * a_j)
is computed in 32-bit fixed point, ((theta * A_j) mod 2^32) / 2^32 with A_j = floor(a_j 2^32) in int64,
so numpy, onnxruntime and a GPU kernel build bit-identical codebooks (float32 theta * a is off by up to
1e-2 for large theta). Indices are packed `bits` per index into a little-endian bit stream.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["FIXED_POINT_BITS", "winding_steps", "winding_codebook", "nearest_codeword", "pack_indices", "unpack_indices"]

FIXED_POINT_BITS = 32
_MASK = (1 << FIXED_POINT_BITS) - 1


def winding_steps(dims: int, radius: float) -> np.ndarray:
    """A_j = floor(frac(1 / ((pi + j) R)) 2^32) for j = 0..dims-1, as int64."""
    return np.array([int(math.fmod(1.0 / ((math.pi + j) * radius), 1.0) * (1 << FIXED_POINT_BITS)) for j in range(dims)],
                    dtype=np.int64)


def winding_codebook(size: int, dims: int, radius: float) -> np.ndarray:
    """Codewords frac(theta * a) for theta = 0..size-1: [size, dims] float64 in [0, 1), exact in fixed point."""
    theta = np.arange(size, dtype=np.int64)[:, None]
    # theta < 2^31 and A_j < 2^32: the product overflows int64, so multiply in two 16-bit halves of A_j
    steps = winding_steps(dims, radius)[None, :]
    low = (theta * (steps & 0xFFFF)) & _MASK
    high = ((theta * (steps >> 16)) & 0xFFFF) << 16
    return ((low + high) & _MASK).astype(np.float64) / (1 << FIXED_POINT_BITS)


def nearest_codeword(codebook: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword (Euclidean) of each point [m, dims]: int64 [m]."""
    _, index = cKDTree(codebook).query(points)
    return index.astype(np.int64)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative indices below 2**bits -> bytes, `bits` per index, index 0 in the lowest bits."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1..16, not {bits}")
    values = np.asarray(indices, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"indices must lie in [0, 2**{bits})")
    stream = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_indices`: the first `count` indices, int64."""
    stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return stream @ (1 << np.arange(bits, dtype=np.int64))
