"""Caratheodory recombination: the seed paper's exact construction of a k-atom measure.

The group output is y = sum_i w_i g_i with unit contributions g_i = h_i W_i / w_i and masses
w_i = ||h_i W_i|| > 0. Take as M = k - 1 moment features the coordinates of the g_i on the top-M
principal directions of the contributions. Caratheodory's theorem gives at most M + 1 of the units
with non-negative masses w'_j that reproduce all M moments and the total mass exactly; unit j's
consumer rows are scaled by w'_j / w_j. The directions beyond the M-th are where the error lives.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from symshrink.passes.moment.selectors import Reduction, UnitProblem, check_width, subset_error, unit_columns

__all__ = ["caratheodory", "recombine"]


def caratheodory(points: np.ndarray, masses: np.ndarray) -> np.ndarray:
    """New masses with at most M + 1 non-zeros, all >= 0, such that sum_i m'_i x_i = sum_i m_i x_i and
    sum_i m'_i = sum_i m_i, for points [N, M] and masses [N] > 0.

    Works on batches of 2(M + 1) live points: one SVD gives a null space of the batch's constraint
    matrix [x_i; 1]; moving the masses along a null vector until one reaches zero keeps every moment,
    and eliminating that point from the other null vectors (a Gaussian step) lets the same basis remove
    about M + 1 points per SVD, so the cost is O(N M^2) instead of O(N M^3)."""
    lifted = np.column_stack([points.astype(np.float64), np.ones(len(points))])
    live_size = lifted.shape[1]
    new = masses.astype(np.float64).copy()
    if np.any(new <= 0):
        raise ValueError("masses must be positive")
    live = np.flatnonzero(new > 0)
    while len(live) > live_size:
        before = len(live)
        batch = live[: 2 * live_size]
        _, singular, vt = np.linalg.svd(lifted[batch].T, full_matrices=True)
        rank = int(np.sum(singular > singular[0] * 1e-12)) if singular.size else 0
        null = vt[rank:].T.copy()  # [b, b - rank], each column v satisfies lifted[batch].T @ v = 0
        alive = np.ones(len(batch), dtype=bool)
        for j in range(null.shape[1]):
            v = null[:, j]
            scale = np.abs(v).max()
            if scale <= 1e-14:
                continue
            positive = (v > scale * 1e-12) & alive
            if not positive.any():
                v, positive = -v, (-v > scale * 1e-12) & alive
            ratios = np.full(len(batch), np.inf)
            ratios[positive] = new[batch][positive] / v[positive]
            out = int(np.argmin(ratios))
            new[batch] -= ratios[out] * v
            new[batch[out]] = 0.0
            alive[out] = False
            # keep the remaining null vectors from moving the eliminated point
            rest = null[:, j + 1:]
            rest -= np.outer(v / v[out], rest[out])
        new = np.maximum(new, 0.0)  # rounding leaves -1e-17 where a mass reached zero
        live = np.flatnonzero(new > 0)
        if len(live) == before:
            raise ArithmeticError("recombination stalled: the null space vanished numerically")
    return new


def recombine(problem: UnitProblem, k: int) -> Reduction:
    """At most k units whose scaled consumer rows reproduce the top k - 1 principal moments of the
    group's output contributions exactly (centred when the consumer has a bias), plus the mean."""
    if (full := check_width(problem, k)) is not None:
        return full
    width, block = problem.width, problem.block
    w = problem.out_weight
    w64 = w.astype(np.float64)
    # contribution Gram: K_ij = E<h_i W_i, h_j W_j> = sum over the units' columns of A_ab (W W^T)_ab
    gram = (problem.moments * (w64 @ w64.T)).reshape(width, block, width, block).sum(axis=(1, 3))
    masses = np.sqrt(np.maximum(gram.diagonal(), 0.0))
    alive = np.flatnonzero(masses > masses.max() * 1e-9)
    if len(alive) <= k:
        survivors, scale = alive, np.ones(len(alive))
    else:
        n = len(alive)  # only the top k - 1 eigenpairs are needed (LAPACK's syevr on a subset)
        eigval, eigvec = scipy.linalg.eigh(gram[np.ix_(alive, alive)], subset_by_index=[n - (k - 1), n - 1])
        features = eigvec * np.sqrt(np.maximum(eigval, 0.0))  # coordinates of h_i W_i
        new_masses = caratheodory(features / masses[alive, None], masses[alive])
        kept_local = np.flatnonzero(new_masses > 0)
        survivors = alive[kept_local]
        scale = new_masses[kept_local] / masses[survivors]
    cols = unit_columns(survivors, block)
    new = (w64[cols] * np.repeat(scale, block)[:, None]).astype(w.dtype)
    if problem.intercept:  # the mean of the output is a moment too: the bias carries what is missing
        mean = problem.stats.mean
        bias = (mean @ w64 - mean[cols] @ new.astype(np.float64)).astype(w.dtype)
    else:
        bias = np.zeros(w.shape[1], w.dtype)
    return Reduction(survivors, new, bias, relative_error=subset_error(problem, survivors, new, bias))
