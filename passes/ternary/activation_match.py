"""Two-level activations matched to ReLU by the NTK-LC paper's scalars (closed forms, numpy/scipy).

For x = tau xi with xi ~ N(0, 1), Gaussian integration by parts gives E s'(x) = E[xi s(x)] / tau and
E s''(x) = E[(xi^2 - 1) s(x)] / tau^2, so a piecewise-constant s needs only the normal pdf and cdf at its
breaks. The paper's construction: s(x) = b 1{x < s1 or x > s2} whose alpha1^2, alpha2^2 and alpha3 equal
ReLU's (alpha1 = 1/2, alpha2 = 1 / (tau sqrt(2 pi)), alpha3 = 1 - 1/pi); the kernels see only these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.special import ndtr

__all__ = ["SQRT_2PI", "Scalars", "TwoLevel", "relu_scalars", "step_scalars", "two_level_scalars", "solve_two_level"]

SQRT_2PI = math.sqrt(2 * math.pi)


@dataclass(frozen=True)
class Scalars:
    """Gaussian moments of an activation at input scale tau: d0 = E sigma, the alphas, tau_out = std of sigma."""

    d0: float
    alpha1: float
    alpha2: float
    alpha3: float
    tau_out: float

    @property
    def matched(self) -> np.ndarray:
        """The three numbers the construction matches: alpha1^2, alpha2^2, alpha3."""
        return np.array([self.alpha1**2, self.alpha2**2, self.alpha3])


def relu_scalars(tau: float) -> Scalars:
    """Closed form: d0 = tau / sqrt(2 pi), alpha1 = 1/2, alpha2 = 1 / (tau sqrt(2 pi)), alpha3 = 1 - 1/pi,
    tau_out^2 = tau^2 (1/2 - 1/(2 pi))."""
    return Scalars(d0=tau / SQRT_2PI, alpha1=0.5, alpha2=1.0 / (tau * SQRT_2PI), alpha3=1.0 - 1.0 / math.pi,
                   tau_out=tau * math.sqrt(0.5 - 0.5 / math.pi))


def step_scalars(breaks: Sequence[float], levels: Sequence[float], tau: float) -> Scalars:
    """Closed form for a piecewise-constant sigma = levels[k] on (breaks[k-1], breaks[k]) (breaks sorted, len(levels) =
    len(breaks) + 1), with z = break / tau, phi/Phi the normal pdf/cdf: on a piece (l, u),
    E 1 = Phi(u) - Phi(l), E[xi 1] = phi(l) - phi(u), E[(xi^2 - 1) 1] = l phi(l) - u phi(u) (since (-x phi)' = (x^2 - 1) phi)."""
    z = np.asarray(breaks, dtype=float) / tau
    if np.any(np.diff(z) < 0):
        raise ValueError("breaks must be sorted")
    v = np.asarray(levels, dtype=float)
    pdf = np.exp(-0.5 * z**2) / SQRT_2PI
    prob = np.diff(np.concatenate([[0.0], ndtr(z), [1.0]]))
    first = np.concatenate([[0.0], pdf]) - np.concatenate([pdf, [0.0]])  # E[xi 1{piece}]
    zpdf = z * pdf
    second = np.concatenate([[0.0], zpdf]) - np.concatenate([zpdf, [0.0]])  # E[(xi^2 - 1) 1{piece}]
    d0 = float(v @ prob)
    var = float(((v - d0) ** 2) @ prob)
    return Scalars(d0=d0, alpha1=float(v @ first) / tau, alpha2=float(v @ second) / tau**2,
                   alpha3=float(((v - d0) ** 2) @ second) / tau**2, tau_out=math.sqrt(max(var, 0.0)))


def two_level_scalars(s1: float, s2: float, b: float, tau: float) -> Scalars:
    """sigma(x) = b 1{x < s1 or x > s2} (s1 <= s2). With a = s1/tau, c = s2/tau, P = Phi(a) + 1 - Phi(c):
    d0 = b P, alpha1 = b (phi(c) - phi(a)) / tau, alpha2 = b (c phi(c) - a phi(a)) / tau^2,
    alpha3 = b^2 (1 - 2P) (c phi(c) - a phi(a)) / tau^2 (as sigma^2 = b sigma), tau_out^2 = b^2 P (1 - P)."""
    return step_scalars((s1, s2), (b, 0.0, b), tau)


@dataclass(frozen=True)
class TwoLevel:
    """sigma(x) = b 1{x < s1 or x > s2}, solved at input scale tau; residual = max |matched - target| (alpha1^2,
    alpha2^2, alpha3)."""

    s1: float
    s2: float
    b: float
    tau: float
    residual: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return np.where((x < self.s1) | (x > self.s2), self.b, 0.0).astype(x.dtype, copy=False)

    @property
    def scalars(self) -> Scalars:
        return two_level_scalars(self.s1, self.s2, self.b, self.tau)


def solve_two_level(target: Scalars | Sequence[float], tau: float, starts: int = 200, seed: int = 0) -> TwoLevel:
    """(s1, s2, b) of b 1{x < s1 or x > s2} matching the target's alpha1^2, alpha2^2, alpha3 at input scale tau.
    Least squares (scipy trust-region) on x = (s1, log(s2 - s1), b) from `starts` random starts; the best residual wins,
    and among residuals within 1e-12 of it the one whose alpha1 and alpha2 signs agree with the target (the kernel only
    sees squares, so this is cosmetic). When no exact match exists the residual says by how much it misses."""
    alphas = (target.alpha1, target.alpha2, target.alpha3) if isinstance(target, Scalars) else tuple(target)
    goal = np.array([alphas[0] ** 2, alphas[1] ** 2, alphas[2]])
    scale = np.maximum(np.abs(goal), 1e-3)

    def unpack(x: np.ndarray) -> tuple[float, float, float]:
        return float(x[0]), float(x[0] + math.exp(min(x[1], 30.0))), float(x[2])

    def residuals(x: np.ndarray) -> np.ndarray:
        return (two_level_scalars(*unpack(x), tau).matched - goal) / scale

    rng = np.random.default_rng([seed, 11])
    found = []
    for _ in range(starts):
        x0 = np.array([rng.normal(0.0, 1.5) * tau, rng.normal(0.0, 1.0) + math.log(tau), rng.normal(0.0, 2.0)])
        fit = least_squares(residuals, x0, xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=400)
        s1, s2, b = unpack(fit.x)
        got = two_level_scalars(s1, s2, b, tau)
        residual = float(np.max(np.abs(got.matched - goal)))
        signs = int(np.sign(got.alpha1) == np.sign(alphas[0])) + int(np.sign(got.alpha2) == np.sign(alphas[1]))
        found.append((residual, -signs, s1, s2, b))
    best_residual = min(f[0] for f in found)
    residual, _, s1, s2, b = min(f for f in found if f[0] <= best_residual + 1e-12)
    return TwoLevel(s1=s1, s2=s2, b=b, tau=tau, residual=residual)


