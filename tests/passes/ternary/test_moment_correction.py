"""Per-unit scale and bias corrections of a ternary weight, checked on the data they claim to fit."""

import numpy as np
import pytest

from symshrink.calibration.stats import UnitStats
from symshrink.passes.ternary.correction import least_squares, match_moments
from symshrink.runtime.formats import ternarize


def _setup(seed=0, k=48, n=12, rows=4000):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 8)) @ rng.standard_normal((8, k)) + rng.standard_normal(k)  # correlated, off-centre
    w = rng.standard_normal((k, n))
    stats = UnitStats(k)
    stats.add(x)
    return x, w, ternarize(w, 16).dequantize(), stats


def test_matched_moments_are_the_original_ones():
    x, w, approx, stats = _setup()
    fix = match_moments(w, approx, stats.mean, stats.covariance)
    z, z_new = x @ w, (x @ approx) * fix.scale + fix.bias
    np.testing.assert_allclose(z_new.mean(0), z.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(z_new.std(0), z.std(0), rtol=1e-9)


def test_least_squares_is_the_best_affine_fit_of_each_unit():
    x, w, approx, stats = _setup(seed=1)
    fix = least_squares(w, approx, stats.mean, stats.covariance)
    z, zq = x @ w, x @ approx
    for j in range(w.shape[1]):
        design = np.column_stack([zq[:, j], np.ones(len(x))])
        (a, c), *_ = np.linalg.lstsq(design, z[:, j], rcond=None)
        assert fix.scale[j] == pytest.approx(a, rel=1e-8) and fix.bias[j] == pytest.approx(c, rel=1e-8, abs=1e-8)
    plain = np.mean((z - zq) ** 2)
    assert np.mean((z - (zq * fix.scale + fix.bias)) ** 2) < plain
