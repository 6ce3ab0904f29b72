"""Numeric contracts of the selectors, on synthetic activations (no graphs)."""

import numpy as np
import pytest
import scipy.linalg

from symshrink.calibration.stats import UnitStats, unfold_channels
from symshrink.passes.moment.fold import fold
from symshrink.passes.moment.recombine import caratheodory, recombine
from symshrink.passes.moment.selectors import UnitProblem, error_curve, magnitude, select, unit_columns


def _stats(h: np.ndarray, block: int = 1, batches: int = 4) -> UnitStats:
    stats = UnitStats(width=h.shape[1] // block, block=block)
    for part in np.array_split(h, batches):
        stats.add(part)
    return stats


def _relu_data(n=2000, d=64, m=10, seed=0):
    rng = np.random.default_rng(seed)
    h = np.maximum(rng.standard_normal((n, 16)) @ rng.standard_normal((16, d)) + 0.5, 0)
    return h.astype(np.float32), rng.standard_normal((d, m)).astype(np.float32)


def _true_error(h, w, reduction, block=1):
    approx = h[:, unit_columns(reduction.kept, block)] @ reduction.weight + reduction.bias_delta
    return np.linalg.norm(approx - h @ w) / np.linalg.norm(h @ w)


def test_streamed_moments_match_the_full_data():
    h, _ = _relu_data()
    shifted = h + np.float32(100.0)  # a large mean must not cost the covariance its precision
    exact = shifted.astype(np.float64)
    stats = _stats(shifted)
    np.testing.assert_allclose(stats.mean, exact.mean(0), rtol=1e-7)  # float32 rows: one rounding
    np.testing.assert_allclose(stats.covariance, np.cov(exact.T, bias=True), rtol=1e-4, atol=1e-4)


def test_select_at_full_width_is_exact():
    h, w = _relu_data()
    reduction = select(UnitProblem(w, stats=_stats(h)), h.shape[1])
    np.testing.assert_array_equal(reduction.kept, np.arange(h.shape[1]))
    np.testing.assert_array_equal(reduction.weight, w)
    np.testing.assert_array_equal(reduction.bias_delta, np.zeros(w.shape[1], np.float32))
    assert reduction.relative_error == 0.0


def test_select_order_is_pivoted_qr_of_the_scaled_data():
    h, w = _relu_data()
    scaled = (h - h.mean(0)).astype(np.float64) * np.linalg.norm(w, axis=1)
    _, _, pivots = scipy.linalg.qr(scaled, mode="economic", pivoting=True)
    curve = error_curve(UnitProblem(w, stats=_stats(h)))
    np.testing.assert_array_equal(curve.order[:12], pivots[:12])


def test_error_curve_is_the_least_squares_error_of_each_prefix():
    h, w = _relu_data()
    problem = UnitProblem(w, stats=_stats(h))
    curve = problem.curve
    assert curve.relative_error[0] == pytest.approx(np.linalg.norm(h @ w - (h @ w).mean(0)) / np.linalg.norm(h @ w))
    for k in (5, 20, 40):
        kept = curve.order[:k]
        design = np.column_stack([h[:, kept], np.ones(len(h))]).astype(np.float64)
        coef, *_ = np.linalg.lstsq(design, h @ w.astype(np.float64), rcond=None)
        direct = np.linalg.norm(design @ coef - h @ w) / np.linalg.norm(h @ w)
        assert curve.relative_error[k] == pytest.approx(direct, rel=1e-3, abs=1e-6)
    assert np.all(np.diff(curve.relative_error) <= 0)


def test_refit_of_low_rank_activations_is_exact_and_its_error_report_is_true():
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 64))).astype(np.float32)
    w = rng.standard_normal((64, 10)).astype(np.float32)
    reduction = select(UnitProblem(w, stats=_stats(h), ridge=1e-9), 20)
    assert _true_error(h, w, reduction) < 1e-3
    assert reduction.relative_error < 1e-3


def test_select_beats_pruning_and_reports_its_error():
    h, w = _relu_data(n=3000, d=128, seed=3)
    problem = UnitProblem(w, stats=_stats(h))
    selected, pruned = select(problem, 48), magnitude(problem, 48)
    assert selected.relative_error == pytest.approx(_true_error(h, w, selected), rel=1e-3)
    assert pruned.relative_error == pytest.approx(_true_error(h, w, pruned), rel=1e-3)
    assert selected.relative_error < 0.5 * pruned.relative_error


def test_blocks_select_whole_units():
    # heads: 6 units of 4 columns each; unit 2 is a copy of unit 0, so dropping it costs nothing
    rng = np.random.default_rng(1)
    h = rng.standard_normal((3000, 24)).astype(np.float32)
    h[:, 8:12] = h[:, 0:4]
    w = rng.standard_normal((24, 5)).astype(np.float32)
    reduction = select(UnitProblem(w, block=4, stats=_stats(h, block=4), ridge=1e-9), 5)
    assert 0 in reduction.kept or 2 in reduction.kept
    assert not {0, 2} <= set(reduction.kept.tolist())
    assert reduction.weight.shape == (20, 5)
    assert _true_error(h, w, reduction, block=4) < 1e-4


def test_caratheodory_keeps_every_moment_with_few_non_negative_masses():
    rng = np.random.default_rng(0)
    points, masses = rng.standard_normal((500, 30)), rng.uniform(0.1, 1.0, 500)
    new = caratheodory(points, masses)
    assert np.count_nonzero(new) <= 31
    assert np.all(new >= 0)
    np.testing.assert_allclose(new @ points, masses @ points, rtol=0, atol=1e-8 * np.abs(masses @ points).max())
    assert new.sum() == pytest.approx(masses.sum(), rel=1e-12)


def test_recombine_matches_its_moments_exactly():
    h, w = (a.astype(np.float64) for a in _relu_data(d=96))
    problem = UnitProblem(w, stats=_stats(h))
    reduction = recombine(problem, 24)
    assert reduction.width <= 24
    # the top 23 principal moments of the centred contributions are reproduced to 1e-8
    contributions = np.stack([np.outer(h[:, i] - h[:, i].mean(), w[i]).ravel() for i in range(96)]).astype(np.float64)
    _, _, basis = np.linalg.svd(contributions, full_matrices=False)
    before = basis[:23] @ contributions.sum(0)
    scale = np.zeros(96)
    scale[reduction.kept] = reduction.weight[:, 0] / w[reduction.kept, 0]
    after = basis[:23] @ (scale @ contributions)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-8 * np.abs(before).max())
    assert reduction.relative_error == pytest.approx(_true_error(h, w, reduction), rel=1e-3)


def test_fold_of_identical_units_is_exact():
    rng = np.random.default_rng(0)
    w_in = rng.standard_normal((8, 12))
    w_in = np.concatenate([w_in, w_in[:, :4], 2.0 * w_in[:, 4:8]], axis=1)  # 12 distinct units + 8 copies
    x = rng.standard_normal((100, 8))
    w_out = rng.standard_normal((20, 3))
    for homogeneous in (True, False):
        problem = UnitProblem(w_out, unit_params=w_in.T, homogeneous=homogeneous)
        reduction = fold(problem, 16 if homogeneous else 16)
        merged = reduction.merge @ w_in.T
        if homogeneous:  # 2 w is the same ReLU unit as w: 12 clusters cover all 20
            reduction = fold(problem, 12)
            merged = reduction.merge @ w_in.T
        np.testing.assert_allclose(np.maximum(x @ merged.T, 0) @ reduction.weight,
                                   np.maximum(x @ w_in, 0) @ w_out, rtol=1e-9, atol=1e-9)


def test_unfold_matches_a_direct_convolution():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((2, 3, 7, 6))
    filt = rng.standard_normal((4, 3, 3, 2))
    rows = unfold_channels(maps, (3, 2), strides=(2, 1), pads=(1, 0, 1, 1), dilations=(1, 2))
    out = rows.reshape(rows.shape[0], -1) @ filt.reshape(4, -1).T
    padded = np.pad(maps, ((0, 0), (0, 0), (1, 1), (0, 1)))
    ho, wo = (padded.shape[2] - 3) // 2 + 1, padded.shape[3] - 3 + 1
    direct = np.zeros((2, ho, wo, 4))
    for i in range(ho):
        for j in range(wo):
            patch = padded[:, :, 2 * i: 2 * i + 3, j: j + 3: 2]
            direct[:, i, j] = np.einsum("nchw,ochw->no", patch, filt)
    np.testing.assert_allclose(out, direct.reshape(-1, 4), rtol=1e-10, atol=1e-10)
