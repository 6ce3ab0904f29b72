"""Blocks of input rows per output column, the unit every weight codec keeps one scale for, and the
quantized weight they describe.

A weight [K, N] (x W) is cut along K into ceil(K / block) blocks of `block` rows, the last one padded
with zero rows; `block=None` means one block per column (per channel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["split_blocks", "expand_scales", "block_count", "QuantizedWeight"]


def block_count(rows: int, block: int | None) -> int:
    return 1 if block is None else -(-rows // block)


def split_blocks(weight: np.ndarray, block: int | None) -> np.ndarray:
    """weight [K, N] -> [blocks, block, N] in float64, zero-padded to whole blocks."""
    rows, cols = weight.shape
    size = rows if block is None else block
    padded = np.zeros((block_count(rows, block) * size, cols))
    padded[:rows] = weight
    return padded.reshape(-1, size, cols)


def expand_scales(scales: np.ndarray, rows: int, block: int | None) -> np.ndarray:
    """Per-block values [blocks, N] -> one per weight row [K, N]."""
    return np.repeat(scales, rows if block is None else block, axis=0)[:rows]


@dataclass(frozen=True)
class QuantizedWeight:
    """w ~ scales * (codes - zero_points): codes [K, N] (unsigned, below 2**bits), scales and zero points
    [blocks, N] per block of `block` input rows (None: per column)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    block: int | None
    bits: int

    def dequantize(self) -> np.ndarray:
        rows = self.codes.shape[0]
        offsets = self.codes.astype(np.float64) - expand_scales(self.zero_points, rows, self.block)
        return (offsets * expand_scales(self.scales, rows, self.block)).astype(self.scales.dtype)
