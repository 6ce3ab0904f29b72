"""Widths per group: a fixed rule, or one global budget allocated greedily across groups.

Removing units from group g at width k costs e_g(k)^2, the squared relative error of its consumer's
output after a least-squares refit (the selectors' error curve). The allocator repeatedly takes the
removal with the smallest increase of sum_g e_g^2 per byte saved; its path of moves is cut where a
size target is met, or searched for the widest cut whose verified output error stays in budget.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from symshrink.errors import BadInput

__all__ = ["rule_widths", "target_bytes", "Move", "allocation_path", "widths_after",
           "path_to_size", "widest_within"]

_STEPS_PER_GROUP = 64  # granularity of the greedy path: about 1/64 of a group's width per move


def target_bytes(target: int | float, current_bytes: int) -> int:
    """A target file size in bytes: `target` bytes (int) or that fraction of the current size (float < 1)."""
    goal = int(target * current_bytes) if isinstance(target, float) else int(target)
    if not 0 < goal < current_bytes:
        raise BadInput(f"target size {target} is not below the model's {current_bytes} bytes")
    return goal


def _step(width: int) -> int:
    """Units per move: about 1/64 of the group, in multiples of 8 for wide groups so that the widths the
    allocator picks stay multiples of 8 (vectorised GEMM and conv kernels run best on those)."""
    step = max(1, width // _STEPS_PER_GROUP)
    return max(8, step // 8 * 8) if width % 8 == 0 and width >= 8 * _STEPS_PER_GROUP else step


def rule_widths(widths: dict[str, int], keep: float | None = None, width: int | None = None,
                sqrt_c: float | None = None) -> dict[str, int]:
    """One rule for every group (full width d given per group): a kept fraction, a fixed width, or
    k = ceil(C sqrt(d)); capped at d, at least 1."""
    if sum(rule is not None for rule in (keep, width, sqrt_c)) != 1:
        raise BadInput("give exactly one of --keep, --width, --width-rule, --target-size, --max-error")
    if keep is not None and not 0 < keep <= 1:
        raise BadInput(f"--keep must be in (0, 1], got {keep}")
    if width is not None and width < 1:
        raise BadInput(f"--width must be >= 1, got {width}")
    if keep is not None:
        return {name: max(1, math.ceil(keep * d)) for name, d in widths.items()}
    if width is not None:
        return {name: min(width, d) for name, d in widths.items()}
    return {name: min(d, math.ceil(sqrt_c * math.sqrt(d))) for name, d in widths.items()}


@dataclass(frozen=True)
class Move:
    """Group `group` goes to `width`; totals after the move: bytes saved and sum of squared errors."""

    group: str
    width: int
    saved: float
    cost: float


def allocation_path(curves: dict[str, np.ndarray], unit_bytes: dict[str, float]) -> list[Move]:
    """The greedy sequence of removals from full width down to one unit per group. `curves[g][k]` is
    group g's relative error at width k (k = 0..d), `unit_bytes[g]` the bytes one unit costs."""
    width = {g: len(curve) - 1 for g, curve in curves.items()}
    step = {g: _step(d) for g, d in width.items()}

    def candidate(g: str) -> tuple[float, str, int] | None:
        k = width[g]
        if k <= 1:
            return None
        new = max(1, k - step[g])
        extra = float(curves[g][new] ** 2 - curves[g][k] ** 2)
        return max(extra, 0.0) / ((k - new) * unit_bytes[g]), g, new

    heap = [c for c in map(candidate, curves) if c is not None]
    heapq.heapify(heap)
    path: list[Move] = []
    saved = cost = 0.0
    while heap:
        _, g, new = heapq.heappop(heap)
        saved += (width[g] - new) * unit_bytes[g]
        cost += float(curves[g][new] ** 2 - curves[g][width[g]] ** 2)
        width[g] = new
        path.append(Move(g, new, saved, cost))
        nxt = candidate(g)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return path


def widths_after(full: dict[str, int], path: list[Move], moves: int) -> dict[str, int]:
    widths = dict(full)
    for move in path[:moves]:
        widths[move.group] = move.width
    return widths


def path_to_size(path: list[Move], bytes_to_save: float, saved_after: Callable[[int], float]) -> int:
    """The fewest moves whose exact saving `saved_after(moves)` reaches `bytes_to_save` (the moves' own
    per-unit estimate double-counts a matrix cut by two groups, so only the ordering comes from it)."""
    low, high = 0, len(path)
    if saved_after(high) < bytes_to_save:
        raise BadInput(f"the target size needs {bytes_to_save / 1e6:.3f} MB less, but removing all but one unit "
                       f"of every group saves {saved_after(high) / 1e6:.3f} MB")
    while high - low > 1:  # saved_after grows along the path
        mid = (low + high) // 2
        if saved_after(mid) >= bytes_to_save:
            high = mid
        else:
            low = mid
    return high


def widest_within(moves: int, error_of: Callable[[int], float], max_error: float, evaluations: int = 9) -> int:
    """The most moves (of `moves`) whose verified error stays <= max_error, by bisection on the path
    (the error is taken to grow along it); at most `evaluations` verifications."""
    low, high = 0, moves  # error_of(low) is within budget (no move: the original model)
    if error_of(high) <= max_error:
        return high
    for _ in range(evaluations - 1):
        if high - low <= 1:
            break
        mid = (low + high) // 2
        if error_of(mid) <= max_error:
            low = mid
        else:
            high = mid
    return low
