"""Streaming moments of a group's unit activations, and the unit rows they are taken over.

A group's activations become rows of shape [d, t]: d units, t columns per unit (1 for an FFN unit or a
1x1-consumed channel, head_dim for an attention head, kh*kw taps for a channel read by a kxk conv).
Only the first two moments are kept (sum and Gram of the flattened rows, float64), so memory is
O((d t)^2) per group whatever the calibration size: every selector and refit works from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg.blas

OUTER_ROWS = 256
IN_PLACE_COLUMNS = 4096  # from this width the sum of products is accumulated without a K x K temporary

__all__ = ["UnitStats", "unfold_channels", "subsample_rows", "sample_patches"]


@dataclass
class UnitStats:
    """Mean and second moments of rows [n, width, block], accumulated batch by batch.

    Rows are shifted by the first batch's mean before the products so that the centred covariance
    keeps its precision when the mean is large next to the spread."""

    width: int
    block: int = 1
    count: int = 0
    shift: np.ndarray | None = field(default=None, repr=False)
    total: np.ndarray | None = field(default=None, repr=False)
    cross: np.ndarray | None = field(default=None, repr=False)
    _covariance: np.ndarray | None = field(default=None, repr=False)

    @property
    def columns(self) -> int:
        return self.width * self.block

    def add(self, rows: np.ndarray) -> None:
        flat = rows.reshape(rows.shape[0], -1)
        if self._covariance is not None:
            raise ValueError("these moments are final: the covariance has been read")
        if flat.shape[1] != self.columns:
            raise ValueError(f"rows have {flat.shape[1]} columns, expected {self.columns}")
        if flat.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = flat.mean(axis=0, dtype=np.float64)
            self.total = np.zeros(self.columns)
            self.cross = np.zeros((self.columns, self.columns))
        centred = flat - self.shift.astype(flat.dtype)
        self.total += centred.sum(axis=0, dtype=np.float64)
        if self.columns < IN_PLACE_COLUMNS:  # float32 activations take a float32 GEMM (twice as fast), summed in float64
            self.cross += centred.T @ centred
        else:  # wide: accumulated in place in float64 (no K x K temporary; the sum is symmetric, so its transpose
            # is the Fortran-ordered array BLAS writes)
            scipy.linalg.blas.dgemm(1.0, centred.astype(np.float64), centred, beta=1.0, c=self.cross.T, trans_a=1,
                                    overwrite_c=1)
        self.count += flat.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.shift + self.total / self.count

    @property
    def covariance(self) -> np.ndarray:
        """E[(x - mean)(x - mean)^T]. Reading it ends the accumulation: the sum of products is turned into
        the covariance in place, so a group holds one d*t x d*t matrix, not two."""
        if self._covariance is None:
            offset = self.total / self.count
            self.cross /= self.count
            _add_outer(self.cross, offset, -1.0)
            self._covariance, self.cross = self.cross, None
        return self._covariance

    @property
    def second_moment(self) -> np.ndarray:
        """E[x x^T]."""
        mean = self.mean
        return self.covariance + np.outer(mean, mean)

    def ordered_second_moment(self, order: np.ndarray) -> np.ndarray:
        """E[x x^T] with its rows and columns in `order`: one new float64 array and no other (the covariance's
        entries taken in that order, the mean's outer product added in place)."""
        ordered = self.covariance[np.ix_(order, order)]
        _add_outer(ordered, self.mean[order], 1.0)
        return ordered


def _add_outer(matrix: np.ndarray, vector: np.ndarray, sign: float) -> None:
    """matrix += sign * vector vector^T in place, a slab of rows at a time (no K x K temporary)."""
    for start in range(0, len(vector), OUTER_ROWS):  # (-1 * x is exact: the sums are those of a subtraction)
        matrix[start: start + OUTER_ROWS] += sign * np.outer(vector[start: start + OUTER_ROWS], vector)


def unfold_channels(maps: np.ndarray, kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0),
                    dilations=(1, 1)) -> np.ndarray:
    """im2col: NCHW maps -> rows [N * Ho * Wo, C, kh * kw], the patches a conv with these attributes
    multiplies by its filter (pads are ONNX order: top, left, bottom, right)."""
    kh, kw = kernel
    top, left, bottom, right = pads
    padded = np.pad(maps, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c, kh * kw)


def subsample_rows(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` rows, drawn without replacement (conv maps give many correlated rows per image)."""
    if rows.shape[0] <= limit:
        return rows
    return rows[np.sort(rng.choice(rows.shape[0], limit, replace=False))]


def sample_patches(maps: np.ndarray, kernel: tuple[int, int], strides, pads, dilations, limit: int,
                   rng: np.random.Generator) -> np.ndarray:
    """The patches a conv with these attributes multiplies by its weight, at most `limit` of them drawn without
    replacement over images and output positions: rows [m, kh * kw * C], taps first (each tap's C channels in a
    run, the row order of `formats.conv_matrix`). Only the drawn patches are gathered (no full im2col)."""
    n, _, height, width = maps.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h = (height + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + left + right - (kw - 1) * dw - 1) // sw + 1
    total = n * out_h * out_w
    picked = np.arange(total) if total <= limit else np.sort(rng.choice(total, limit, replace=False))
    image, position = np.divmod(picked, out_h * out_w)
    oh, ow = np.divmod(position, out_w)
    padded = np.pad(maps, ((0, 0), (0, 0), (top, bottom), (left, right)))
    taps_h, taps_w = (grid.reshape(-1) for grid in np.meshgrid(np.arange(kh) * dh, np.arange(kw) * dw, indexing="ij"))
    rows = oh[:, None] * sh + taps_h[None, :]
    cols = ow[:, None] * sw + taps_w[None, :]
    patches = padded[image[:, None], :, rows, cols]  # [m, taps, C]: the indexed axes come first
    return patches.reshape(len(picked), -1)
