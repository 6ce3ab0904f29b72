"""The allocator: one candidate per site, the fewest bytes for the distortion allowed, by a Lagrange multiplier.

Each candidate c of site i costs b_ic bytes and a distortion d_ic (by default its predicted relative output error
squared). For a multiplier lam >= 0 every site takes the c minimising b_ic + lam d_ic. That choice has the fewest
bytes of all choices whose total distortion is at most its own (whatever else a site could take would cost more
bytes per unit of distortion saved), and as lam grows its bytes never fall and its distortion never rises. Between
the `breakpoints`, where some site's pick changes (the slopes of each site's lower convex hull of (bytes,
distortion)), the choice is constant, so a bisection over them visits each distinct plan at most once: `allocate`
finds the smallest lam whose plan a (measured, monotone) test accepts in O(log n) tests; `allocate_bytes` the largest
lam whose plan fits a byte budget (no test: bytes are known). Plans between hull points (a knapsack's exact optimum)
are not reached: the rate-distortion allocator's known gap, small when sites are many.
Pure: no graph, no sessions; the caller measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from symshrink.passes.protocol import Candidate

__all__ = ["squared_error", "scaled_error", "lagrangian_choice", "breakpoints", "Allocation", "allocate",
           "allocate_bytes", "plan_bytes"]

Choice = dict[str, Candidate]


def squared_error(candidate: Candidate) -> float:
    """The default distortion: the predicted relative output error, squared (errors of independent layers add in
    power)."""
    return candidate.predicted_error() ** 2


def scaled_error(scale: Callable[[Candidate], float]) -> Callable[[Candidate], float]:
    """The squared predicted error times the candidate's calibration scale squared: the distortion once the
    predictions of a kind of candidate have been measured against the model's output."""
    return lambda c: (scale(c) * c.predicted_error()) ** 2


def plan_bytes(choice: Choice) -> int:
    return sum(c.bytes_after for c in choice.values())


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


def _multipliers(candidates: Mapping[str, Sequence[Candidate]], distortion: Callable[[Candidate], float]) -> list[float]:
    """One multiplier in each interval between breakpoints, ascending: below the first, between two, above the last
    (lam = inf). Each stands for one distinct Lagrangian plan."""
    points = breakpoints(candidates, distortion)
    return [0.0, *((a + b) / 2 for a, b in zip(points, points[1:])), math.inf] if points else [math.inf]


def _first(count: int, passes: Callable[[int], bool]) -> int:
    """The first index in range(count) that `passes` (monotone: False ... False True ... True; count - 1 passes)."""
    low, high = 0, count - 1
    while low < high:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return high


def allocate(candidates: Mapping[str, Sequence[Candidate]], accepts: Callable[[Choice], bool],
             distortion: Callable[[Candidate], float] = squared_error) -> Allocation:
    """The fewest-bytes Lagrangian plan that `accepts` passes (it must pass every plan of lower distortion when it
    passes one: a budget on a measured error), by bisection over the breakpoints. The least-distortion plan is
    tested first (not when its distortion is zero: that plan changes nothing, and passes); when it fails, nothing is
    returned (never a plan outside the budget)."""
    multipliers = _multipliers(candidates, distortion)
    plan = cache(lambda index: lagrangian_choice(candidates, multipliers[index], distortion))
    unchanged = sum(distortion(c) for c in plan(len(multipliers) - 1).values()) == 0
    passes = cache(lambda index: (unchanged and index == len(multipliers) - 1) or accepts(plan(index)))
    if not passes(len(multipliers) - 1):
        return Allocation(None, multipliers[-1], 1)
    found = _first(len(multipliers), passes)
    return Allocation(plan(found), multipliers[found], passes.cache_info().currsize - unchanged)


def allocate_bytes(candidates: Mapping[str, Sequence[Candidate]], max_bytes: float,
                   distortion: Callable[[Candidate], float] = squared_error) -> Allocation:
    """The least-distortion Lagrangian plan of at most `max_bytes` (bytes rise with the multiplier: the last plan
    that fits); None when even the fewest-bytes plan does not fit."""
    multipliers = _multipliers(candidates, distortion)
    plan = cache(lambda index: lagrangian_choice(candidates, multipliers[index], distortion))
    if plan_bytes(plan(0)) > max_bytes:
        return Allocation(None, multipliers[0], 0)
    over = _first(len(multipliers) + 1, lambda i: i == len(multipliers) or plan_bytes(plan(i)) > max_bytes)
    return Allocation(plan(over - 1), multipliers[over - 1], 0)
