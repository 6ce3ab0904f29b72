"""k-means in numpy: Lloyd's iterations from k-means++ seeds, the best of a few starts by inertia.

The clustering of `fold` (scikit-learn's `KMeans(n_init=3)` before; scipy's `kmeans2` is 20x slower on
the unit counts of the zoo). Distances come from one matrix product per iteration. An empty cluster is
moved to the point farthest from its centre, so k distinct points always give k clusters; with fewer
distinct points than k, the seeding stops early and fewer clusters come back.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kmeans"]


def _sq_distances(x: np.ndarray, sq: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distances [n, k] between the rows of x (squared norms sq) and the centres."""
    return np.maximum(sq[:, None] - 2.0 * (x @ centres.T) + (centres * centres).sum(axis=1)[None, :], 0.0)


def _seeds(x: np.ndarray, sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (as scikit-learn's): at each step 2 + log k candidates are drawn with
    probability proportional to their squared distance from the nearest centre so far, and the one that
    lowers the summed distances most is kept; stops when every point coincides with a centre."""
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(len(x)))]
    closest = _sq_distances(x, sq, x[chosen])[:, 0]
    while len(chosen) < k and (total := closest.sum()) > 0:
        candidates = rng.choice(len(x), size=trials, p=closest / total)
        options = np.minimum(closest[:, None], _sq_distances(x, sq, x[candidates]))
        best = int(options.sum(axis=0).argmin())
        chosen.append(int(candidates[best]))
        closest = options[:, best]
    return x[chosen].copy()


def _lloyd(x: np.ndarray, sq: np.ndarray, centres: np.ndarray, max_iter: int, tol: float
           ) -> tuple[np.ndarray, float]:
    """Lloyd's iterations until the centres move by at most `tol` (summed squares): labels and inertia."""
    k = len(centres)
    for _ in range(max_iter):
        d2 = _sq_distances(x, sq, centres)
        labels = d2.argmin(axis=1)
        dist = d2[np.arange(len(x)), labels]
        counts = np.bincount(labels, minlength=k)
        for j in np.flatnonzero(counts == 0):  # an empty cluster takes the worst-fitted point
            far = int(dist.argmax())
            counts[labels[far]] -= 1
            labels[far], dist[far], counts[j] = j, 0.0, 1
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centres)
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= tol:
            break
    d2 = _sq_distances(x, sq, centres)
    labels = d2.argmin(axis=1)
    return labels, float(d2[np.arange(len(x)), labels].sum())


def kmeans(points: np.ndarray, k: int, seed: int = 0, n_init: int = 3, max_iter: int = 300,
           tol: float = 1e-4) -> np.ndarray:
    """Cluster labels [n] of the rows of `points` into at most k clusters: the best of `n_init` k-means++
    starts by inertia. `tol` is relative to the mean variance of the coordinates (as scikit-learn's)."""
    x = np.asarray(points, np.float64)
    sq = (x * x).sum(axis=1)
    tol_abs = tol * float(x.var(axis=0).mean())
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        labels, inertia = _lloyd(x, sq, _seeds(x, sq, min(k, len(x)), rng), max_iter, tol_abs)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best
