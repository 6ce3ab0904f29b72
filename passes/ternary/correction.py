"""Per-unit correction of a compressed weight from the input's calibration moments.

With inputs x of mean mu and covariance S, unit j's pre-activation z_j = x . w_j becomes
z'_j = a_j (x . w'_j) + c_j for the compressed column w'_j. `match_moments` picks a_j, c_j so that z'_j
has z_j's mean and variance: a_j = sqrt(w_j S w_j / w'_j S w'_j), c_j = mu . (w_j - a_j w'_j);
`least_squares` picks a_j = (w_j S w'_j) / (w'_j S w'_j) (the best linear fit of z_j by x . w'_j),
same c_j. a_j multiplies the unit's scales, c_j adds to its bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Correction", "match_moments", "least_squares"]


@dataclass(frozen=True)
class Correction:
    scale: np.ndarray  # [N] a_j
    bias: np.ndarray  # [N] c_j


def _quadratic_forms(weight: np.ndarray, approx: np.ndarray, covariance: np.ndarray):
    w, v = weight.astype(np.float64), approx.astype(np.float64)
    sv = covariance @ v
    return np.einsum("kn,kn->n", w, covariance @ w), np.einsum("kn,kn->n", w, sv), np.einsum("kn,kn->n", v, sv)


def _correction(scale: np.ndarray, weight: np.ndarray, approx: np.ndarray, mean: np.ndarray) -> Correction:
    bias = mean @ weight.astype(np.float64) - scale * (mean @ approx.astype(np.float64))
    return Correction(scale, bias)


def match_moments(weight: np.ndarray, approx: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> Correction:
    """a_j, c_j that give each unit's compressed pre-activation the original's mean and variance."""
    var_w, _, var_v = _quadratic_forms(weight, approx, covariance)
    scale = np.sqrt(np.divide(var_w, var_v, out=np.ones_like(var_w), where=var_v > 0))
    return _correction(scale, weight, approx, mean)


def least_squares(weight: np.ndarray, approx: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> Correction:
    """a_j, c_j minimising E (z_j - z'_j)^2 for each unit."""
    _, cross, var_v = _quadratic_forms(weight, approx, covariance)
    scale = np.divide(cross, var_v, out=np.ones_like(cross), where=var_v > 0)
    return _correction(scale, weight, approx, mean)
