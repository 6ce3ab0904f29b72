"""8-bit round-to-nearest weights, the fallback for layers whose ternary error is over budget.

Per output column and block of input rows, w ~ scale * (q - zero_point) with q in 0..255 and
scale = (max - min) / 255 over the block, the range widened to hold 0 so that zero stays exact.
The error per weight is at most scale / 2.
"""

from __future__ import annotations

import numpy as np

from symshrink.passes.blocks import QuantizedWeight, split_blocks

__all__ = ["quantize_uint8", "LEVELS"]

LEVELS = 255


def quantize_uint8(weight: np.ndarray, block: int | None = None) -> QuantizedWeight:
    blocks = split_blocks(weight, block)
    low = np.minimum(blocks.min(axis=1), 0.0)
    high = np.maximum(blocks.max(axis=1), 0.0)
    scales = (high - low) / LEVELS
    safe = np.where(scales > 0, scales, 1.0)
    zero_points = np.clip(np.round(-low / safe), 0, LEVELS)
    codes = np.clip(np.round(blocks / safe[:, None, :]) + zero_points[:, None, :], 0, LEVELS)
    codes = codes.reshape(-1, weight.shape[1])[: weight.shape[0]].astype(np.uint8)
    return QuantizedWeight(codes, scales.astype(weight.dtype), zero_points.astype(np.uint8), block, bits=8)
