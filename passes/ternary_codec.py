"""Ternary weights: w ~ alpha * t with t in {-1, 0, +1}, per output unit and block of input rows.

For a vector w and support S, the best scale is alpha = mean_S |w_i| and the error is
||w||^2 - (sum_S |w_i|)^2 / |S|, so the optimal support is the k largest |w_i| for the k that maximises
(sum of the k largest)^2 / k: exact in O(n log n). Codes are stored as digits t + 1: in 2 bits, 4 per
byte, element 0 in the low bits (ONNX's packing of uint2), or in base 3, 5 per byte (1.6 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from symshrink.passes.blocks import expand_scales, split_blocks

__all__ = ["Ternary", "ternarize", "pack_codes", "unpack_codes", "DIGITS_PER_BYTE"]

DIGITS_PER_BYTE = {4: 4, 3: 5}  # radix -> codes per byte (3**5 = 243 <= 256)


@dataclass(frozen=True)
class Ternary:
    """codes [K, N] in {-1, 0, 1} (int8) and scales [ceil(K / block), N] for a weight [K, N] (x @ W)."""

    codes: np.ndarray
    scales: np.ndarray
    block: int | None  # None: one scale per column

    def dequantize(self) -> np.ndarray:
        return self.codes * expand_scales(self.scales, self.codes.shape[0], self.block)


def _ternarize_columns(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal ternary fit of each column of blocks [g, M]: (codes [g, M], scales [M])."""
    magnitude = np.abs(blocks)
    order = np.argsort(-magnitude, axis=0, kind="stable")
    sorted_mag = np.take_along_axis(magnitude, order, axis=0)
    prefix = np.cumsum(sorted_mag, axis=0)
    counts = np.arange(1, blocks.shape[0] + 1)[:, None]
    best = np.argmax(prefix**2 / counts, axis=0)  # support size - 1 per column
    columns = np.arange(blocks.shape[1])
    scales = prefix[best, columns] / (best + 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(blocks.shape[0])[:, None].repeat(blocks.shape[1], axis=1), axis=0)
    codes = np.where(rank <= best[None, :], np.sign(blocks), 0).astype(np.int8)
    scales = np.where(magnitude.max(axis=0) > 0, scales, 0.0)
    return codes, scales


def ternarize(weight: np.ndarray, block: int | None = None) -> Ternary:
    """Ternary codes of weight [K, N] with one scale per output column and block of `block` input rows
    (None: one block per column, i.e. per channel)."""
    blocks = split_blocks(weight, block)  # [blocks, size, N]
    count, size, cols = blocks.shape
    codes, scales = _ternarize_columns(blocks.transpose(1, 0, 2).reshape(size, count * cols))
    codes = codes.reshape(size, count, cols).transpose(1, 0, 2).reshape(count * size, cols)[: weight.shape[0]]
    return Ternary(codes, scales.reshape(count, cols).astype(weight.dtype), block)


def pack_codes(codes: np.ndarray, radix: int = 4) -> np.ndarray:
    """Flattened codes in {-1, 0, 1} -> bytes holding the digits t + 1 in base `radix`, element 0 lowest:
    radix 4 puts 4 codes in a byte (2 bits each, ONNX's uint2 packing), radix 3 puts 5 (1.6 bits)."""
    per_byte = DIGITS_PER_BYTE[radix]
    digits = (codes.reshape(-1).astype(np.int16) + 1).astype(np.uint16)
    digits = np.concatenate([digits, np.zeros(-len(digits) % per_byte, np.uint16)]).reshape(-1, per_byte)
    return (digits @ (radix ** np.arange(per_byte, dtype=np.uint16))).astype(np.uint8)


def unpack_codes(packed: np.ndarray, count: int, radix: int = 4) -> np.ndarray:
    """Inverse of `pack_codes`: the first `count` codes, as int8 in {-1, 0, 1}."""
    powers = radix ** np.arange(DIGITS_PER_BYTE[radix], dtype=np.int32)
    digits = (packed.astype(np.int32)[:, None] // powers[None, :]) % radix
    return digits.reshape(-1)[:count].astype(np.int8) - 1
