"""The width rules and the greedy global allocator (pure functions, no graphs)."""

import numpy as np
import pytest

from symshrink.errors import BadInput
from symshrink.passes.moment.budget import (
    allocation_path,
    path_to_size,
    rule_widths,
    target_bytes,
    widest_within,
    widths_after,
)


def test_width_rules():
    full = {"a": 1536, "b": 12}
    assert rule_widths(full, keep=0.5) == {"a": 768, "b": 6}
    assert rule_widths(full, width=64) == {"a": 64, "b": 12}
    assert rule_widths(full, sqrt_c=16.0) == {"a": 628, "b": 12}  # ceil(16 sqrt 1536) = 628
    with pytest.raises(BadInput):
        rule_widths(full, keep=0.5, width=3)


def test_target_sizes_are_bytes_or_fractions():
    assert target_bytes(0.6, 1000) == 600
    assert target_bytes(30_000_000, 10**8) == 30_000_000
    with pytest.raises(BadInput):
        target_bytes(2_000_000_000, 10**6)  # not a reduction


def _curve(width, decay):
    """Relative error at widths 0..width: exp(-decay * k), zero at full width."""
    k = np.arange(width + 1)
    return np.where(k == width, 0.0, np.exp(-decay * k))


def test_allocator_takes_cheap_units_first():
    # group "easy" loses little error per unit removed, group "hard" a lot: "easy" shrinks first
    curves = {"easy": _curve(128, 0.2), "hard": _curve(128, 0.01)}
    path = allocation_path(curves, {"easy": 4.0, "hard": 4.0})
    first = widths_after({"easy": 128, "hard": 128}, path, len(path) // 4)
    assert first["easy"] < first["hard"] == 128
    assert [m.saved for m in path] == sorted(m.saved for m in path)
    assert widths_after({"easy": 128, "hard": 128}, path, len(path)) == {"easy": 1, "hard": 1}


def test_allocator_weighs_bytes_saved():
    # same error curves, but a unit of "big" is worth 10x the bytes: "big" shrinks first
    curves = {"big": _curve(64, 0.05), "small": _curve(64, 0.05)}
    path = allocation_path(curves, {"big": 40.0, "small": 4.0})
    assert path[0].group == "big"


def test_path_cut_at_a_size_and_at_an_error():
    curves = {"a": _curve(64, 0.05), "b": _curve(64, 0.1)}
    path = allocation_path(curves, {"a": 8.0, "b": 8.0})
    saved = [0.0] + [m.saved for m in path]
    moves = path_to_size(path, 200.0, lambda m: saved[m])
    assert saved[moves] >= 200.0 > saved[moves - 1]
    with pytest.raises(BadInput, match="saves"):
        path_to_size(path, 10_000.0, lambda m: saved[m])
    # a verified error that grows with the number of moves: bisection finds the last one within budget
    assert widest_within(100, lambda m: m / 100, 0.37) == 37
    assert widest_within(100, lambda m: m / 100, 2.0) == 100
    assert widest_within(100, lambda m: 1.0 if m else 0.0, 0.5) == 0


def test_wide_groups_move_in_multiples_of_8():
    path = allocation_path({"wide": _curve(1536, 0.01), "narrow": _curve(24, 0.2)}, {"wide": 4.0, "narrow": 4.0})
    assert all(m.width % 8 == 0 for m in path if m.group == "wide" and m.width > 1)
