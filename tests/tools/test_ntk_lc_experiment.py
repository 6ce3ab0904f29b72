"""Unit tests of the pure functions of tools/experiments/ntk_lc.py (the NTK-LC reproduction script)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from symshrink.passes.ternary.activation_match import TwoLevel, relu_scalars, solve_two_level, step_scalars, two_level_scalars

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "experiments" / "ntk_lc.py"


def _load():
    spec = importlib.util.spec_from_file_location("ntk_lc_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


lc = _load()
RELU_AT_1 = (0.5, 1 / math.sqrt(2 * math.pi), 1 - 1 / math.pi)


def alphas(s) -> np.ndarray:
    return np.array([s.alpha1, s.alpha2, s.alpha3])


def test_relu_alphas_at_tau_1():
    assert alphas(relu_scalars(1.0)) == pytest.approx(RELU_AT_1, abs=1e-12)
    # quadrature that knows the kink is exact; plain Gauss-Hermite converges slowly (O(1/nodes)) on it
    assert alphas(lc.activation_scalars(lc.relu, 1.0, breaks=(0.0,))) == pytest.approx(RELU_AT_1, abs=1e-9)
    assert alphas(lc.activation_scalars(lc.relu, 1.0)) == pytest.approx(RELU_AT_1, abs=1e-3)


@pytest.mark.parametrize("tau", [0.37, 1.0, 2.5])
def test_relu_closed_form_matches_quadrature(tau):
    closed = relu_scalars(tau)
    quad = lc.activation_scalars(lc.relu, tau, breaks=(0.0,))
    for name in ("d0", "alpha1", "alpha2", "alpha3", "tau_out"):
        assert getattr(quad, name) == pytest.approx(getattr(closed, name), abs=1e-9)


@pytest.mark.parametrize("s1, s2, b, tau", [(-2.21, -1.0, 2.41, 1.0), (-0.3, 0.8, -1.5, 0.6), (0.2, 0.25, 3.0, 2.0)])
def test_two_level_closed_form_matches_quadrature_and_monte_carlo(s1, s2, b, tau):
    closed = two_level_scalars(s1, s2, b, tau)
    sigma = TwoLevel(s1, s2, b, tau, 0.0)
    quad = lc.activation_scalars(sigma, tau, breaks=(s1, s2))
    for name in ("d0", "alpha1", "alpha2", "alpha3", "tau_out"):
        assert getattr(quad, name) == pytest.approx(getattr(closed, name), abs=1e-9)
    # Monte Carlo of the Stein forms E[xi s] / tau, E[(xi^2 - 1) s] / tau^2: within 5 standard errors
    xi = np.random.default_rng(3).standard_normal(400_000)
    s = sigma(tau * xi)
    for sample, value in ((xi * s / tau, closed.alpha1), ((xi**2 - 1) * s / tau**2, closed.alpha2),
                          ((xi**2 - 1) * (s - closed.d0) ** 2 / tau**2, closed.alpha3)):
        assert abs(sample.mean() - value) < 5 * sample.std() / math.sqrt(len(sample)) + 1e-12


def test_step_scalars_need_sorted_breaks():
    with pytest.raises(ValueError):
        step_scalars((1.0, 0.0), (1.0, 0.0, 1.0), 1.0)


def test_solver_matches_relu_at_tau_1():
    target = relu_scalars(1.0)
    sol = solve_two_level(target, 1.0, starts=30)
    assert sol.s1 <= sol.s2
    assert sol.residual < 1e-10
    assert sol.scalars.matched == pytest.approx(target.matched, abs=1e-9)
    # what it cannot match: a two-level output has far less of its variance in Hermite degrees 1-2 than ReLU (96.7%),
    # so with alpha1^2, alpha2^2 fixed its output scale tau_out is larger
    assert lc.hermite_fraction(target, 1.0) == pytest.approx(0.9669, abs=1e-4)
    assert lc.hermite_fraction(sol.scalars, 1.0) < 0.6
    assert sol.scalars.tau_out > 1.4 * target.tau_out


@pytest.mark.parametrize("eps", [0.0, 0.5, 0.9])
def test_ternary_weights_sparsity_and_unit_variance(eps):
    shape = (1000, 1000)
    w32 = lc.ternary_weights(np.random.default_rng(4), shape, eps)
    level = np.float32(1 / math.sqrt(1 - eps))
    assert w32.dtype == np.float32 and set(np.unique(w32)) <= {np.float32(0), level, -level}
    w = w32.astype(np.float64)
    n = w.size
    zero = np.mean(w == 0)
    assert abs(zero - eps) < 5 * math.sqrt(eps * (1 - eps) / n) + 1e-12
    # w^2 is 0 or 1/(1-eps): Var(w^2) = 1/(1-eps) - 1; Var(w) = 1
    assert abs(np.mean(w**2) - 1) < 5 * math.sqrt((1 / (1 - eps) - 1) / n) + 1e-12
    assert abs(np.mean(w)) < 5 / math.sqrt(n)
    with pytest.raises(ValueError):
        lc.ternary_weights(np.random.default_rng(0), (2, 2), 1.0)


def test_gaussian_weights_moments():
    w = lc.gaussian_weights(np.random.default_rng(5), (1000, 1000)).astype(np.float64)
    assert abs(w.mean()) < 5e-3 and abs(w.var() - 1) < 5 * math.sqrt(2 / w.size)


@pytest.mark.parametrize("activation", ["relu", "two-level"])
def test_infinite_width_kernel_matches_wide_monte_carlo(activation):
    """One hidden layer with Gaussian weights: the pre-activations are exactly Gaussian, so the exact expectation must
    agree with a 200k-unit average within 5 standard errors per entry."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 4))
    x[:, 1] = 0.6 * x[:, 0] + 0.8 * x[:, 1]  # one strongly correlated pair
    tau = math.sqrt(np.mean(np.sum(x**2, axis=0)) / 50)
    if activation == "relu":
        net = lc.relu_net(tau, 1, None, "relu")
    else:
        sol = solve_two_level(relu_scalars(tau), tau, starts=10)
        net = lc.two_level_net(lc.Design((relu_scalars(tau),), (sol,), (tau,), (tau,)), None, "two-level")
    exact = lc.infinite_width_kernel(x, net)
    h = lc.features(x, net, [200_000], np.random.default_rng(7)).astype(np.float64)
    for i in range(4):
        for j in range(4):
            products = h[:, i] * h[:, j]
            assert abs(products.mean() - exact[i, j]) < 5 * products.std() / math.sqrt(len(products)) + 1e-9


def test_conjugate_kernel_diagonal_is_predicted_scale():
    x = np.random.default_rng(8).standard_normal((400, 60))
    tau = math.sqrt(np.mean(np.sum(x**2, axis=0)) / 400)
    net = lc.relu_net(tau, 2, 0.5, "ternary relu")
    k = lc.conjugate_kernel(x, net, (1500, 1500), np.random.default_rng(9))
    assert k.shape == (60, 60) and np.allclose(k, k.T)
    assert np.mean(np.diag(k)) == pytest.approx(net.layers[-1].tau_out ** 2, rel=0.05)


def test_ternary_entropy():
    assert lc.ternary_entropy(0.0) == pytest.approx(1.0)
    assert lc.ternary_entropy(1 / 3) == pytest.approx(math.log2(3))
    assert lc.ternary_entropy(0.9) == pytest.approx(0.569, abs=1e-3)
    rows = lc.storage_rows([0.97])
    assert rows[0]["paper"] == pytest.approx(32 / 0.03)
