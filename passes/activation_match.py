"""Two-level activations matched to ReLU by the NTK-LC paper's four scalars (closed forms, numpy/scipy).

For x = tau xi with xi ~ N(0, 1), Gaussian integration by parts gives E s'(x) = E[xi s(x)] / tau and
E s''(x) = E[(xi^2 - 1) s(x)] / tau^2, so a step function needs only the normal pdf at its breaks.
For s(x) = b 1{x < s1 or x > s2} and a_i = s_i / tau:
  alpha1 = b (phi(a2) - phi(a1)) / tau,  alpha2 = b (a2 phi(a2) - a1 phi(a1)) / tau^2,
  alpha3 = E[((s - d0)^2)''] = (d0^2 - (b - d0)^2) (a1 phi(a1) - a2 phi(a2)) / tau^2,  d0 = E s(x).
ReLU: alpha1 = 1/2, alpha2 = phi(0) / tau, alpha3 = 1 - 1/pi.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.stats import norm

__all__ = ["Scalars", "TwoLevel", "relu_scalars", "two_level_scalars", "solve_two_level"]


@dataclass(frozen=True)
class Scalars:
    alpha1: float
    alpha2: float
    alpha3: float


@dataclass(frozen=True)
class TwoLevel:
    """s(x) = level * 1{x < low or x > high}, and how far its scalars are from the target's."""

    low: float
    high: float
    level: float
    residual: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.where((x < self.low) | (x > self.high), self.level, 0.0)


def relu_scalars(tau: float) -> Scalars:
    return Scalars(0.5, float(norm.pdf(0.0)) / tau, 1.0 - 1.0 / np.pi)


def two_level_scalars(low: float, high: float, level: float, tau: float) -> Scalars:
    a1, a2 = low / tau, high / tau
    p1, p2 = norm.pdf(a1), norm.pdf(a2)
    mean = level * (1.0 - (norm.cdf(a2) - norm.cdf(a1)))
    return Scalars(float(level * (p2 - p1) / tau), float(level * (a2 * p2 - a1 * p1) / tau**2),
                   float((mean**2 - (level - mean) ** 2) * (a1 * p1 - a2 * p2) / tau**2))


def _residual(params: np.ndarray, target: Scalars, tau: float) -> np.ndarray:
    low, width, level = params
    got = two_level_scalars(low, low + abs(width), level, tau)
    return np.array([got.alpha1 - target.alpha1, got.alpha2 - target.alpha2, got.alpha3 - target.alpha3])


def solve_two_level(target: Scalars, tau: float, starts: int = 24, seed: int = 0) -> TwoLevel:
    """(low, high, level) whose alpha1, alpha2, alpha3 equal the target's: least squares from `starts` random
    starts (the system has several solutions and flat regions); the best one. The kernels depend on alpha1^2,
    alpha2^2 and alpha3 only; for ReLU the signed system has exact solutions too (a negative level)."""
    rng = np.random.default_rng(seed)
    best = None
    for start in np.column_stack([rng.uniform(-3, 1, starts), rng.uniform(0.1, 4, starts), rng.uniform(0.2, 4, starts)]):
        fit = least_squares(_residual, start * np.array([tau, tau, 1.0]), args=(target, tau), xtol=1e-12, ftol=1e-12)
        if best is None or fit.cost < best.cost:
            best = fit
    low, width, level = best.x
    return TwoLevel(float(low), float(low + abs(width)), float(level), float(np.sqrt(2 * best.cost)))
