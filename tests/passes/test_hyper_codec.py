"""Hyperfunction codes, first part: exact winding codebook, nearest codeword, index packing."""

import math

import numpy as np
import pytest

from symshrink.passes.hyper_codec import (
    FIXED_POINT_BITS,
    nearest_codeword,
    pack_indices,
    unpack_indices,
    winding_codebook,
    winding_steps,
)


@pytest.mark.parametrize("dims", [2, 3])
def test_winding_codebook_is_exact_fixed_point_and_close_to_float64_frac(dims):
    size, radius = 70_000, 1.0
    book = winding_codebook(size, dims, radius)
    steps = [int(a) for a in winding_steps(dims, radius)]
    for theta in (0, 1, 12_345, size - 1):  # Python integers: no overflow, the reference arithmetic
        expected = [((theta * a) % (1 << FIXED_POINT_BITS)) / (1 << FIXED_POINT_BITS) for a in steps]
        assert book[theta].tolist() == expected
    assert book.min() >= 0.0 and book.max() < 1.0
    a = np.array([math.fmod(1.0 / ((math.pi + j) * radius), 1.0) for j in range(dims)])
    exact = np.mod(np.arange(size)[:, None] * a[None, :], 1.0)
    drift = np.abs(book - exact)
    drift = np.minimum(drift, 1.0 - drift)  # wrap-around at 1
    assert drift.max() <= size / 2.0**FIXED_POINT_BITS  # |theta (a - A / 2^32)| < theta / 2^32


def test_nearest_codeword_is_the_brute_force_nearest():
    rng = np.random.default_rng(0)
    book = winding_codebook(225, 2, 1.0)
    points = rng.uniform(0, 1, (500, 2))
    brute = np.argmin(((points[:, None, :] - book[None, :, :]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest_codeword(book, points), brute)


@pytest.mark.parametrize("bits", range(1, 17))
def test_index_packing_round_trips_at_every_width(bits):
    rng = np.random.default_rng(bits)
    count = 1001
    indices = rng.integers(0, 1 << bits, count)
    packed = pack_indices(indices, bits)
    assert packed.dtype == np.uint8 and len(packed) == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_indices(packed, bits, count), indices)


def test_packing_refuses_indices_that_do_not_fit():
    with pytest.raises(ValueError):
        pack_indices(np.array([0, 8]), 3)
