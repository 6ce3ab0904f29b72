"""Does a k-atom moment-matched measure reproduce a wide layer? Error vs k as the width d grows.

The seed paper's claim: a layer y(x) = sum_i a_i relu(w_i.x + b_i) of d permutation-symmetric units
is a function of the empirical measure of its units, so a measure with k = polylog(d) atoms that
matches its moments reproduces it with an error that vanishes as d grows (for a tiny unit dimension
p + 1). This measures, for the selectors of symshrink.passes (magnitude: pruning without refit,
select: pivoted QR + ridge refit, recombine: Caratheodory on the top k - 1 principal moments, fold:
data-free k-means merge), the relative L2 error ||y - y'|| / ||y|| of the reduced layer's output on
held-out inputs, at k = ceil(log2 d), ceil(log2 d)^2, min(d, ceil(16 sqrt d)) and fixed fractions
of d, for d = 64 .. 4096, in two settings:

1. toy: y(x) = (1/d) sum_i a_i relu(w_i.x + b_i), w_i ~ N(0, I_p), b_i, a_i ~ N(0, 1), x ~ N(0, I_p);
2. student: a width-d ReLU student (same parametrisation and initialisation) trained by full-batch
   Adam to fit a teacher with a few ReLU units on x ~ N(0, I_p); its hidden layer is reduced.

Calibration moments come from n_cal fresh inputs, errors from n_test other ones. Prints markdown
tables (per-setting errors, trend of the error at the polylog and seed rules as d grows) and writes
one log-log plot per family (toy, student) to <img-dir>/moment-seed-<family>.png.

    .venv/bin/python tools/experiments/moment_seed.py            # full run (docs/moment-seed.md)
    .venv/bin/python tools/experiments/moment_seed.py --quick    # smoke test, plots to a temp dir
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from symshrink.calibration.stats import UnitStats
from symshrink.passes.moment.fold import fold
from symshrink.passes.moment.recombine import recombine
from symshrink.passes.moment.selectors import Reduction, UnitProblem, magnitude, refit, select

ROOT = Path(__file__).resolve().parents[2]
SEED = 0
BATCH = 1024  # rows per UnitStats.add
LOW_RIDGE = 1e-8
SELECTORS: dict[str, Callable[[Problem, int], Reduction]] = {
    "magnitude": lambda problem, k: magnitude(problem.unit, k),
    "select": lambda problem, k: select(problem.unit, k),
    # select's greedy order (it does not depend on the ridge) with a near-unregularised refit
    f"select ridge={LOW_RIDGE:g}": lambda problem, k: refit(problem.low_ridge, problem.unit.curve.order[:k]),
    "recombine": lambda problem, k: recombine(problem.unit, k),
    "fold": lambda problem, k: fold(problem.unit, k),
}
TREND_RULES = ("log² d", "16√d")


@dataclass(frozen=True)
class Config:
    toy_dims: tuple[int, ...]
    student_dims: tuple[int, ...]
    widths: tuple[int, ...]
    student_widths: tuple[int, ...]
    fractions: tuple[int, ...]  # k = d // f
    n_cal: int
    n_test: int
    n_train: int
    steps: int
    lr: float
    teacher_units: int
    recombine_max_width: int  # wider layers: recombine only at the TREND_RULES k (each call is a full d x d eigh)


FULL = Config(toy_dims=(1, 2, 8), student_dims=(2, 8), widths=(64, 256, 1024, 4096), student_widths=(64, 256, 1024, 4096),
              fractions=(16, 4), n_cal=4096, n_test=4096, n_train=512, steps=1500, lr=1e-2, teacher_units=4,
              recombine_max_width=1024)
QUICK = Config(toy_dims=(1, 8), student_dims=(2,), widths=(32, 128), student_widths=(32, 128),
               fractions=(4,), n_cal=512, n_test=512, n_train=256, steps=150, lr=1e-2, teacher_units=4,
               recombine_max_width=32)


@dataclass(frozen=True)
class Layer:
    """y(x) = relu(x W^T + b) a: d units with input weights w [d, p], biases b [d], output weights a [d]."""

    w: np.ndarray
    b: np.ndarray
    a: np.ndarray

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w.T + self.b, 0.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.hidden(x) @ self.a

    @property
    def params(self) -> np.ndarray:
        """[d, p + 1]: each unit's producer-side parameters [w_i, b_i]."""
        return np.column_stack([self.w, self.b])


@dataclass(frozen=True)
class Problem:
    """A layer with its calibration moments, and the inputs/activations the errors are measured on."""

    layer: Layer
    unit: UnitProblem
    low_ridge: UnitProblem
    x_cal: np.ndarray
    h_cal: np.ndarray
    x_test: np.ndarray
    h_test: np.ndarray


def k_rules(d: int, fractions: tuple[int, ...]) -> dict[str, int]:
    """The k of each rule at width d (polylog, the seed rule, fixed fractions), each in 1..d."""
    log = math.ceil(math.log2(d))
    rules = {"log d": log, "log² d": log * log, "16√d": math.ceil(16 * math.sqrt(d))}
    rules.update({f"d/{f}": d // f for f in fractions})
    return {name: max(1, min(d, k)) for name, k in rules.items()}


def toy_layer(d: int, p: int) -> Layer:
    """(1/d) sum_i a_i relu(w_i.x + b_i) with w_i ~ N(0, I_p), b_i, a_i ~ N(0, 1)."""
    rng = np.random.default_rng([SEED, d, p])
    return Layer(rng.standard_normal((d, p)), rng.standard_normal(d), rng.standard_normal(d) / d)


def teacher_layer(p: int, units: int) -> Layer:
    """units ReLU units with unit-norm directions, biases in [-0.5, 0.5], output RMS 1 on N(0, I_p)."""
    rng = np.random.default_rng([SEED, p, units, 7])
    w = rng.standard_normal((units, p))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    layer = Layer(w, rng.uniform(-0.5, 0.5, units), rng.standard_normal(units))
    scale = np.sqrt(np.mean(layer(rng.standard_normal((100_000, p))) ** 2))
    return Layer(layer.w, layer.b, layer.a / scale)


def train_student(teacher: Layer, d: int, cfg: Config) -> Layer:
    """Width-d student (1/d) sum_i a_i relu(w_i.x + b_i), toy initialisation, full-batch Adam on the
    mean squared error with a cosine learning-rate decay (float32 arithmetic, float64 result)."""
    p = teacher.w.shape[1]
    rng = np.random.default_rng([SEED, d, p, 1])
    params = [rng.standard_normal(shape).astype(np.float32) for shape in ((d, p), (d,), (d,))]
    x = rng.standard_normal((cfg.n_train, p))
    y = teacher(x).astype(np.float32)
    x = x.astype(np.float32)
    first = [np.zeros_like(q) for q in params]
    second = [np.zeros_like(q) for q in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-12  # the gradients carry a 1/d factor: eps must stay far below them
    for step in range(1, cfg.steps + 1):
        w, b, a = params
        z = x @ w.T
        z += b
        active = z > 0
        h = np.maximum(z, 0.0, out=z)
        r = (h @ a / d - y) / len(x)
        gz = np.multiply(r[:, None], a / d) * active
        grads = [gz.T @ x, gz.sum(axis=0), h.T @ r / d]
        lr = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
        for q, g, m, v in zip(params, grads, first, second):
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * g * g
            q -= lr * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
    w, b, a = (q.astype(np.float64) for q in params)
    return Layer(w, b, a / d)


def make_problem(layer: Layer, p: int, cfg: Config) -> Problem:
    d = layer.w.shape[0]
    x_cal = np.random.default_rng([SEED, d, p, 2]).standard_normal((cfg.n_cal, p))
    x_test = np.random.default_rng([SEED, d, p, 4]).standard_normal((cfg.n_test, p))  # the same for any n_cal
    h_cal = layer.hidden(x_cal)
    stats = UnitStats(width=d)
    for start in range(0, len(h_cal), BATCH):
        stats.add(h_cal[start: start + BATCH])
    kwargs = dict(out_weight=layer.a[:, None], stats=stats, unit_params=layer.params, homogeneous=True, seed=SEED)
    return Problem(layer, UnitProblem(**kwargs), UnitProblem(**kwargs, ridge=LOW_RIDGE), x_cal, h_cal, x_test,
                   layer.hidden(x_test))


def reduced_output(problem: Problem, reduction: Reduction, test: bool) -> np.ndarray:
    """h' W' + c of the reduced layer: kept activations for a subset, recomputed merged units for a fold."""
    x, h = (problem.x_test, problem.h_test) if test else (problem.x_cal, problem.h_cal)
    if reduction.merge is None:
        kept = h[:, reduction.kept]
    else:
        merged = reduction.merge @ problem.layer.params
        kept = np.maximum(x @ merged[:, :-1].T + merged[:, -1], 0.0)
    return kept @ reduction.weight[:, 0] + reduction.bias_delta[0]


def relative(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def measure(setting: str, p: int, layer: Layer, extra: dict[str, float], cfg: Config) -> list[dict]:
    """Every selector at every rule's k for one layer: one record per (selector, rule)."""
    problem = make_problem(layer, p, cfg)
    d = layer.w.shape[0]
    y_cal, y_test = problem.h_cal @ layer.a, problem.h_test @ layer.a
    base = {"setting": setting, "p": p, "d": d, "rms": float(np.sqrt(np.mean(y_test**2))),
            "constant": relative(np.full_like(y_test, y_cal.mean()), y_test), **extra}
    rules = k_rules(d, cfg.fractions)
    records = []
    capped = sorted({rules[rule] for rule in TREND_RULES})
    for name, reduce in SELECTORS.items():
        ks = capped if name == "recombine" and d > cfg.recombine_max_width else sorted(set(rules.values()))
        for k in ks:
            start = time.perf_counter()
            reduction = reduce(problem, k)
            seconds = time.perf_counter() - start
            cal = relative(reduced_output(problem, reduction, test=False), y_cal)
            reported = reduction.relative_error
            record = {**base, "selector": name, "k": k, "seconds": seconds,
                      "test": relative(reduced_output(problem, reduction, test=True), y_test), "cal": cal,
                      "report_gap": abs(reported - cal) / max(cal, 1e-12) if reported is not None else None}
            records.extend({**record, "rule": rule} for rule, rk in rules.items() if rk == k)
    return records


def run(cfg: Config) -> list[dict]:
    tasks = [("toy", p, d) for p in cfg.toy_dims for d in cfg.widths]
    tasks += [("student", p, d) for p in cfg.student_dims for d in cfg.student_widths]
    records = []
    progress = tqdm(tasks, desc="layers", unit="layer")
    for kind, p, d in progress:
        progress.set_postfix_str(f"{kind} p={p} d={d}")
        if kind == "toy":
            records += measure(f"toy p={p}", p, toy_layer(d, p), {}, cfg)
            continue
        teacher = teacher_layer(p, cfg.teacher_units)
        start = time.perf_counter()
        student = train_student(teacher, d, cfg)
        x = np.random.default_rng([SEED, d, p, 3]).standard_normal((cfg.n_test, p))
        fit = {"train_s": time.perf_counter() - start, "fit": relative(student(x), teacher(x))}
        records += measure(f"student p={p}", p, student, fit, cfg)
    return records


def fmt(value: float) -> str:
    return f"{value:.3g}"


def cell(record: dict | None, key: str = "test") -> str:
    if record is None:
        return "not run"
    return "k=d" if record["k"] == record["d"] else fmt(record[key])


def slope(ds: list[int], errors: list[float]) -> float | None:
    """Least-squares slope of log(error) against log(d), None with fewer than two positive errors."""
    pairs = [(math.log(d), math.log(e)) for d, e in zip(ds, errors) if e > 0]
    if len(pairs) < 2:
        return None
    x, y = np.array(pairs).T
    return float(np.polyfit(x, y, 1)[0])


def trend(value: float | None) -> str:
    if value is None:
        return "n/a (fewer than 2 widths with k < d)"
    return "decreasing" if value < -0.1 else "increasing" if value > 0.1 else "flat"


def tables(records: list[dict], cfg: Config) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in records))
    rules = list(k_rules(max(cfg.widths), cfg.fractions))
    out = []
    for setting in settings:
        rows = [r for r in records if r["setting"] == setting]
        widths = sorted({r["d"] for r in rows})
        out.append(f"### {setting}\n")
        student = "fit" in rows[0]
        head = "| d | " + " | ".join(f"k at {rule}" for rule in rules) + " | rms(y) | constant (k=0) |"
        head += " student vs teacher | train s |" if student else ""
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for d in widths:
            first = next(r for r in rows if r["d"] == d)
            ks = {r["rule"]: r["k"] for r in rows if r["d"] == d}
            line = f"| {d} | " + " | ".join(str(ks[rule]) for rule in rules)
            line += f" | {fmt(first['rms'])} | {fmt(first['constant'])} |"
            line += f" {fmt(first['fit'])} | {first['train_s']:.0f} |" if student else ""
            out.append(line)
        head = "| selector | d | " + " | ".join(rules) + " | calibration at log² d | calibration at 16√d | seconds (all k) |"
        out += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for name in SELECTORS:
            for d in widths:
                found = {r["rule"]: r for r in rows if r["d"] == d and r["selector"] == name}
                seconds = sum({r["k"]: r["seconds"] for r in found.values()}.values())
                out.append(f"| {name} | {d} | " + " | ".join(cell(found.get(rule)) for rule in rules)
                           + f" | {cell(found['log² d'], 'cal')} | {cell(found['16√d'], 'cal')} | {seconds:.1f} |")
        out.append("")
    out += ["### Trend as d grows (held-out relative error, slope of log error vs log d over the widths with k < d)\n",
            "| setting | selector | rule | errors (d ascending) | slope | trend | constant (k=0) at largest d |",
            "|---|---|---|---|---|---|---|"]
    for setting in settings:
        for name in SELECTORS:
            for rule in TREND_RULES:
                cells = sorted((r for r in records if r["setting"] == setting and r["selector"] == name
                                and r["rule"] == rule), key=lambda r: r["d"])
                live = [r for r in cells if r["k"] < r["d"]]
                value = slope([r["d"] for r in live], [r["test"] for r in live])
                errors = ", ".join(cell(r) for r in cells)
                out.append(f"| {setting} | {name} | {rule} | {errors} | {'' if value is None else f'{value:.2f}'} | "
                           f"{trend(value)} | {fmt(cells[-1]['constant'])} |")
    gaps = [r["report_gap"] for r in records if r["report_gap"] is not None]
    out += ["", "k=d: no reduction (error 0 up to rounding).", "",
            f"Largest relative gap between a selector's reported `relative_error` and the calibration error "
            f"recomputed from the activations: {max(gaps):.2g}."]
    return "\n".join(out)


def plot(records: list[dict], kind: str, cfg: Config, path: Path) -> None:
    """Held-out error vs d, one line per k rule, one panel per (input dim, selector), log-log."""
    rows = [r for r in records if r["setting"].startswith(kind)]
    dims = sorted({r["p"] for r in rows})
    rules = list(dict.fromkeys(rule for r in rows for rule in k_rules(r["d"], cfg.fractions)))
    fig, axes = plt.subplots(len(dims), len(SELECTORS), figsize=(3.2 * len(SELECTORS), 2.8 * len(dims)),
                             squeeze=False, sharex=True, sharey="row")
    for i, p in enumerate(dims):
        for j, name in enumerate(SELECTORS):
            ax = axes[i, j]
            for rule in rules:
                cells = sorted((r for r in rows if r["p"] == p and r["selector"] == name and r["rule"] == rule
                                and r["k"] < r["d"]), key=lambda r: r["d"])
                ax.plot([r["d"] for r in cells], [r["test"] for r in cells], "o-", label=f"k = {rule}")
            const = sorted({(r["d"], r["constant"]) for r in rows if r["p"] == p})
            ax.plot(*zip(*const), "k--", lw=1, label="constant (k=0)")
            ax.set(xscale="log", yscale="log", title=f"{kind} p={p}: {name}")
            ax.grid(True, which="major", alpha=0.3)
            if i == len(dims) - 1:
                ax.set_xlabel("width d")
            if j == 0:
                ax.set_ylabel("held-out relative error")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (< 30 s)")
    parser.add_argument("--img-dir", type=Path, help="where the plots go (default docs/img; --quick: a temp dir)")
    parser.add_argument("--toy-dims", type=int, nargs="*", help="input dims of the toy layers (override)")
    parser.add_argument("--student-dims", type=int, nargs="*", help="input dims of the students (override; none: skip)")
    parser.add_argument("--widths", type=int, nargs="+", help="widths d of toys and students (override)")
    parser.add_argument("--n-cal", type=int, help="calibration inputs per layer (override)")
    args = parser.parse_args()
    matplotlib.use("Agg")
    cfg = QUICK if args.quick else FULL
    overrides = {"toy_dims": args.toy_dims, "student_dims": args.student_dims, "n_cal": args.n_cal,
                 "widths": args.widths, "student_widths": args.widths}
    cfg = replace(cfg, **{key: value for key, value in overrides.items() if value is not None})
    img_dir = args.img_dir or (Path(tempfile.mkdtemp(prefix="moment-seed-")) if args.quick else ROOT / "docs" / "img")
    img_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = run(cfg)
    for kind in ("toy", "student"):
        if any(r["setting"].startswith(kind) for r in records):
            plot(records, kind, cfg, img_dir / f"moment-seed-{kind}.png")
    print(tables(records, cfg))
    print(f"\nplots in {img_dir}; wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
