"""The numpy k-means that fold clusters units with."""

from __future__ import annotations

import numpy as np

from symshrink.passes.moment.kmeans import kmeans


def _inertia(x: np.ndarray, labels: np.ndarray) -> float:
    return float(sum(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum() for j in np.unique(labels)))


def test_separated_blobs_are_found():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 5)) * 20
    x = np.repeat(centres, 30, axis=0) + rng.standard_normal((180, 5))
    labels = kmeans(x, 6)
    truth = np.repeat(np.arange(6), 30)
    # each true blob is one cluster, whatever the numbering
    assert all(len(np.unique(labels[truth == j])) == 1 for j in range(6))
    assert len(np.unique(labels)) == 6


def test_k_distinct_points_give_k_clusters_and_duplicates_fewer():
    x = np.random.default_rng(1).standard_normal((40, 3))
    assert len(np.unique(kmeans(x, 40))) == 40
    assert len(np.unique(kmeans(x, 25))) == 25
    dup = np.repeat(x[:5], 4, axis=0)
    assert len(np.unique(kmeans(dup, 8))) == 5


def test_deterministic_and_better_than_random_labels():
    x = np.random.default_rng(2).standard_normal((300, 8)) * np.random.default_rng(3).gamma(1, 1, (300, 1))
    a, b = kmeans(x, 30, seed=4), kmeans(x, 30, seed=4)
    assert np.array_equal(a, b)
    random = np.random.default_rng(5).integers(0, 30, 300)
    assert _inertia(x, a) < 0.5 * _inertia(x, random)
