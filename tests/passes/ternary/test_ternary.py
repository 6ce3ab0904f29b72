"""Ternary layer numerics: the calibrated output error, the corrections, the 8-bit fallback and the codec choice."""

import numpy as np
import pytest

from symshrink.calibration.stats import UnitStats
from symshrink.passes.ternary.codes import encode_ternary, output_error
from symshrink.runtime.formats import quantize_uint8


def _layer(rows=96, cols=40, samples=4000, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((rows, rows)) / np.sqrt(rows)
    x = rng.standard_normal((samples, rows)) @ mixing + 0.5  # correlated inputs with a mean
    weight = rng.standard_normal((rows, cols)) * rng.uniform(0.2, 2.0, cols)
    stats = UnitStats(rows)
    stats.add(x)
    return x, weight, stats


def _empirical_error(x, weight, approx, shift):
    return np.linalg.norm(x @ (weight - approx) - (0 if shift is None else shift)) / np.linalg.norm(x @ weight)


@pytest.mark.parametrize("correction", ["none", "moments", "lstsq"])
def test_output_error_is_the_error_on_the_calibration_rows(correction):
    x, weight, stats = _layer()
    encoded = encode_ternary(weight, stats, 32, correction)
    approx = encoded.weight.dequantize().astype(np.float64)
    assert encoded.relative_error == pytest.approx(_empirical_error(x, weight, approx, encoded.shift), rel=1e-9)


def test_moment_correction_keeps_each_units_mean_and_variance():
    x, weight, stats = _layer()
    encoded = encode_ternary(weight, stats, 32, "moments")
    original = x @ weight
    compressed = x @ encoded.weight.dequantize().astype(np.float64) + encoded.shift
    np.testing.assert_allclose(compressed.mean(axis=0), original.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(compressed.std(axis=0), original.std(axis=0), rtol=1e-9)


def test_least_squares_beats_moments_and_no_correction_on_the_fitted_data():
    x, weight, stats = _layer()
    errors = {c: encode_ternary(weight, stats, 32, c).relative_error for c in ("none", "moments", "lstsq")}
    assert errors["lstsq"] < errors["moments"] and errors["lstsq"] < errors["none"]


def test_codes_are_ternary_with_zero_point_one():
    _, weight, stats = _layer()
    quantized = encode_ternary(weight, stats, 64, "lstsq").weight
    assert quantized.bits == 2 and set(np.unique(quantized.codes)) <= {0, 1, 2}
    assert np.all(quantized.zero_points == 1) and quantized.scales.shape == (2, weight.shape[1])


def test_uint8_error_is_within_half_a_step_and_zero_is_exact():
    weight = np.random.default_rng(3).standard_normal((100, 30))
    weight[5] = 0.0
    quantized = quantize_uint8(weight, 32)
    step = np.repeat(quantized.scales, 32, axis=0)[:100]
    assert np.all(np.abs(quantized.dequantize() - weight) <= step / 2 + 1e-12)
    assert np.all(quantized.dequantize()[5] == 0.0)


def test_output_error_without_calibration_is_the_weights_frobenius_error():
    weight = np.random.default_rng(0).standard_normal((64, 8))
    approx = weight * 0.9
    assert output_error(weight, approx, None, None) == pytest.approx(0.1)
