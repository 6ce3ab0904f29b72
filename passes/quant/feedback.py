"""Second-moment rounding (GPTQ-class): round the input rows of W [K, N] one at a time and feed each row's error
forward onto the rows not yet rounded, so that the output error E||x (W - Q)||^2 = tr((W - Q)^T H (W - Q)),
H = E[x x^T], is what is kept small. With U the upper Cholesky factor of (H + damp)^-1, row i rounds to q_i and
rows j > i take w_j -= U[i, j] (w_i - q_i) / U[i, i] (in batches of `batch` rows, the rest updated lazily).
Scales and zero points of each block of rows are set on the error-fed rows when the block starts. With H = I
nothing is fed forward and the codes are round-to-nearest's.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from symshrink.runtime.formats import QuantizedWeight, block_count, grid_frame, round_to_grid

__all__ = ["DAMPING", "damped_cholesky_inverse", "quantize_with_feedback"]

DAMPING = 0.01  # lambda of H + lambda mean(diag H) I: keeps the inverse stable where inputs are nearly collinear


def damped_cholesky_inverse(hessian: np.ndarray, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with U^T U = (H + damping mean(diag H) I)^-1, and the rows no input reaches
    (diag H = 0: their weights never matter and are set to zero)."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * float(np.mean(np.diag(h)))
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), np.eye(len(h)))
    return scipy.linalg.cholesky(inverse, lower=False), dead


def quantize_with_feedback(weight: np.ndarray, hessian: np.ndarray, block: int | None, bits: int,
                           damping: float = DAMPING, batch: int = 128) -> QuantizedWeight:
    """The grid codes of `weight` [K, N] (blocks of `block` input rows, None: per column) chosen by second-moment
    rounding against `hessian` [K, K] = E[x x^T] of the layer's input."""
    rows, cols = weight.shape
    u, dead = damped_cholesky_inverse(hessian, damping)
    w = weight.astype(np.float64).copy()
    w[dead] = 0.0
    size = rows if block is None else block
    batch = max(batch, size) if block is not None else batch  # blocks of rows never straddle a lazy batch
    scales, zero_points = np.zeros((block_count(rows, block), cols)), np.zeros((block_count(rows, block), cols))
    codes = np.zeros((rows, cols))
    for start in range(0, rows, batch):
        end = min(start + batch, rows)
        errors = np.zeros((end - start, cols))
        for i in range(start, end):
            b = i // size
            if i % size == 0:  # a new block: its grid on the rows as they are now
                scales[b], zero_points[b] = grid_frame(w[i: min(i + size, rows)], bits)
            codes[i] = round_to_grid(w[i], scales[b], zero_points[b], bits)
            errors[i - start] = (w[i] - (codes[i] - zero_points[b]) * scales[b]) / u[i, i]
            w[i + 1: end] -= np.outer(u[i, i + 1: end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors  # the batch's errors onto every later row at once
    return QuantizedWeight(codes.astype(np.uint8), scales.astype(weight.dtype), zero_points.astype(np.uint8), block, bits)
