import numpy as np
import scipy.linalg

from symshrink.passes.selectors import refit_consumer, select_units


def _data(n=2000, d=64, m=10, seed=0):
    rng = np.random.default_rng(seed)
    h = np.maximum(rng.standard_normal((n, 16)) @ rng.standard_normal((16, d)), 0)
    return h.astype(np.float32), rng.standard_normal((d, m)).astype(np.float32)


def test_select_at_full_width_keeps_everything_and_refit_is_exact():
    h, w = _data()
    kept = select_units(h, w, h.shape[1])
    refit = refit_consumer(h, w, kept)
    np.testing.assert_array_equal(kept, np.arange(h.shape[1]))
    np.testing.assert_array_equal(refit.weight, w)
    np.testing.assert_array_equal(refit.bias_delta, np.zeros(w.shape[1], np.float32))
    assert refit.relative_error == 0.0


def test_select_matches_pivoted_qr_of_the_data():
    h, w = _data()
    scaled = (h - h.mean(0)).astype(np.float64) * np.linalg.norm(w, axis=1)
    _, _, pivots = scipy.linalg.qr(scaled, mode="economic", pivoting=True)
    np.testing.assert_array_equal(select_units(h, w, 12), np.sort(pivots[:12]))


def test_refit_recovers_low_rank_activations_exactly():
    # H has rank 16: any 16 independent units span it, so 20 selected units reproduce H W exactly
    rng = np.random.default_rng(0)
    h = (rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 64))).astype(np.float32)
    w = rng.standard_normal((64, 10)).astype(np.float32)
    kept = select_units(h, w, 20)
    refit = refit_consumer(h, w, kept, ridge=1e-9)
    approx = h[:, kept] @ refit.weight + refit.bias_delta
    assert np.linalg.norm(approx - h @ w) / np.linalg.norm(h @ w) < 1e-3
    assert refit.relative_error < 1e-3


def test_refit_beats_plain_pruning():
    rng = np.random.default_rng(3)
    h = np.maximum(rng.standard_normal((3000, 64)) @ rng.standard_normal((64, 128)), 0).astype(np.float32)
    w = rng.standard_normal((128, 8)).astype(np.float32)
    kept = select_units(h, w, 48)
    refit = refit_consumer(h, w, kept)
    pruned = np.linalg.norm(h[:, kept] @ w[kept] - h @ w) / np.linalg.norm(h @ w)
    assert refit.relative_error < 0.8 * pruned
