"""Fold: data-free merging of similar units (model folding, Wang et al., ICLR 2025).

Units are clustered by k-means on their producer-side parameters p_i; each cluster becomes one unit
whose consumer rows are the sum of the members' rows. For a positively homogeneous activation
(phi(c z) = c phi(z), c > 0: ReLU) the units are first normalised, u_i = p_i / ||p_i||, with ||p_i||
moved into the consumer rows, and the merged unit is the centroid of the u_i. Averaging shrinks the
centroid's norm (and so its pre-activation variance) when members differ; the repair rescales it to
the members' mean norm (1 for normalised units), the data-free form of model folding's REPAIR.
"""

from __future__ import annotations

import numpy as np

from symshrink.passes.moment.kmeans import kmeans
from symshrink.passes.moment.selectors import Reduction, UnitProblem, check_width

__all__ = ["fold", "cluster_units"]


def cluster_units(points: np.ndarray, k: int, seed: int = 0) -> list[np.ndarray]:
    """k-means clusters of the rows of `points`, each a sorted index array, ordered by first member.
    Fewer than k come back when there are fewer distinct points."""
    labels = kmeans(points, k, seed=seed, n_init=3)
    clusters = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    return sorted(clusters, key=lambda members: members[0])


def fold(problem: UnitProblem, k: int) -> Reduction:
    if problem.unit_params is None:
        raise ValueError("fold needs the units' producer parameters")
    params = problem.unit_params.astype(np.float64)
    if (full := check_width(problem, k)) is not None:
        return full
    width, block = problem.width, problem.block
    w = problem.out_weight
    norms = np.linalg.norm(params, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    points = params / safe[:, None] if problem.homogeneous else params
    rows = w.astype(np.float64).reshape(width, -1)  # unit i's block rows, flattened
    if problem.homogeneous:
        rows = rows * norms[:, None]
    clusters = cluster_units(points, k, problem.seed)
    merge = np.zeros((len(clusters), width))
    new_rows = np.zeros((len(clusters), rows.shape[1]))
    for j, members in enumerate(clusters):
        centroid = points[members].mean(axis=0)
        size = np.linalg.norm(centroid)
        target = 1.0 if problem.homogeneous else norms[members].mean()
        # members that point apart shrink the mean to 1/sqrt(n) of their norm at most for orthogonal
        # ones; more shrinkage means opposite members, whose merge no rescaling can mend
        repair = min(target / size, np.sqrt(len(members))) if size > 0 else 1.0
        # new params = repair * mean(points) written as a combination of the original p_i
        merge[j, members] = repair / len(members) / (safe[members] if problem.homogeneous else 1.0)
        new_rows[j] = rows[members].sum(axis=0)
    kept = np.array([members[0] for members in clusters])
    weight = new_rows.reshape(len(clusters) * block, -1).astype(w.dtype)
    return Reduction(kept, weight, np.zeros(w.shape[1], w.dtype), merge=merge)
