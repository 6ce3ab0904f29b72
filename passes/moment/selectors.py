"""Selectors: reduce a group of d units to k, as pure numpy functions behind one interface.

A group feeds its consumer through y = sum_i h_i(x) W_i (h_i: unit i's t activation columns, W_i its
t consumer rows). A selector returns k new units (a subset of the old ones, or merges of them) and
their new consumer rows W'_j plus a bias change c such that sum_j h'_j W'_j + c stays close to y.
`select` keeps the units chosen by greedy pivoted QR of H diag(||W_i||) and refits W' by ridge least
squares from the activations' first two moments; `magnitude` keeps the largest units and refits
nothing (the pruning baseline); `recombine` and `fold` live in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from symshrink.calibration.stats import UnitStats

__all__ = ["UnitProblem", "Reduction", "Curve", "Selector", "error_curve", "refit", "select", "magnitude", "subset_error",
           "unit_columns", "check_width"]


@dataclass(frozen=True)
class UnitProblem:
    """What a selector may look at for one group. `out_weight` rows are unit-major: unit i owns rows
    i*block .. (i+1)*block - 1."""

    out_weight: np.ndarray  # [d * block, m]
    block: int = 1
    stats: UnitStats | None = None  # calibration moments of the unit activations (data-aware selectors)
    unit_params: np.ndarray | None = None  # [d, p] each unit's producer-side parameters (data-free selectors)
    intercept: bool = True  # the consumer has a bias that can absorb a constant shift
    homogeneous: bool = False  # phi(c z) = c phi(z) for c > 0 (ReLU): norms can move into the consumer
    ridge: float = 1e-3
    seed: int = 0

    @property
    def width(self) -> int:
        return self.out_weight.shape[0] // self.block

    @cached_property
    def moments(self) -> np.ndarray:
        """The matrix the least-squares problems use: covariance with an intercept, else E[h h^T]."""
        if self.stats is None:
            raise ValueError("this selector needs calibration activations")
        return self.stats.covariance if self.intercept else self.stats.second_moment

    @cached_property
    def curve(self) -> Curve:
        return error_curve(self)

    @cached_property
    def output_energy(self) -> float:
        """E||y||^2 per row, y = h W (uncentred: errors are relative to the output itself)."""
        w = self.out_weight.astype(np.float64)
        return float(np.einsum("ij,ij->", w, self.stats.second_moment @ w))


@dataclass(frozen=True)
class Reduction:
    """k new units. `merge` [k, d] gives each new unit's producer-side parameters as a combination of
    the old units' (None: new unit j is old unit kept[j], unchanged)."""

    kept: np.ndarray  # [k] old unit behind each new unit (for a merge: the cluster's first member)
    weight: np.ndarray  # [k * block, m] new consumer rows
    bias_delta: np.ndarray  # [m] added to the consumer's output
    merge: np.ndarray | None = None
    relative_error: float | None = None  # ||y - y'|| / ||y|| on the calibration moments, where computable

    @property
    def width(self) -> int:
        return len(self.kept)


@dataclass(frozen=True)
class Curve:
    """Greedy order of the units and the relative consumer-output error of keeping the first j of them
    with an (unregularised) least-squares refit, for j = 0..d."""

    order: np.ndarray  # [d]
    relative_error: np.ndarray  # [d + 1], non-increasing


Selector = Callable[[UnitProblem, int], Reduction]


def unit_columns(units: np.ndarray, block: int) -> np.ndarray:
    """Row/column indices of the given units in a unit-major layout with `block` entries per unit."""
    return (np.asarray(units)[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def error_curve(problem: UnitProblem, tolerance: float = 1e-12) -> Curve:
    """Greedy pivoted Cholesky of the moment matrix A: at each step the unit whose columns keep the most
    output energy sum_c residual_c ||W_c||^2. This is column-pivoted QR of H diag(||W_c||), done on
    the Gram; each Cholesky row r captures ||r W||^2 of output energy, so the least-squares error of
    every prefix comes out of the same sweep."""
    a = problem.moments
    w = problem.out_weight.astype(np.float64)
    if problem.block == 1:
        order, captured = _pivoted_cholesky_lapack(a, w)
    else:
        order, captured = _pivoted_cholesky_blocks(a, w, problem.block, tolerance)
    total = problem.output_energy
    centred_total = float(np.einsum("ij,ij->", w, a @ w))
    remaining = np.maximum(centred_total - np.concatenate([[0.0], np.cumsum(captured)]), 0.0)
    return Curve(order, np.minimum.accumulate(np.sqrt(remaining / max(total, 1e-300))))


def _pivoted_cholesky_lapack(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One column per unit: LAPACK's blocked pivoted Cholesky (dpstrf) of S A S, S = diag(||W_c||), whose
    diagonal pivoting is exactly the greedy rule above. Returns the order and the energy each step adds."""
    scale = np.linalg.norm(w, axis=1)
    factor, pivots, rank, info = scipy.linalg.lapack.dpstrf(a * np.outer(scale, scale), lower=1)
    if info < 0:
        raise ArithmeticError(f"dpstrf failed (info={info})")
    order = pivots - 1
    unit_rows = np.divide(w, scale[:, None], out=np.zeros_like(w), where=scale[:, None] > 0)
    lower = np.tril(factor)[:, :rank]
    captured = np.zeros(len(order))
    captured[:rank] = np.sum((lower.T @ unit_rows[order]) ** 2, axis=1)
    return order, captured


def _pivoted_cholesky_blocks(a: np.ndarray, w: np.ndarray, block: int, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Units of `block` columns (heads, taps of a kxk conv): pick the unit with the most residual output
    energy, then add its columns one at a time (skipping those already in the span)."""
    width = a.shape[0] // block
    row_energy = np.einsum("ij,ij->i", w, w)
    residual = a.diagonal().copy()
    floor = tolerance * max(float(residual.max(initial=0.0)), 1e-300)
    rows = np.zeros((a.shape[0], a.shape[0]))
    n_rows = 0
    order = np.empty(width, dtype=np.int64)
    captured = np.zeros(width)
    taken = np.zeros(width, dtype=bool)
    for step in range(width):
        score = (np.maximum(residual, 0) * row_energy).reshape(width, block).sum(axis=1)
        score[taken] = -np.inf
        unit = int(np.argmax(score))
        for col in unit_columns(np.array([unit]), block):
            if residual[col] <= floor:
                continue
            row = (a[col] - rows[:n_rows, col] @ rows[:n_rows]) / np.sqrt(residual[col])
            rows[n_rows] = row
            n_rows += 1
            residual -= row**2
            residual[col] = 0.0
            captured[step] += float(np.sum((row @ w) ** 2))
        taken[unit] = True
        order[step] = unit
    return order, captured


def subset_error(problem: UnitProblem, kept: np.ndarray, weight: np.ndarray, bias_delta: np.ndarray) -> float:
    """||h W - (h_S W' + c)|| / ||h W|| from the moments: the residual is h_D W_D - h_S (W' - W_S) - c."""
    stats, w = problem.stats, problem.out_weight.astype(np.float64)
    cols = unit_columns(kept, problem.block)
    dropped = np.setdiff1d(np.arange(w.shape[0]), cols)
    coeff = np.zeros_like(w)  # residual = h @ coeff - c
    coeff[dropped] = w[dropped]
    coeff[cols] = w[cols] - weight.astype(np.float64)
    cov = stats.covariance
    centred = float(np.einsum("ij,ij->", coeff, cov @ coeff))
    mean_residual = stats.mean @ coeff - bias_delta.astype(np.float64)
    return float(np.sqrt(max(centred + mean_residual @ mean_residual, 0.0) / max(problem.output_energy, 1e-300)))


def refit(problem: UnitProblem, kept: np.ndarray) -> Reduction:
    """Ridge refit of the kept units' consumer rows towards their original values:
    W'_S = W_S + D, D = argmin E||h_D W_D - h_S D - c||^2 + lam ||D||^2 (c: the intercept).
    `ridge` is relative to the mean diagonal of A_SS, so it does not depend on the data's scale.
    Keeping every unit gives D = 0 exactly."""
    kept = np.sort(np.asarray(kept))
    w = problem.out_weight
    cols = unit_columns(kept, problem.block)
    dropped = np.setdiff1d(np.arange(w.shape[0]), cols)
    if dropped.size == 0:
        return Reduction(kept, w.copy(), np.zeros(w.shape[1], w.dtype), relative_error=0.0)
    a = problem.moments
    w64 = w.astype(np.float64)
    a_ss = a[np.ix_(cols, cols)]
    lam = problem.ridge * max(np.trace(a_ss) / len(cols), 1e-300)
    rhs = a[np.ix_(cols, dropped)] @ w64[dropped]
    delta = scipy.linalg.solve(a_ss + lam * np.eye(len(cols)), rhs, assume_a="pos")
    if problem.intercept:
        mean = problem.stats.mean
        bias_delta = mean[dropped] @ w64[dropped] - mean[cols] @ delta
    else:
        bias_delta = np.zeros(w.shape[1])
    new = (w64[cols] + delta).astype(w.dtype)
    bias = bias_delta.astype(w.dtype)
    return Reduction(kept, new, bias, relative_error=subset_error(problem, kept, new, bias))


def select(problem: UnitProblem, k: int) -> Reduction:
    """The first k units of the greedy pivoted-QR order, consumer refit by ridge least squares."""
    return check_width(problem, k) or refit(problem, problem.curve.order[:k])


def magnitude(problem: UnitProblem, k: int) -> Reduction:
    """Pruning without refit: keep the k units with the largest ||producer params|| * ||consumer rows||."""
    if (full := check_width(problem, k)) is not None:
        return full
    w = problem.out_weight
    out_norm = np.linalg.norm(w.reshape(problem.width, -1), axis=1)
    in_norm = np.linalg.norm(problem.unit_params, axis=1) if problem.unit_params is not None else 1.0
    kept = np.sort(np.argsort(-(out_norm * in_norm), kind="stable")[:k])
    new = w[unit_columns(kept, problem.block)]
    bias = np.zeros(w.shape[1], w.dtype)
    error = subset_error(problem, kept, new, bias) if problem.stats is not None else None
    return Reduction(kept, new, bias, relative_error=error)


def check_width(problem: UnitProblem, k: int) -> Reduction | None:
    """Refuse k outside 1..d; at k = d every selector keeps the group as it is (returned here)."""
    if not 0 < k <= problem.width:
        raise ValueError(f"k={k} must be in 1..{problem.width}")
    if k < problem.width:
        return None
    w = problem.out_weight
    return Reduction(np.arange(problem.width), w.copy(), np.zeros(w.shape[1], w.dtype), relative_error=0.0)
