"""Ternary weights on the grid kernel: W[r, c] = t[r, c] * scales[r / block, c] is the 2-bit grid of digits t + 1
with zero point 1 (`kernels.grid`: 16 digits to a uint32 word, columns padded to a multiple of 16 with t = 0, scales
with 0). Both graph forms land here: `ai.symshrink.TernaryMatMul` (base 4, or base 3 repacked to base 4) and
MatMul(x, DequantizeLinear(uint2 q, scale, zero point 1)).
"""

from __future__ import annotations

import numpy as np

from symshrink.runtime.formats import unpack_ternary_function
from symshrink.runtime.kernels.grid import GridWeight, grid_weight

__all__ = ["ternary_weight", "function_weight"]


def ternary_weight(codes: np.ndarray, scales: np.ndarray, block: int) -> GridWeight:
    """Codes int8 [K, N] in {-1, 0, 1}, scales [ceil(K / block), N] -> the grid kernel's layout."""
    return grid_weight((codes + 1).astype(np.uint8), scales, 1, 2, block)


def function_weight(inputs: dict[str, np.ndarray], radix: int) -> GridWeight:
    """The weight of a TernaryMatMul node from its constant inputs (`formats.TERNARY_INPUTS`)."""
    ternary = unpack_ternary_function(inputs, radix)
    return ternary_weight(ternary.codes, ternary.scales, ternary.block)
