"""NTK-LC ("lossless" compression of random-feature networks, Gu, Du, Liao et al., arXiv 2403.00258), reproduced.

The paper's claim: for a fully connected random-feature network (hidden weights random and frozen)
on high-dimensional Gaussian-mixture data, the conjugate kernel (CK) depends on each layer's
activation only through a few Gaussian moments at the layer's input scale tau (xi ~ N(0, 1)):

    alpha1 = E sigma'(tau xi),  alpha2 = E sigma''(tau xi),  alpha3 = E[((sigma(tau xi) - d0)^2)''],
    d0 = E sigma(tau xi)  (subtracted: activations are centred),  tau_out^2 = Var sigma(tau xi),

and on the weights only through their mean and variance. So dense Gaussian weights may be replaced by
sparse ternary ones (0 with probability eps, else +-1/sqrt(1 - eps)) and ReLU by a two-level
activation b * 1{x < s1 or x > s2} whose (s1, s2, b) match alpha1^2, alpha2^2 and alpha3 layer by
layer; the limiting kernel is then the same except for tau_L^2 on its diagonal (the paper's
construction matches tau_L with a richer last-layer activation).

What this script measures:

A. Gaussian mixture (two classes, means +-mu, covariances I and (1 + c/sqrt(p)) I, ||x||^2 / p ~ 1),
   3 hidden layers, the two-level activations solved layer by layer.
   A1, infinite width: the CK's exact limit as the widths grow (Gaussian expectations layer by layer:
   arc-cosine formula for ReLU, bivariate-normal rectangle probabilities for the two-level), ReLU chain
   against two-level chain: what the "lossless" equivalence is about, free of weight noise.
   A2, finite width: the CK Sigma_L^T Sigma_L / d_L averaged over `draws` independent weight draws,
   dense Gaussian + ReLU (reference) against: the same network with independent draws (noise floor),
   ternary weights + ReLU (control: only the weights change), dense and ternary weights + two-level.
   Reported: spectral-norm distances relative to ||K_inf,ReLU||, raw, after adding the predicted diagonal
   shift (tau_L,ReLU^2 - tau_L^2) I (computed from the scalars, not fitted), and with the all-ones direction
   removed as well; the largest gap between sorted eigenvalues; the top eigenvalue, the all-ones Rayleigh
   quotient, the label alignment of the top eigenvector. Plot of overlaid eigenvalue histograms:
   <img-dir>/ntk-lc-spectra.png.
B. Fashion-MNIST: the same kinds of networks (2 hidden layers) as frozen feature maps with a ridge
   read-out on one-hot labels (ridge chosen on a held-out part of the training set), accuracy on the
   10k test images; plus a linear ridge on the pixels for scale.
C. Storage arithmetic: the paper's 32 / (1 - eps) ratio against the entropy of a ternary source and
   stock 2-bit storage.

All random draws come from fixed seeds (numpy default_rng); tables are printed as markdown.

    .venv/bin/python tools/experiments/ntk_lc.py            # full run (docs/ntk-lc.md), plots to docs/img
    .venv/bin/python tools/experiments/ntk_lc.py --quick    # smoke test, plots to a temp dir
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss
from scipy.linalg import eigvalsh
from scipy.optimize import least_squares
from scipy.sparse.linalg import eigsh
from scipy.special import ndtr
from tqdm import tqdm

from symshrink.passes.ternary.activation_match import (
    SQRT_2PI,
    Scalars,
    TwoLevel,
    relu_scalars,
    solve_two_level,
    step_scalars,
)

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
Activation = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Config:
    p: int  # experiment A: data dimension
    n: int  # experiment A: samples (half per class)
    mu_norm: float  # ||mu||: class means are +-mu (data entries O(1))
    cov_shift: float  # class 2 covariance (1 + cov_shift / sqrt(p)) I
    widths: tuple[int, ...]  # experiment A hidden widths
    draws: int  # experiment A: weight draws averaged per kernel
    eps_a: tuple[float, ...]
    fm_widths: tuple[int, ...]  # experiment B hidden widths
    fm_train: int  # training images used (first ones of a fixed permutation); the last fm_val of them pick the ridge
    fm_val: int
    fm_test: int  # test images (all 10k in the full run)
    eps_b: tuple[float, ...]
    starts: int  # solver restarts


FULL = Config(p=2000, n=1600, mu_norm=3.0, cov_shift=5.0, widths=(2000, 2000, 1000), draws=16, eps_a=(0.5, 0.9),
              fm_widths=(2000, 2000), fm_train=60000, fm_val=5000, fm_test=10000, eps_b=(0.0, 0.5, 0.9), starts=200)
QUICK = Config(p=300, n=200, mu_norm=3.0, cov_shift=5.0, widths=(300, 300, 200), draws=2, eps_a=(0.5, 0.9),
               fm_widths=(256, 256), fm_train=4000, fm_val=1000, fm_test=2000, eps_b=(0.0, 0.9), starts=40)
RIDGE_GRID = tuple(10.0 ** np.arange(-6.0, 1.5, 0.5))  # ridge / (tr(G) / d)


# ---------------------------------------------------------------------------------------------------------------------
# Activation scalars


def _gauss_nodes(tau: float, breaks: Sequence[float], nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes xi and weights w with sum w f(xi) ~ E f(xi), xi ~ N(0, 1). Without breaks: Gauss-Hermite (probabilists').
    With breaks (kinks/jumps of sigma, in x units): composite Gauss-Legendre on the pieces between them, so a
    piecewise smooth sigma is integrated to near machine precision."""
    if not breaks:
        xi, w = hermegauss(nodes)
        return xi, w / w.sum()
    cuts = np.unique(np.clip(np.asarray(breaks, dtype=float) / tau, -12.0, 12.0))
    edges = np.concatenate([[-12.0], cuts, [12.0]])
    edges = np.unique(np.concatenate([edges, np.linspace(-12.0, 12.0, 49)]))  # panels of width <= 0.5
    x, v = leggauss(32)
    lo, hi = edges[:-1, None], edges[1:, None]
    xi = (0.5 * (hi - lo) * x + 0.5 * (hi + lo)).ravel()
    w = (0.5 * (hi - lo) * v).ravel() * np.exp(-0.5 * xi**2) / SQRT_2PI
    return xi, w


def activation_scalars(sigma: Activation, tau: float, breaks: Sequence[float] = (), nodes: int = 200) -> Scalars:
    """alpha1, alpha2, alpha3 (and d0, tau_out) of sigma at scale tau by quadrature, using Gaussian integration by parts
    E f'(tau xi) = E[xi f(tau xi)] / tau and E f''(tau xi) = E[(xi^2 - 1) f(tau xi)] / tau^2 so sigma needs no derivative
    (ReLU, step functions). Pass sigma's kinks and jumps as `breaks` for exact piecewise quadrature; plain Gauss-Hermite
    (numpy's hermegauss overflows at 400 nodes) converges only like O(1/nodes) on a kink."""
    xi, w = _gauss_nodes(tau, breaks, nodes)
    s = np.asarray(sigma(tau * xi), dtype=float)
    d0 = float(w @ s)
    he2 = xi**2 - 1.0
    return Scalars(d0=d0, alpha1=float(w @ (xi * s)) / tau, alpha2=float(w @ (he2 * s)) / tau**2,
                   alpha3=float(w @ (he2 * (s - d0) ** 2)) / tau**2, tau_out=math.sqrt(max(float(w @ (s - d0) ** 2), 0.0)))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def solve_three_level_last(target: Scalars, tau: float, starts: int = 200, seed: int = SEED) -> tuple[float, np.ndarray]:
    """Attempt to match tau_out too (4 equations): sigma = b1 1{x < s1} + b2 1{x > s2}, levels {b1, 0, b2}.
    Returns the best max residual over (alpha1^2, alpha2^2, alpha3, tau_out^2) and (s1, s2, b1, b2)."""
    goal = np.append(target.matched, target.tau_out**2)

    def scalars(x: np.ndarray) -> Scalars:
        return step_scalars((x[0], x[0] + math.exp(min(x[1], 30.0))), (x[2], 0.0, x[3]), tau)

    def residuals(x: np.ndarray) -> np.ndarray:
        got = scalars(x)
        return np.append(got.matched, got.tau_out**2) - goal

    rng = np.random.default_rng([seed, 13])
    best = (math.inf, np.zeros(4))
    for _ in range(starts):
        x0 = np.array([rng.normal(0.0, 1.5) * tau, rng.normal(0.0, 1.0) + math.log(tau), rng.normal(0.0, 2.0),
                       rng.normal(0.0, 2.0)])
        fit = least_squares(residuals, x0, max_nfev=400)
        residual = float(np.max(np.abs(residuals(fit.x))))
        if residual < best[0]:
            best = (residual, np.array([fit.x[0], fit.x[0] + math.exp(min(fit.x[1], 30.0)), fit.x[2], fit.x[3]]))
    return best


def hermite_fraction(s: Scalars, tau: float) -> float:
    """Share of Var sigma(tau xi) in Hermite degrees 1 and 2: (E[xi sigma]^2 + E[(xi^2 - 1) sigma]^2 / 2) / Var sigma
    = (alpha1^2 tau^2 + alpha2^2 tau^4 / 2) / tau_out^2 <= 1 (Bessel). Matching alpha1^2, alpha2^2 and tau_out at once
    needs this share to be equal too."""
    return (s.alpha1**2 * tau**2 + s.alpha2**2 * tau**4 / 2) / s.tau_out**2


# ---------------------------------------------------------------------------------------------------------------------
# Random weights and networks


def ternary_weights(rng: np.random.Generator, shape: tuple[int, int], eps: float, dtype=np.float32) -> np.ndarray:
    """0 with probability eps, else +-1/sqrt(1 - eps) with equal probability: zero mean, unit variance."""
    if not 0.0 <= eps < 1.0:
        raise ValueError("eps must be in [0, 1)")
    value = 1.0 / math.sqrt(1.0 - eps)
    signs = rng.integers(0, 2, size=shape, dtype=np.int8).astype(dtype) * (2 * value) - value
    if eps > 0:
        signs[rng.random(shape, dtype=np.float32) < eps] = 0.0
    return signs


def gaussian_weights(rng: np.random.Generator, shape: tuple[int, int], dtype=np.float32) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)


@dataclass(frozen=True)
class Layer:
    """One hidden layer: activation (centred by subtracting d0) and its predicted input/output scales."""

    activation: Activation
    d0: float
    tau_in: float
    tau_out: float
    name: str


@dataclass(frozen=True)
class Net:
    """A random-feature network recipe: weights 'gaussian' (eps None) or ternary with sparsity eps, and its layers."""

    label: str
    eps: float | None
    layers: tuple[Layer, ...]


def features(x: np.ndarray, net: Net, widths: Sequence[int], rng: np.random.Generator, stats: list | None = None) -> np.ndarray:
    """Sigma_L for one weight draw: h_0 = x [p, n]; h_l = sigma_l(W_l h_{l-1} / sqrt(d_{l-1})) - d0_l, W_l [d_l, d_{l-1}].
    With `stats`, appends per layer the rms of the pre-activation."""
    h = np.asarray(x, dtype=np.float32)
    for layer, width in zip(net.layers, widths, strict=True):
        shape = (width, h.shape[0])
        w = gaussian_weights(rng, shape) if net.eps is None else ternary_weights(rng, shape, net.eps)
        z = w @ h
        z *= np.float32(1.0 / math.sqrt(h.shape[0]))
        h = layer.activation(z).astype(np.float32, copy=False)
        h -= np.float32(layer.d0)
        if stats is not None:
            stats.append(float(np.sqrt(np.mean(z**2, dtype=np.float64))))
    return h


def conjugate_kernel(x: np.ndarray, net: Net, widths: Sequence[int], rng: np.random.Generator, draws: int = 1,
                     stats: list | None = None) -> np.ndarray:
    """CK = Sigma_L^T Sigma_L / d_L (n x n, float64), averaged over `draws` independent weight draws. With `stats`,
    appends per layer the rms pre-activation averaged over the draws."""
    n = x.shape[1]
    total = np.zeros((n, n))
    collected: list = []
    for _ in range(draws):
        h = features(x, net, widths, rng, collected)
        total += (h.T @ h).astype(np.float64) / h.shape[0]
    if stats is not None:
        stats.extend(float(v) for v in np.mean(np.array(collected).reshape(draws, len(net.layers)), axis=0))
    return total / draws


def relu_net(tau0: float, depth: int, eps: float | None, label: str) -> Net:
    layers, tau = [], tau0
    for _ in range(depth):
        s = relu_scalars(tau)
        layers.append(Layer(relu, s.d0, tau, s.tau_out, "relu"))
        tau = s.tau_out
    return Net(label, eps, tuple(layers))


@dataclass(frozen=True)
class Design:
    """Layer-by-layer two-level match of a ReLU network: targets at the ReLU net's input scale, solutions at the
    two-level net's own input scale (each layer sees the previous two-level layer's output scale)."""

    targets: tuple[Scalars, ...]
    solutions: tuple[TwoLevel, ...]
    tau_relu: tuple[float, ...]  # input scales of the ReLU net, tau_0 .. tau_L
    tau_new: tuple[float, ...]


def design_two_level(tau0: float, depth: int, starts: int) -> Design:
    targets, solutions, tau_relu, tau_new = [], [], [tau0], [tau0]
    for layer in range(depth):
        target = relu_scalars(tau_relu[-1])
        solution = solve_two_level(target, tau_new[-1], starts=starts, seed=SEED + layer)
        targets.append(target)
        solutions.append(solution)
        tau_relu.append(target.tau_out)
        tau_new.append(solution.scalars.tau_out)
    return Design(tuple(targets), tuple(solutions), tuple(tau_relu), tuple(tau_new))


def two_level_net(design: Design, eps: float | None, label: str) -> Net:
    layers = tuple(Layer(sol, sol.scalars.d0, sol.tau, sol.scalars.tau_out, "two-level") for sol in design.solutions)
    return Net(label, eps, layers)


# ---------------------------------------------------------------------------------------------------------------------
# Experiment A: CK spectra on a Gaussian mixture


def gaussian_mixture(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """X [p, n] with columns x = +-mu + C_a^{1/2} z, z ~ N(0, I_p) (entries O(1), ||x||^2 / p ~ 1; the paper's x / sqrt(p)
    is the same network once the first layer divides by sqrt(p)): class +1: mean +mu, covariance I; class -1: mean -mu,
    covariance (1 + cov_shift / sqrt(p)) I. Returns X and the labels y in {+1, -1}."""
    rng = np.random.default_rng([SEED, 1])
    mu = rng.standard_normal(cfg.p)
    mu *= cfg.mu_norm / np.linalg.norm(mu)
    half = cfg.n // 2
    y = np.concatenate([np.ones(half), -np.ones(cfg.n - half)])
    scale = np.where(y > 0, 1.0, math.sqrt(1.0 + cfg.cov_shift / math.sqrt(cfg.p)))
    x = mu[:, None] * y[None, :] + rng.standard_normal((cfg.p, cfg.n)) * scale[None, :]
    return x, y


def _pair_probabilities(z_row: np.ndarray, z_col: np.ndarray, rho: np.ndarray, nodes: int) -> np.ndarray:
    """d/d rho-integral part of Phi2: sum over the corners of [s1, s2]^2 of +-int_0^rho phi2(h, k; r) dr (Gauss-Legendre in
    r), so that P(u in I, v in I) = P(u in I) P(v in I) + this (Plackett's identity d Phi2 / d rho = phi2)."""
    x, w = leggauss(nodes)
    total = np.zeros_like(rho)
    corners = [(z_row[1], z_col[1], 1.0), (z_row[0], z_col[1], -1.0), (z_row[1], z_col[0], -1.0), (z_row[0], z_col[0], 1.0)]
    for node, weight in zip(x, w):
        r = 0.5 * rho * (node + 1.0)
        one_minus = 1.0 - r * r
        norm = 0.5 * rho * weight / (2 * math.pi * np.sqrt(one_minus))
        for h, k, sign in corners:
            h, k = h[:, None], k[None, :]
            total += sign * norm * np.exp(-(h * h - 2 * r * h * k + k * k) / (2 * one_minus))
    return total


def pair_expectation(activation: Activation, k: np.ndarray, d0: float, nodes: int = 24) -> np.ndarray:
    """K'[i, j] = E[(sigma(u) - d0)(sigma(v) - d0)] for (u, v) ~ N(0, [[k_ii, k_ij], [k_ij, k_jj]]): closed form for ReLU
    (arc-cosine kernel), bivariate-normal rectangle probabilities for a TwoLevel (off-diagonal correlations must stay
    well inside (-1, 1), as they do for distinct high-dimensional samples)."""
    sd = np.sqrt(np.diag(k))
    rho = np.clip(k / np.outer(sd, sd), -1.0, 1.0)
    if activation is relu:
        second = np.outer(sd, sd) / (2 * math.pi) * (np.sqrt(1 - rho**2) + (math.pi - np.arccos(rho)) * rho)
        mean = sd / SQRT_2PI
    elif isinstance(activation, TwoLevel):
        z = (activation.s1 / sd, activation.s2 / sd)
        inside = ndtr(z[1]) - ndtr(z[0])  # P(u in (s1, s2)), where sigma = 0
        off = rho.copy()
        np.fill_diagonal(off, 0.0)
        both_inside = np.outer(inside, inside) + _pair_probabilities(z, z, off, nodes)
        second = activation.b**2 * (1.0 - inside[:, None] - inside[None, :] + both_inside)
        np.fill_diagonal(second, activation.b**2 * (1.0 - inside))
        mean = activation.b * (1.0 - inside)
    else:
        raise TypeError("pair_expectation knows relu and TwoLevel")
    return second - d0 * (mean[:, None] + mean[None, :]) + d0 * d0


def infinite_width_kernel(x: np.ndarray, net: Net) -> np.ndarray:
    """The CK's limit as every hidden width grows (for any i.i.d. zero-mean unit-variance weights, by the CLT):
    K_0 = X^T X / p, K_l = pair_expectation(sigma_l, K_{l-1}, d0_l). No weight noise: the deterministic kernel that the
    paper's "lossless" equivalence is about (its theorem approximates this by a closed form in the alphas)."""
    k = x.T @ x / x.shape[0]
    for layer in net.layers:
        k = pair_expectation(layer.activation, k, layer.d0)
    return k


def spectral_norm(a: np.ndarray) -> float:
    """||a||_2 of a symmetric matrix (Lanczos on the largest |eigenvalue|)."""
    if not np.any(a):
        return 0.0
    v0 = np.random.default_rng(SEED).standard_normal(len(a))
    return float(abs(eigsh(a, k=1, which="LM", return_eigenvectors=False, tol=1e-10, v0=v0)[0]))


def center_rows_cols(a: np.ndarray) -> np.ndarray:
    """P a P with P = I - 11^T / n: the kernel with the all-ones (constant feature) direction removed."""
    a = a - a.mean(axis=0, keepdims=True)
    return a - a.mean(axis=1, keepdims=True)


def spectral_summary(k: np.ndarray, y: np.ndarray) -> dict:
    """Eigenvalues, the top one, and |<v, y>| / ||y|| for the top eigenvector v of P K P (all-ones direction removed)."""
    values = eigvalsh(k)
    v0 = np.random.default_rng(SEED).standard_normal(len(k))
    _, vector = eigsh(center_rows_cols(k), k=1, which="LA", tol=1e-10, v0=v0)
    return {"eig": values, "top": float(values[-1]), "align": float(abs(vector[:, 0] @ y) / np.linalg.norm(y)),
            "diag": float(np.mean(np.diag(k))), "ones": float(np.mean(k))}


def compare(k: np.ndarray, eig: np.ndarray, k_ref: np.ndarray, eig_ref: np.ndarray, shift: float, norm: float) -> dict:
    """Spectral-norm distance to a reference, raw, after adding shift * I, and the latter with the all-ones direction
    removed (what a read-out with an intercept sees); largest sorted-eigenvalue gap after the shift."""
    diff = k - k_ref
    shifted = diff + shift * np.eye(len(k))
    return {"raw": spectral_norm(diff) / norm, "shifted": spectral_norm(shifted) / norm,
            "centred": spectral_norm(center_rows_cols(shifted)) / norm,
            "gap_shifted": float(np.max(np.abs(eig + shift - eig_ref))) / norm}


def experiment_a(cfg: Config, design: Design) -> tuple[list[dict], list[dict], dict]:
    """A1: infinite-width kernels of the ReLU chain and of its two-level match. A2: finite-width Monte Carlo kernels."""
    x, y = gaussian_mixture(cfg)
    tau0 = design.tau_relu[0]
    depth = len(cfg.widths)
    ref_tau2 = design.tau_relu[-1] ** 2
    relu_chain = relu_net(tau0, depth, None, "ReLU")
    two_chain = two_level_net(design, None, "two-level")
    limits = {}
    for name, net in (("ReLU", relu_chain), ("two-level", two_chain)):
        start = time.perf_counter()
        k = infinite_width_kernel(x, net)
        limits[name] = {"k": k, **spectral_summary(k, y), "seconds": time.perf_counter() - start,
                        "tau_L2": net.layers[-1].tau_out ** 2, "shift": ref_tau2 - net.layers[-1].tau_out ** 2}
    k_inf, inf = limits["ReLU"]["k"], limits["ReLU"]
    norm = spectral_norm(k_inf)
    limit_rows = [{"label": f"{name}, infinite width", **{key: v for key, v in rec.items() if key != "k"},
                   **compare(rec["k"], rec["eig"], k_inf, inf["eig"], rec["shift"], norm)} for name, rec in limits.items()]

    nets = [(relu_net(tau0, depth, None, "dense Gaussian + ReLU (reference)"), 0),
            (relu_net(tau0, depth, None, "dense Gaussian + ReLU, independent draws (noise floor)"), 1)]
    nets += [(relu_net(tau0, depth, eps, f"ternary eps={eps:g} + ReLU (control)"), 2 + i) for i, eps in enumerate(cfg.eps_a)]
    nets.append((two_level_net(design, None, "dense Gaussian + two-level"), 10))
    nets += [(two_level_net(design, eps, f"ternary eps={eps:g} + two-level"), 11 + i) for i, eps in enumerate(cfg.eps_a)]
    rows = []
    reference = None
    for net, stream in tqdm(nets, desc="A: kernels", unit="net"):
        start = time.perf_counter()
        layer_stats: list = []
        k = conjugate_kernel(x, net, cfg.widths, np.random.default_rng([SEED, 100 + stream]), cfg.draws, layer_stats)
        summary = spectral_summary(k, y)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = (k, summary["eig"])
        two = net.layers[-1].name == "two-level"
        own = limits["two-level" if two else "ReLU"]
        shift = ref_tau2 - net.layers[-1].tau_out ** 2
        rows.append({"label": net.label, **summary, "seconds": seconds, "tau_L2": net.layers[-1].tau_out ** 2, "shift": shift,
                     "two_level": two, "vs_mc": compare(k, summary["eig"], *reference, shift, norm),
                     "vs_limit": compare(k, summary["eig"], k_inf, inf["eig"], shift, norm),
                     "vs_own": spectral_norm(k - own["k"]) / norm, "layers": layer_stats,
                     "predicted_rms": [layer.tau_in for layer in net.layers]})
    info = {"tau0": tau0, "n": cfg.n, "p": cfg.p, "norm": norm, "limit_eig": inf["eig"],
            "two_limit_eig": limits["two-level"]["eig"], "two_shift": limits["two-level"]["shift"]}
    return limit_rows, rows, info


# ---------------------------------------------------------------------------------------------------------------------
# Experiment B: Fashion-MNIST random features + ridge read-out


def fmnist_data(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels flattened, centred per pixel (train means) and scaled by one global factor so that the mean of
    ||x||^2 / p over the training images is 1. Returns [p, n] arrays: fit, val, test and their labels."""
    from symshrink.models.fmnist import load_fmnist  # noqa: PLC0415 (the data only when the experiment runs)

    images, labels = load_fmnist("train")
    order = np.random.default_rng([SEED, 2]).permutation(len(images))[: cfg.fm_train]
    train = images[order].reshape(len(order), -1).astype(np.float64)
    train_y = labels[order]
    test_images, test_labels = load_fmnist("test")
    test = test_images[: cfg.fm_test].reshape(cfg.fm_test, -1).astype(np.float64)
    mean = train.mean(axis=0)
    scale = math.sqrt(float(np.mean(np.sum((train - mean) ** 2, axis=1))) / train.shape[1])
    prep = [((a - mean) / scale).T.astype(np.float32) for a in (train, test)]
    fit, val = prep[0][:, : cfg.fm_train - cfg.fm_val], prep[0][:, cfg.fm_train - cfg.fm_val:]
    cut = cfg.fm_train - cfg.fm_val
    return fit, val, prep[1], train_y[:cut], train_y[cut:], test_labels[: cfg.fm_test]


def gram(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(F F^T in float64, row sums, count) of features f [d, n]."""
    return (f @ f.T).astype(np.float64), f.sum(axis=1, dtype=np.float64), f.shape[1]


def ridge_fit(stats: tuple[np.ndarray, np.ndarray, int], cross: np.ndarray, ysum: np.ndarray) -> tuple:
    """Eigen-decomposition of the centred Gram G = sum (f - m)(f - m)^T and B = sum (f - m)(y - ybar)^T, from the
    uncentred sums (the mean is an unpenalised intercept)."""
    g, s, n = stats
    m = s / n
    ybar = ysum / n
    g_c = g - n * np.outer(m, m)
    b_c = cross - n * np.outer(m, ybar)
    values, vectors = np.linalg.eigh(g_c)
    return values, vectors, vectors.T @ b_c, m, ybar, float(np.trace(g_c)) / len(g_c)


def ridge_predict(solution: tuple, ridge_rel: float, f: np.ndarray) -> np.ndarray:
    values, vectors, vb, m, ybar, mean_eig = solution
    w = vectors @ (vb / (np.maximum(values, 0.0) + ridge_rel * mean_eig)[:, None])
    return (f.T.astype(np.float64) - m) @ w + ybar


def readout_accuracy(feats: Callable[[np.ndarray], np.ndarray], data: tuple) -> dict:
    """Ridge on one-hot labels: pick the ridge (RIDGE_GRID, relative to the mean Gram eigenvalue) on the validation
    images, refit on fit + validation, report test accuracy."""
    fit, val, test, y_fit, y_val, y_test = data
    one_hot = np.eye(10)
    f_fit = feats(fit)
    stats_fit = gram(f_fit)
    cross_fit = (f_fit @ one_hot[y_fit].astype(np.float32)).astype(np.float64)
    solution = ridge_fit(stats_fit, cross_fit, one_hot[y_fit].sum(axis=0))
    del f_fit
    f_val = feats(val)
    val_acc = [float(np.mean(ridge_predict(solution, r, f_val).argmax(axis=1) == y_val)) for r in RIDGE_GRID]
    best = max(range(len(RIDGE_GRID)), key=lambda i: (val_acc[i], i))  # ties: the larger ridge
    stats_val = gram(f_val)
    stats = (stats_fit[0] + stats_val[0], stats_fit[1] + stats_val[1], stats_fit[2] + stats_val[2])
    cross = cross_fit + (f_val @ one_hot[y_val].astype(np.float32)).astype(np.float64)
    del f_val
    solution = ridge_fit(stats, cross, one_hot[y_fit].sum(axis=0) + one_hot[y_val].sum(axis=0))
    f_test = feats(test)
    acc = float(np.mean(ridge_predict(solution, RIDGE_GRID[best], f_test).argmax(axis=1) == y_test))
    return {"val": val_acc[best], "ridge": RIDGE_GRID[best], "test": acc, "scale": float(np.sqrt(np.mean(f_test**2)))}


def experiment_b(cfg: Config) -> tuple[list[dict], dict, Design]:
    data = fmnist_data(cfg)
    tau0 = math.sqrt(float(np.mean(np.sum(data[0] ** 2, axis=0, dtype=np.float64))) / data[0].shape[0])
    depth = len(cfg.fm_widths)
    design = design_two_level(tau0, depth, cfg.starts)
    nets: list[tuple[Net | None, int]] = [(None, 0)]
    nets += [(relu_net(tau0, depth, None, "dense Gaussian + ReLU"), 1),
             (relu_net(tau0, depth, None, "dense Gaussian + ReLU, other seed"), 2)]
    nets += [(relu_net(tau0, depth, eps, f"ternary eps={eps:g} + ReLU (control)"), 3 + i) for i, eps in enumerate(cfg.eps_b)
             if eps > 0]
    nets.append((two_level_net(design, None, "dense Gaussian + two-level"), 10))
    nets += [(two_level_net(design, eps, f"ternary eps={eps:g} + two-level"), 11 + i) for i, eps in enumerate(cfg.eps_b)]
    records = []
    for net, stream in tqdm(nets, desc="B: read-outs", unit="net"):
        start = time.perf_counter()
        if net is None:
            result = readout_accuracy(lambda a: a, data)
            label, width = "linear ridge on pixels (no hidden layer)", data[0].shape[0]
        else:
            # the same weights for fit, val and test: one generator state per net, replayed for every call
            seed = [SEED, 200 + stream]
            def feats(a: np.ndarray, net: Net = net, seed: list = seed) -> np.ndarray:
                return features(a, net, cfg.fm_widths, np.random.default_rng(seed))

            result = readout_accuracy(feats, data)
            label, width = net.label, cfg.fm_widths[-1]
        records.append({"label": label, "width": width, "seconds": time.perf_counter() - start, **result,
                        "tau_L": None if net is None else net.layers[-1].tau_out})
    return records, {"tau0": tau0, "fit": data[0].shape[1], "val": data[1].shape[1], "test": data[2].shape[1]}, design


# ---------------------------------------------------------------------------------------------------------------------
# C: storage arithmetic


def ternary_entropy(eps: float) -> float:
    """Bits per weight of an i.i.d. source that is 0 w.p. eps and +-1 w.p. (1 - eps)/2 each."""
    bits = -(1 - eps) * math.log2((1 - eps) / 2)
    return bits - eps * math.log2(eps) if eps > 0 else bits


def storage_rows(eps_values: Sequence[float]) -> list[dict]:
    return [{"eps": eps, "paper": 32 / (1 - eps), "entropy_bits": ternary_entropy(eps), "entropy": 32 / ternary_entropy(eps),
             "two_bit": 16.0} for eps in eps_values]


# ---------------------------------------------------------------------------------------------------------------------
# Output


def fmt(value: float) -> str:
    return f"{value:.4g}"


def design_table(design: Design, starts: int) -> str:
    out = [f"Two-level activations, layer by layer ({starts} least-squares starts per layer). Targets: ReLU at the ReLU net's "
           "input scale; solutions at the two-level net's own input scale.\n",
           "| layer | tau_in ReLU net | tau_in two-level net | target alpha1, alpha2, alpha3 | solved s1, s2, b | "
           "achieved alpha1, alpha2, alpha3 | max residual (alpha1², alpha2², alpha3) | tau_out ReLU | tau_out two-level |",
           "|---|---|---|---|---|---|---|---|---|"]
    for i, (t, sol) in enumerate(zip(design.targets, design.solutions), 1):
        got = sol.scalars
        out.append(f"| {i} | {fmt(design.tau_relu[i - 1])} | {fmt(design.tau_new[i - 1])} | {fmt(t.alpha1)}, {fmt(t.alpha2)}, "
                   f"{fmt(t.alpha3)} | {sol.s1:.4f}, {sol.s2:.4f}, {sol.b:.4f} | {fmt(got.alpha1)}, {fmt(got.alpha2)}, "
                   f"{fmt(got.alpha3)} | {sol.residual:.1e} | {fmt(t.tau_out)} | {fmt(got.tau_out)} |")
    return "\n".join(out)


def tau_table(design: Design, starts: int) -> str:
    """Why tau_L is not matched: Hermite-degree-1-2 share of the variance, and the 4-equation attempt."""
    out = ["| layer | Hermite deg 1-2 share of Var, ReLU | same, solved two-level | best max residual matching "
           "(alpha1², alpha2², alpha3, tau_out²) with levels {b1, 0, b2} |", "|---|---|---|---|"]
    for i, (t, sol) in enumerate(zip(design.targets, design.solutions), 1):
        residual, _ = solve_three_level_last(t, sol.tau, starts=starts, seed=SEED + i)
        out.append(f"| {i} | {hermite_fraction(t, design.tau_relu[i - 1]):.4f} | {hermite_fraction(sol.scalars, sol.tau):.4f} | "
                   f"{residual:.3g} |")
    return "\n".join(out)


def table_a(limit_rows: list[dict], rows: list[dict], info: dict, cfg: Config) -> str:
    out = [f"n = {info['n']} samples, p = {info['p']}, tau_0 = {info['tau0']:.4f}, hidden widths {list(cfg.widths)}. Distances "
           f"are spectral norms divided by ||K_inf,ReLU|| = {info['norm']:.4g} (the infinite-width ReLU kernel). '+ shift' adds "
           "the predicted (tau_L,ReLU² − tau_L²) I, computed from the scalars (not fitted); '1⊥' also removes the all-ones "
           "direction (P K P, P = I − 11ᵀ/n: a constant feature offset, invisible to a read-out with an intercept); "
           "'eig gap' = max_i |lambda_i + shift − lambda_i,ref| over sorted eigenvalues; top eigenvalue and 1ᵀK1/n (the "
           "Rayleigh quotient on the all-ones direction) include the shift; "
           "'align' = |<v, y>| / ‖y‖ for the top eigenvector v of P K P, y the ±1 labels.\n",
           "### A1. Infinite width (exact Gaussian expectations, no weight noise)\n",
           "| kernel | tau_L² | mean diag | ‖K − K_inf,ReLU‖ | + shift | + shift, 1⊥ | eig gap | top eigenvalue | 1ᵀK1/n | align "
           "| seconds |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in limit_rows:
        out.append(f"| {r['label']} | {r['tau_L2']:.4f} | {r['diag']:.4f} | {fmt(r['raw'])} | {fmt(r['shifted'])} | "
                   f"{fmt(r['centred'])} | "
                   f"{fmt(r['gap_shifted'])} | {fmt(r['top'] + r['shift'])} | {fmt(r['ones'] * info['n'] + r['shift'])} | "
                   f"{r['align']:.3f} | {r['seconds']:.1f} |")
    out += ["", f"### A2. Finite width: CK averaged over {cfg.draws} weight draws (K_ref: the first row)\n",
            "| network | tau_L² | mean diag | ‖K − K_ref‖ | + shift | + shift, 1⊥ | eig gap | ‖K + shift − K_inf,ReLU‖ | "
            "‖K − K_inf,own activation‖ | top eigenvalue | 1ᵀK1/n | align | seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        mc, lim = r["vs_mc"], r["vs_limit"]
        cells = ["-"] * 4 if i == 0 else [fmt(mc["raw"]), fmt(mc["shifted"]), fmt(mc["centred"]), fmt(mc["gap_shifted"])]
        out.append(f"| {r['label']} | {r['tau_L2']:.4f} | {r['diag']:.4f} | " + " | ".join(cells) + f" | {fmt(lim['shifted'])} | "
                   f"{fmt(r['vs_own'])} | {fmt(r['top'] + r['shift'])} | {fmt(r['ones'] * info['n'] + r['shift'])} | "
                   f"{r['align']:.3f} | {r['seconds']:.0f} |")
    out += ["", "Rms of each layer's pre-activation z over units and samples, averaged over the draws (in brackets: the "
            "predicted input scale tau_in that the activation was designed for).\n",
            "| network | " + " | ".join(f"layer {i + 1}" for i in range(len(cfg.widths))) + " |",
            "|---|" + "---|" * len(cfg.widths)]
    for r in rows:
        cells = [f"{rms:.4f} ({pred:.4f})" for rms, pred in zip(r["layers"], r["predicted_rms"])]
        out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def table_b(records: list[dict], info: dict, cfg: Config) -> str:
    out = [f"Fashion-MNIST: ridge fit on {info['fit']} training images, ridge picked on {info['val']} other training images, "
           f"then refit on both; test on {info['test']} test images. Hidden widths {list(cfg.fm_widths)}, "
           f"tau_0 = {info['tau0']:.4f}.\n",
           "| features | width | test accuracy | val accuracy (picked ridge) | ridge / mean eig | rms feature | seconds |",
           "|---|---|---|---|---|---|---|"]
    for r in records:
        out.append(f"| {r['label']} | {r['width']} | {r['test']:.4f} | {r['val']:.4f} | {r['ridge']:.0e} | {r['scale']:.3f} | "
                   f"{r['seconds']:.0f} |")
    return "\n".join(out)


def table_c() -> str:
    out = ["| eps | paper's ratio 32/(1-eps) | entropy H(eps) bits/weight | entropy-bound ratio 32/H | 2-bit storage ratio |",
           "|---|---|---|---|---|"]
    for r in storage_rows((0.0, 1 / 3, 0.5, 0.9, 0.97, 0.99)):
        out.append(f"| {r['eps']:.3g} | {r['paper']:.1f}x | {r['entropy_bits']:.3f} | {r['entropy']:.1f}x | "
                   f"{r['two_bit']:.0f}x |")
    return "\n".join(out)


def plot_spectra(rows: list[dict], info: dict, path: Path) -> None:
    """Eigenvalue histograms: (1) infinite-width ReLU vs two-level + shift; (2) finite width, dense vs ternary weights with
    ReLU; (3) finite width, two-level nets + shift vs the dense ReLU net. Dashed lines: top eigenvalues."""
    ref = rows[0]
    controls = [r for r in rows if "control" in r["label"] or "noise floor" in r["label"]]
    two = [r for r in rows if r["two_level"]]
    import matplotlib  # noqa: PLC0415 (only the plot needs it; the test install has no matplotlib)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    limit = [("two-level + shift, infinite width", info["two_limit_eig"] + info["two_shift"])]
    panels = [(axes[0], ("ReLU, infinite width", info["limit_eig"]), limit, "infinite width (no weight noise)"),
              (axes[1], (ref["label"], ref["eig"]), [(r["label"], r["eig"]) for r in controls],
               "finite width: ReLU, dense vs ternary"),
              (axes[2], (ref["label"], ref["eig"]), [(r["label"] + " + shift", r["eig"] + r["shift"]) for r in two],
               "finite width: two-level + shift vs ReLU")]
    for ax, (ref_label, ref_eig), series, title in panels:
        every = [ref_eig] + [v for _, v in series]
        bins = np.linspace(min(v.min() for v in every), max(np.quantile(v, 0.995) for v in every) * 1.05, 80)
        ax.hist(ref_eig, bins=bins, density=True, color="0.75", label=ref_label)
        ax.axvline(ref_eig[-1], color="0.5", ls="--", lw=1)
        for i, (label, values) in enumerate(series):
            color = f"C{i}"
            ax.hist(values, bins=bins, density=True, histtype="step", lw=1.4, color=color, label=label)
            ax.axvline(values[-1], color=color, ls="--", lw=1)
        ax.set(title=title, xlabel="CK eigenvalue (top 0.5% may lie right of the axis; dashed: top eigenvalue)", ylabel="density")
        ax.set_xlim(right=max(bins[-1], max(v[-1] for v in every) * 1.03))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 1 min)")
    parser.add_argument("--img-dir", type=Path, help="where the plot goes (default docs/img; --quick: a temp dir)")
    parser.add_argument("--draws", type=int, help="experiment A: weight draws averaged per kernel (override)")
    parser.add_argument("--skip-fmnist", action="store_true", help="skip experiment B")
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.draws is not None:
        cfg = replace(cfg, draws=args.draws)
    img_dir = args.img_dir or (Path(tempfile.mkdtemp(prefix="ntk-lc-")) if args.quick else ROOT / "docs" / "img")
    img_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    x, _ = gaussian_mixture(cfg)
    tau0_a = math.sqrt(float(np.mean(np.sum(x**2, axis=0))) / cfg.p)
    design_a = design_two_level(tau0_a, len(cfg.widths), cfg.starts)
    print("## A. Conjugate-kernel spectra, Gaussian mixture\n")
    print(design_table(design_a, cfg.starts) + "\n")
    print(tau_table(design_a, cfg.starts) + "\n")
    limit_rows, rows_a, info_a = experiment_a(cfg, design_a)
    print(table_a(limit_rows, rows_a, info_a, cfg) + "\n")
    plot_spectra(rows_a, info_a, img_dir / "ntk-lc-spectra.png")

    if not args.skip_fmnist:
        print("## B. Fashion-MNIST, random features + ridge read-out\n")
        records_b, info_b, design_b = experiment_b(cfg)
        print(design_table(design_b, cfg.starts) + "\n")
        print(table_b(records_b, info_b, cfg) + "\n")

    print("## C. Storage per weight\n")
    print(table_c() + "\n")
    print(f"plot in {img_dir}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
