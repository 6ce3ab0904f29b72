"""Second-moment rounding (GPTQ-class): round the input rows of W [K, N] one at a time and feed each row's error
forward onto the rows not yet rounded, so that the output error E||x (W - Q)||^2 = tr((W - Q)^T H (W - Q)),
H = E[x x^T], is what is kept small. With U the upper Cholesky factor of (H + damp)^-1, row i rounds to q_i and
rows j > i take w_j -= U[i, j] (w_i - q_i) / U[i, i] (in batches of `batch` rows, the rest updated lazily).
Each block's frame (integer grid: scales and zero points; ternary: the optimal scale) is set on the error-fed rows
when the block starts; a hyperfunction code's frame (centre, span, bands) is the whole weight's, set first, and each
row's pairs of weights go to their nearest codewords (GPTVQ-style: a vector code fed back row by row). With H = I
nothing is fed forward and the codes are round-to-nearest's. Act-order rounds the rows in order of decreasing
E[x_i^2] (the inputs that carry most first, so that later rows absorb their error); the stored layout is
unchanged because each block's frame is then set up front, on the weights as given (GPTQ's static groups): no
permutation reaches the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import scipy.linalg

from symshrink.calibration.stats import UnitStats
from symshrink.runtime.formats import (
    Frame,
    HyperCode,
    HyperSetting,
    QuantizedWeight,
    Ternary,
    decode_values,
    encode_pairs,
    frame_of,
    grid_frame,
    hyper_pairs,
    round_to_grid,
    ternary_scales,
)

__all__ = ["DAMPING", "damped_cholesky_inverse", "feedback_factor", "Hessian", "Grid", "IntegerGrid", "TernaryGrid", "HyperGrid",
           "round_with_feedback", "quantize_with_feedback", "quantize_many_with_feedback", "ternarize_with_feedback",
           "hyper_feeds_back",
           "hyperize_with_feedback"]

DAMPING = 0.01  # lambda of H + lambda mean(diag H) I: keeps the inverse stable where inputs are nearly collinear
FEEDBACK_COLUMNS = 1 << 13  # columns of one grid rounded together (quantize_with_feedback)
ONE_PASS_COLUMNS = 1 << 16  # columns of all grids side by side in one pass: four float64 arrays of K x this at most


def damped_cholesky_inverse(hessian: np.ndarray, damping: float = DAMPING,
                             overwrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(U, dead): U upper triangular with U^T U = (H + damping mean(diag H) I)^-1, and the rows no input reaches
    (diag H = 0: their weights never matter and are set to zero). LAPACK in place (potrf, potri, potrf): one K x K
    array besides `hessian` (none with `overwrite`, a float64 array of the caller's that is then consumed)."""
    h = hessian if overwrite and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * float(np.mean(np.diag(h)))
    # H is symmetric: its transpose is the Fortran-ordered array LAPACK works in, in place
    factor, info = scipy.linalg.lapack.dpotrf(h.T, lower=0, clean=0, overwrite_a=1)  # H = F^T F
    if info == 0:
        factor, info = scipy.linalg.lapack.dpotri(factor, lower=0, overwrite_c=1)  # H^-1, upper triangle
    if info == 0:
        factor, info = scipy.linalg.lapack.dpotrf(factor, lower=0, clean=1, overwrite_a=1)  # H^-1 = U^T U
    if info != 0:
        raise np.linalg.LinAlgError(f"the damped second moment is not positive definite (LAPACK info {info})")
    return factor, dead


class Grid(Protocol):
    """A rounding target: per block of rows, a frame (per-column parameters set on the rows as they are when the
    block starts), and the nearest point of a row in it."""

    def frame(self, rows: np.ndarray) -> tuple[np.ndarray, ...]: ...

    def round(self, row: np.ndarray, frame: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]: ...  # codes, values


@dataclass(frozen=True)
class IntegerGrid:
    """2^bits levels over the block's range, zero exact; or symmetric about zero (`formats.grid_frame`)."""

    bits: int
    symmetric: bool = False

    def frame(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return grid_frame(rows, self.bits, self.symmetric)

    def round(self, row: np.ndarray, frame: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        scales, zero_points = frame
        codes = round_to_grid(row, scales, zero_points, self.bits)
        return codes, (codes - zero_points) * scales


@dataclass(frozen=True)
class TernaryGrid:
    """{-a, 0, +a} per column, a the optimal ternary scale of the block's column (`formats.ternary_scales`)."""

    def frame(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        return (ternary_scales(rows),)

    def round(self, row: np.ndarray, frame: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        (scales,) = frame
        codes = np.clip(np.round(row / np.where(scales > 0, scales, 1.0)), -1, 1) * (scales > 0)
        return codes, codes * scales


@dataclass(frozen=True)
class HyperGrid:
    """Pairs of neighbouring weights of a row to their nearest codewords of a hyperfunction codebook, in `fixed`: the
    frame (centre, span, bands) of the whole weight as given, so that the codes take nearest rounding's bytes."""

    setting: HyperSetting
    fixed: Frame

    def frame(self, rows: np.ndarray) -> tuple[Frame]:
        return (self.fixed,)

    def round(self, row: np.ndarray, frame: tuple[Frame]) -> tuple[np.ndarray, np.ndarray]:
        code = encode_pairs(row.reshape(1, -1, self.setting.dims), frame[0], self.setting, row.shape)
        return code.indices, decode_values(code).astype(np.float64)


Hessian = np.ndarray | UnitStats  # E[x x^T] [K, K], or the moments it is taken from (one K x K array fewer)


def feedback_factor(hessian: Hessian, damping: float = DAMPING,
                    act_order: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, U, dead): the order rows round in (act-order: decreasing diag H), and `damped_cholesky_inverse` of H
    in that order. From moments, H is built in that order in the one array LAPACK then works in."""
    if isinstance(hessian, UnitStats):
        diagonal = np.diag(hessian.covariance) + hessian.mean**2
        order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(len(diagonal))
        ordered = hessian.ordered_second_moment(order)
    else:
        order = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(len(hessian))
        ordered = np.asarray(hessian, np.float64)[np.ix_(order, order)]
    u, dead = damped_cholesky_inverse(ordered, damping, overwrite=True)
    return order, u, dead


def round_with_feedback(weight: np.ndarray, hessian: Hessian, block: int | None, grid: Grid,
                        damping: float = DAMPING, batch: int = 128, act_order: bool = False,
                        factor: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                        ) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Codes [K, N] of `weight` on `grid` (blocks of `block` input rows, None: per column) chosen by second-moment
    rounding against `hessian` [K, K] = E[x x^T] of the layer's input, and each block's frame. `act_order`: rows
    in order of decreasing diag(H), frames set first on the weights as given. `factor`: `feedback_factor`'s, when
    already known (columns rounded a slice at a time)."""
    rows, cols = weight.shape
    size = rows if block is None else block
    order, u, dead = factor if factor is not None else feedback_factor(hessian, damping, act_order)
    w = weight.astype(np.float64)[order]
    w[dead] = 0.0
    if act_order:  # static frames, one per block of the stored layout
        given = weight.astype(np.float64)
        given[order[dead]] = 0.0
        frames = [grid.frame(given[start: start + size]) for start in range(0, rows, size)]
    else:
        batch = -(-batch // size) * size if block is not None else batch  # blocks never straddle a lazy batch
        frames = []
    codes: np.ndarray | None = None  # [rows, codes a row]: a row's codes are its values, or its pairs' indices
    for start in range(0, rows, batch):
        end = min(start + batch, rows)
        errors = np.zeros((end - start, cols))
        for i in range(start, end):
            if not act_order and i % size == 0:  # a new block: its frame on the rows as they are now
                frames.append(grid.frame(w[i: min(i + size, rows)]))
            row_codes, values = grid.round(w[i], frames[order[i] // size])
            if codes is None:
                codes = np.zeros((rows, *np.shape(row_codes)), np.asarray(row_codes).dtype)
            codes[order[i]] = row_codes
            errors[i - start] = (w[i] - values) / u[i, i]
            w[i + 1: end] -= np.outer(u[i, i + 1: end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors  # the batch's errors onto every later row at once
    return codes, frames


def quantize_with_feedback(weight: np.ndarray, hessian: Hessian, block: int | None, bits: int,
                           symmetric: bool = False, damping: float = DAMPING, act_order: bool = False) -> QuantizedWeight:
    """The integer grid codes of `weight` [K, N] by second-moment rounding (`round_with_feedback`). Columns round
    apart from each other, so a wide weight (a tied head) goes FEEDBACK_COLUMNS at a time, on one factor of H: the
    same codes, with float64 working copies of K x FEEDBACK_COLUMNS."""
    factor, grid, parts = feedback_factor(hessian, damping, act_order), IntegerGrid(bits, symmetric), []
    for start in range(0, weight.shape[1], FEEDBACK_COLUMNS):
        codes, frames = round_with_feedback(weight[:, start: start + FEEDBACK_COLUMNS], None, block, grid, damping,
                                            act_order=act_order, factor=factor)
        parts.append((codes.astype(np.uint8), *(np.stack(part) for part in zip(*frames))))  # float64 until now
    codes, scales, zero_points = (np.concatenate(part, axis=-1) for part in zip(*parts))
    return QuantizedWeight(codes, scales.astype(weight.dtype), zero_points.astype(np.uint8), block, bits, symmetric)


def quantize_many_with_feedback(weight: np.ndarray, hessian: np.ndarray, grids: Sequence[tuple[int | None, int]],
                                symmetric: bool = False, damping: float = DAMPING,
                                batch: int = 32) -> dict[tuple[int | None, int], QuantizedWeight]:
    """The integer-grid codes of `weight` [K, N] for each (block, bits) of `grids`, by second-moment rounding in
    act-order, in one pass over the rows: act-order's frames are static (set on the weights as given), so each row
    rounds to every grid at once, the grids' columns side by side [K, len(grids) N], and the same error feedback
    runs on all of them. Each equals `quantize_with_feedback(..., act_order=True)` for its grid up to the order of
    floating-point sums in the batched update (lazy batches of 32 rows: the rank-1 updates inside a batch cost
    K * batch * N, the batched ones are matrix products; 3x faster than 128 at K = 384)."""
    rows, cols = weight.shape
    if len(grids) > 1 and len(grids) * cols > ONE_PASS_COLUMNS:  # a wide weight (a tied head): fewer grids a pass
        half = len(grids) // 2
        return {**quantize_many_with_feedback(weight, hessian, grids[:half], symmetric, damping, batch),
                **quantize_many_with_feedback(weight, hessian, grids[half:], symmetric, damping, batch)}
    order = np.argsort(-np.diag(hessian), kind="stable")
    u, dead = damped_cholesky_inverse(np.asarray(hessian, np.float64)[np.ix_(order, order)], damping, overwrite=True)
    given = weight.astype(np.float64)
    given[order[dead]] = 0.0
    frames = {}
    for block, bits in grids:
        size = rows if block is None else block
        parts = [grid_frame(given[start: start + size], bits, symmetric) for start in range(0, rows, size)]
        frames[block, bits] = tuple(np.stack(part) for part in zip(*parts))  # scales, zero points [blocks, N]
    # per stored row and column of every grid: its block's scale and zero point, and the top code
    block_of_row = [np.arange(rows) // (rows if block is None else block) for block, _ in grids]
    scale, zero = (np.concatenate([frames[g][part][index] for g, index in zip(grids, block_of_row)], axis=1)
                   for part in (0, 1))
    top = np.concatenate([np.full(cols, (1 << bits) - 1.0) for _, bits in grids])
    safe = np.where(scale != 0, scale, 1.0)
    w = np.tile(given[order], len(grids))
    codes = np.zeros((rows, len(grids) * cols), np.uint8)
    for start in range(0, rows, batch):
        end = min(start + batch, rows)
        errors = np.zeros((end - start, w.shape[1]))
        for i in range(start, end):
            r = order[i]
            row_codes = np.clip(np.round(w[i] / safe[r]) + zero[r], 0, top)  # `round_to_grid`, per column's bits
            codes[r] = row_codes
            errors[i - start] = (w[i] - (row_codes - zero[r]) * scale[r]) / u[i, i]
            w[i + 1: end] -= np.outer(u[i, i + 1: end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    return {(block, bits): QuantizedWeight(codes[:, k * cols: (k + 1) * cols], frames[block, bits][0].astype(weight.dtype),
                                           frames[block, bits][1].astype(np.uint8), block, bits, symmetric)
            for k, (block, bits) in enumerate(grids)}


def ternarize_with_feedback(weight: np.ndarray, hessian: np.ndarray, block: int | None,
                            damping: float = DAMPING) -> Ternary:
    """Ternary codes of `weight` [K, N] by second-moment rounding: each block's scales are the optimal ternary fit
    of its error-fed rows, each row rounds to the nearest of {-a, 0, +a}."""
    codes, frames = round_with_feedback(weight, hessian, block, TernaryGrid(), damping)
    return Ternary(codes.astype(np.int8), np.stack([f[0] for f in frames]).astype(weight.dtype), block)


def hyper_feeds_back(shape: tuple[int, ...], setting: HyperSetting) -> bool:
    """Whether a weight [K, N] can be coded row by row: one group (one frame) and rows of whole pairs."""
    return len(shape) == 2 and setting.group is None and shape[1] % setting.dims == 0


def hyperize_with_feedback(weight: np.ndarray, hessian: np.ndarray, setting: HyperSetting,
                           damping: float = DAMPING) -> HyperCode:
    """Hyperfunction codes of `weight` [K, N] (stored as is: pairs along N) by second-moment rounding: the frame of
    the weight as given (nearest rounding's, so the same bytes), then each input row's pairs to their nearest
    codewords, the row's error fed forward."""
    if not hyper_feeds_back(weight.shape, setting):
        raise ValueError(f"a {weight.shape} weight in {setting.label()} is not coded row by row")
    pairs = hyper_pairs(weight.astype(np.float64).reshape(-1), setting.dims, None)
    frame = frame_of(pairs, setting)  # nearest rounding's frame: the same bands, centre, span and index width
    indices, _ = round_with_feedback(weight, hessian, None, HyperGrid(setting, frame), damping)
    # the codebook, band scales, centre and span come from the frame alone: encode one pair for them
    template = encode_pairs(pairs[:, :1], frame, setting, tuple(weight.shape))
    return replace(template, indices=indices.reshape(-1))
