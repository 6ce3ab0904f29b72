"""The allocator: one candidate per site, the fewest bytes for the distortion allowed, by a Lagrange multiplier.

Each candidate c of site i costs b_ic bytes and a distortion d_ic (by default its predicted relative output error
squared). For a multiplier lam >= 0 every site takes the c minimising b_ic + lam d_ic. That choice has the fewest
bytes of all choices whose total distortion is at most its own (whatever else a site could take would cost more
bytes per unit of distortion saved), and as lam grows its bytes never fall and its distortion never rises. Between
the `breakpoints`, where some site's pick changes (the slopes of each site's lower convex hull of (bytes,
distortion)), the choice is constant, so a bisection over them visits each distinct plan at most once: `allocate`
finds the smallest lam whose plan a (measured, monotone) test accepts in O(log n) tests. Plans between hull points
(a knapsack's exact optimum) are not reached: the rate-distortion allocator's known gap, small when sites are many.
Pure: no graph, no sessions; the caller measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from symshrink.passes.protocol import Candidate

__all__ = ["squared_error", "lagrangian_choice", "breakpoints", "Allocation", "allocate"]

Choice = dict[str, Candidate]


def squared_error(candidate: Candidate) -> float:
    """The default distortion: the predicted relative output error, squared (errors of independent layers add in
    power)."""
    return candidate.predicted_error() ** 2


def lagrangian_choice(candidates: Mapping[str, Sequence[Candidate]], lam: float,
                      distortion: Callable[[Candidate], float] = squared_error) -> Choice:
    """Per site the candidate of least bytes + lam * distortion (ties: less distortion, then fewer bytes, then the
    offer's order). lam = inf: the least distortion."""
    def cost(indexed: tuple[int, Candidate]) -> tuple:
        index, c = indexed
        d = distortion(c)
        total = d if math.isinf(lam) else c.bytes_after + lam * d
        return total, d, c.bytes_after, index

    return {site: min(enumerate(options), key=cost)[1] for site, options in candidates.items()}


def _hull_slopes(options: Sequence[Candidate], distortion: Callable[[Candidate], float]) -> list[float]:
    """The multipliers at which this site's pick changes: -1 / slope between neighbours on the lower convex hull
    of its (bytes, distortion) points, fewest bytes first."""
    points = sorted({(c.bytes_after, distortion(c)) for c in options})
    hull: list[tuple[float, float]] = []
    for b, d in points:
        if hull and d >= hull[-1][1]:
            continue  # more bytes for no less distortion: never picked
        while len(hull) >= 2:  # keep the hull convex: drop a middle point above the chord
            (b0, d0), (b1, d1) = hull[-2], hull[-1]
            if (d1 - d0) * (b - b0) >= (d - d0) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append((b, d))
    return [(b1 - b0) / (d0 - d1) for (b0, d0), (b1, d1) in zip(hull, hull[1:])]


def breakpoints(candidates: Mapping[str, Sequence[Candidate]],
                distortion: Callable[[Candidate], float] = squared_error) -> list[float]:
    """Every multiplier at which some site's Lagrangian pick changes, ascending."""
    return sorted({lam for options in candidates.values() for lam in _hull_slopes(options, distortion)})


@dataclass
class Allocation:
    choice: Choice | None  # None: not even the least distortion passes
    multiplier: float
    tests: int  # how many plans were tested


def allocate(candidates: Mapping[str, Sequence[Candidate]], accepts: Callable[[Choice], bool],
             distortion: Callable[[Candidate], float] = squared_error) -> Allocation:
    """The fewest-bytes Lagrangian plan that `accepts` passes (it must pass every plan of lower distortion when it
    passes one: a budget on a measured error), by bisection over the breakpoints. The least-distortion plan is
    tested first; when it fails, nothing is returned (never a plan outside the budget)."""
    points = breakpoints(candidates, distortion)
    # a multiplier in each interval: below the first breakpoint, between two, above the last (lam = inf)
    multipliers = [0.0, *((a + b) / 2 for a, b in zip(points, points[1:])), math.inf] if points else [math.inf]
    tests = 1
    best = lagrangian_choice(candidates, multipliers[-1], distortion)
    if not accepts(best):
        return Allocation(None, multipliers[-1], tests)
    low, high = 0, len(multipliers) - 1  # multipliers[high] passes; find the first that does
    while low < high:
        middle = (low + high) // 2
        tests += 1
        choice = lagrangian_choice(candidates, multipliers[middle], distortion)
        if accepts(choice):
            high, best = middle, choice
        else:
            low = middle + 1
    return Allocation(best, multipliers[high], tests)
