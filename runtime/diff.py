"""Compare two models' outputs on the same inputs: max/mean abs error, relative L2, cosine, top-1.

Statistics pool every element of an output over all feeds. A gate (`max_error` on relative L2,
`min_cosine`) turns the comparison into pass/fail, so the same numbers serve users' tests and CI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["OutputDiff", "compare_outputs", "gate_failures", "format_diffs"]


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    mean_abs: float
    rel_l2: float  # ||a - b|| / ||a||
    cosine: float
    top1: float | None  # agreement of argmax over the last axis, for class logits only

    def to_dict(self) -> dict:
        return asdict(self)


def _is_logits(name: str, arrays: list[np.ndarray]) -> bool:
    first = arrays[0]
    return first.dtype.kind == "f" and first.ndim >= 2 and first.shape[-1] > 1 and (
        "logit" in name.lower() or first.ndim == 2
    )


def compare_outputs(reference: list[dict], candidate: list[dict]) -> list[OutputDiff]:
    """Per-output statistics; `reference[i]` and `candidate[i]` are the outputs for feed i."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate have different numbers of feeds")
    diffs = []
    for name in reference[0]:
        refs = [r[name] for r in reference]
        cands = [c[name] for c in candidate]
        if any(r.shape != c.shape for r, c in zip(refs, cands)):
            raise ValueError(f"output {name!r} changes shape")
        if refs[0].dtype.kind not in "fc":
            exact = all(np.array_equal(r, c) for r, c in zip(refs, cands))
            diffs.append(OutputDiff(name, 0.0 if exact else float("inf"), 0.0, 0.0 if exact else 1.0,
                                    1.0 if exact else 0.0, None))
            continue
        # sums over the feeds one at a time (float64 copies of one feed's output, not of all of them)
        aa = bb = ab = dd = total = 0.0
        largest, count = 0.0, 0
        for r, c in zip(refs, cands):
            a, b = r.reshape(-1).astype(np.float64), c.reshape(-1).astype(np.float64)
            delta = np.abs(a - b)
            aa, bb, ab, dd = aa + a @ a, bb + b @ b, ab + a @ b, dd + delta @ delta
            largest = float(np.max([largest, delta.max(initial=0.0)]))  # a NaN stays NaN
            total, count = total + float(delta.sum()), count + a.size
        norm_a, norm_b = np.sqrt(aa), np.sqrt(bb)
        rel = float(np.sqrt(dd) / norm_a) if norm_a > 0 else float(norm_b > 0)
        cosine = float(ab / (norm_a * norm_b)) if norm_a > 0 and norm_b > 0 else float(norm_a == norm_b)
        top1 = None
        if _is_logits(name, refs):
            agree = [np.mean(r.argmax(-1) == c.argmax(-1)) for r, c in zip(refs, cands)]
            top1 = float(np.mean(agree))
        diffs.append(OutputDiff(name, largest, total / count if count else float("nan"), rel, cosine, top1))
    return diffs


def gate_failures(diffs: list[OutputDiff], max_error: float | None = None, min_cosine: float | None = None) -> list[str]:
    """Human-readable reasons the gate fails (empty: within tolerance)."""
    failures = []
    for d in diffs:
        if max_error is not None and not d.rel_l2 <= max_error:
            failures.append(f"{d.name}: relative L2 error {d.rel_l2:.3g} > {max_error:g}")
        if min_cosine is not None and not d.cosine >= min_cosine:
            failures.append(f"{d.name}: cosine {d.cosine:.6f} < {min_cosine:g}")
    return failures


def format_diffs(diffs: list[OutputDiff]) -> str:
    header = f"{'output':<24} {'max abs':>10} {'mean abs':>10} {'rel L2':>10} {'cosine':>10} {'top-1':>7}"
    rows = [header]
    for d in diffs:
        top1 = "" if d.top1 is None else f"{d.top1:.4f}"
        rows.append(f"{d.name[:24]:<24} {d.max_abs:>10.3g} {d.mean_abs:>10.3g} {d.rel_l2:>10.3g} "
                    f"{d.cosine:>10.6f} {top1:>7}")
    return "\n".join(rows)
