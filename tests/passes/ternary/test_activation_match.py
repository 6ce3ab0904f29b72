"""Closed-form activation scalars against Monte Carlo, and the two-level fit to ReLU."""

import numpy as np
import pytest

from symshrink.passes.ternary.activation_match import relu_scalars, solve_two_level, two_level_scalars

_XI = np.random.default_rng(0).standard_normal(1_000_000)
STANDARD_ERRORS = 5  # a closed form may differ from the Monte Carlo mean by this many standard errors


def _assert_monte_carlo(got, values: np.ndarray, tau: float) -> None:
    """Gaussian integration by parts: E s'(x) = E[xi s] / tau, E s''(x) = E[(xi^2 - 1) s] / tau^2."""
    samples = [_XI * values / tau, (_XI**2 - 1) * values / tau**2, (_XI**2 - 1) * (values - values.mean()) ** 2 / tau**2]
    for value, sample in zip((got.alpha1, got.alpha2, got.alpha3), samples):
        assert abs(value - sample.mean()) < STANDARD_ERRORS * sample.std() / np.sqrt(len(sample))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_two_level_scalars_match_monte_carlo(tau):
    _assert_monte_carlo(two_level_scalars(-0.5, 0.8, 1.3, tau), np.where((tau * _XI < -0.5) | (tau * _XI > 0.8), 1.3, 0.0),
                        tau)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_relu_scalars_match_monte_carlo_and_the_paper(tau):
    got = relu_scalars(tau)
    _assert_monte_carlo(got, np.maximum(tau * _XI, 0), tau)
    assert got.alpha1 == 0.5 and got.alpha3 == pytest.approx(1 - 1 / np.pi)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
def test_the_solved_two_level_activation_has_relus_matched_scalars(tau):
    fit = solve_two_level(relu_scalars(tau), tau, starts=16)
    got, want = two_level_scalars(fit.s1, fit.s2, fit.b, tau), relu_scalars(tau)
    assert fit.residual < 1e-8 and fit.s1 < fit.s2
    np.testing.assert_allclose(got.matched, want.matched, atol=1e-8)  # alpha1^2, alpha2^2, alpha3
