"""Subset selection and consumer refit for moment reduction (pure numpy, no graph code).

Units' activations H[n, d] feed the consumer W[d, m]: y = H W. Keep k units S (greedy pivoted QR on
H scaled by the norms of the units' outgoing rows), then refit the kept rows by ridge least squares
towards their original values: W_S' = W_S + D, D = argmin ||H W - H_S (W_S + D) - 1 c||^2 + lam ||D||^2,
with c an intercept that folds into the consumer's bias. At k = d the residual is zero and D = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["Refit", "select_units", "refit_consumer"]


@dataclass(frozen=True)
class Refit:
    kept: np.ndarray  # sorted unit indices, shape [k]
    weight: np.ndarray  # new consumer rows, shape [k, m]
    bias_delta: np.ndarray  # to add to the consumer's output, shape [m]
    relative_error: float  # ||H W - (H_S W' + c)|| / ||H W|| on the activations given


def select_units(activations: np.ndarray, out_weight: np.ndarray, k: int) -> np.ndarray:
    """Indices of k units chosen by column-pivoted QR of H diag(||W_i||) (sorted ascending)."""
    width = activations.shape[1]
    if not 0 < k <= width:
        raise ValueError(f"k={k} must be in 1..{width}")
    if k == width:
        return np.arange(width)
    centred = activations - activations.mean(axis=0, keepdims=True)
    scaled = centred.astype(np.float64) * np.linalg.norm(out_weight, axis=1)[None, :]
    return np.sort(_pivoted_cholesky_order(scaled.T @ scaled, k))


def _pivoted_cholesky_order(gram: np.ndarray, k: int) -> np.ndarray:
    """The first k pivots of greedy pivoted Cholesky of X^T X: the same columns that column-pivoted
    QR of X picks (largest residual norm after projecting out the chosen ones), in O(d k^2) instead of
    LAPACK's level-2 pivoted QR."""
    residual = gram.diagonal().astype(np.float64).copy()
    rows = np.zeros((k, gram.shape[0]))  # the Cholesky factor, one row per pivot
    order = np.empty(k, dtype=np.int64)
    for j in range(k):
        i = int(np.argmax(residual))
        order[j] = i
        if residual[i] <= 0:  # the rest is in the span already: any remaining units will do
            rest = np.setdiff1d(np.arange(gram.shape[0]), order[:j])
            order[j:] = rest[: k - j]
            break
        row = (gram[i] - rows[:j, i] @ rows[:j]) / np.sqrt(residual[i])
        rows[j] = row
        residual -= row**2
        residual[i] = -np.inf
    return order


def refit_consumer(
    activations: np.ndarray, out_weight: np.ndarray, kept: np.ndarray, ridge: float = 1e-3, intercept: bool = True
) -> Refit:
    """Refit the kept rows of the consumer so H_S W_S' + c matches H W on the given activations.

    `ridge` is relative to the mean diagonal of H_S^T H_S, so it does not depend on the data's scale.
    """
    h = activations.astype(np.float64)
    w = out_weight.astype(np.float64)
    dropped = np.setdiff1d(np.arange(h.shape[1]), kept)
    target = h[:, dropped] @ w[dropped]  # what the dropped units contributed
    h_kept = h[:, kept]
    h_mean = h_kept.mean(axis=0) if intercept else np.zeros(len(kept))
    t_mean = target.mean(axis=0) if intercept else np.zeros(w.shape[1])
    hc, tc = h_kept - h_mean, target - t_mean
    gram = hc.T @ hc
    lam = ridge * max(np.trace(gram) / max(len(kept), 1), 1e-12)
    delta = scipy.linalg.solve(gram + lam * np.eye(len(kept)), hc.T @ tc, assume_a="pos") if dropped.size else (
        np.zeros((len(kept), w.shape[1]))
    )
    bias_delta = t_mean - h_mean @ delta
    new_weight = w[kept] + delta
    full = h @ w
    approx = h_kept @ new_weight + bias_delta
    rel = float(np.linalg.norm(full - approx) / max(np.linalg.norm(full), 1e-30))
    return Refit(np.asarray(kept), new_weight.astype(out_weight.dtype), bias_delta.astype(out_weight.dtype), rel)
