"""Hyperfunction codec (numpy): codebooks, bands, round trips within the codebook's bound, packing, the choice."""

import math

import numpy as np
import pytest

from symshrink.passes.hyper.search import choose_setting, evaluate_settings, setting_grid
from symshrink.runtime.formats import (
    FIXED_POINT_BITS,
    HyperSetting,
    decode_values,
    grid_offsets,
    index_bits,
    lattice_offsets,
    nearest_codeword,
    pack_indices,
    pack_rows,
    relative_error,
    row_unpacking,
    unpack_indices,
    unpack_rows,
    winding_codebook,
    winding_steps,
)
from symshrink.runtime.formats import encode_hyper as encode


def _weights(shape=(96, 64), seed=0, tail=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 0.05
    if tail:  # a heavy tail, as trained weights have, so that the radial bands have outliers to code
        w = rng.standard_t(3, shape) * 0.05
    return w.astype(np.float32)


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


def test_lattice_is_the_centre_then_the_sheared_rational_winding():
    n = 225
    book = lattice_offsets(n)
    assert book.shape == (n + 1, 2) and book.dtype == np.float32
    assert book[0].tolist() == [0.0, 0.0]
    m = 15  # ceil(sqrt(225))
    # the official code's winding: theta * (L / m^2, L / m) mod L from the square's corner
    theta = np.arange(n)
    expected = np.stack([(theta / m**2) % 1.0, (theta / m) % 1.0], axis=1) - 0.5
    np.testing.assert_allclose(book[1:], expected, atol=1e-7)
    assert len(np.unique(book, axis=0)) == n + 1
    assert book.min() >= -0.5 and book.max() < 0.5


def test_grid_codebook_is_round_to_nearest():
    levels = 9
    w = _weights(seed=3)
    code = encode(w, HyperSetting("grid", levels, 0, side=None))
    low, high = float(w.min()), float(w.max())
    step = (high - low) / (levels - 1)
    rtn = np.round((w.astype(np.float64) - low) / step) * step + low
    # the decode c + L u differs from low + q step only in float32 rounding
    np.testing.assert_allclose(decode_values(code), rtn, atol=4 * np.finfo(np.float32).eps * (high - low))
    assert len(grid_offsets(levels)) == levels**2 and code.bits == index_bits(levels**2, 0) == 7


@pytest.mark.parametrize("n", [225, 1600, 2047])
def test_lattice_round_trip_is_within_the_codebook_bound(n):
    """Inside the square a pair moves at most two lattice cells (side L / m); a pair of band k at most s_k
    times that; and each index is the brute-force nearest codeword of its (shrunk) normalised pair."""
    w = _weights(tail=True)
    setting = HyperSetting("lattice", n, 3, 4.0)
    code = encode(w, setting)
    m = math.isqrt(n - 1) + 1
    pairs = w.reshape(-1, 2).astype(np.float64)
    moved = np.linalg.norm(pairs - decode_values(code).reshape(-1, 2), axis=1)
    band = code.indices // len(code.offsets)
    assert (band > 0).any() and (band == 0).any()
    bound = 2 * math.sqrt(2) / m * float(code.spans[0]) * code.band_scales[band] + 1e-6
    assert np.all(moved <= bound)
    normalised = (pairs - code.centres[0]) / code.spans[0] / code.band_scales[band][:, None]
    brute = np.argmin(((normalised[:, None, :] - code.offsets[None, :, :]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(code.indices % len(code.offsets), brute)


def test_bands_put_the_square_in_band_0_and_shrink_outliers_into_the_disc():
    w = _weights(tail=True)
    code = encode(w, HyperSetting("lattice", 225, 3, 4.0))
    z = (w.reshape(-1, 2).astype(np.float64) - code.centres[0]) / code.spans[0]
    band = code.indices // len(code.offsets)
    inside = np.abs(z).max(axis=1) <= 0.5
    assert np.all(band[inside] == 0) and np.all(band[~inside] >= 1)
    shrunk = np.linalg.norm(z[~inside], axis=1) / code.band_scales[band[~inside]]
    assert shrunk.max() <= 0.5 + 1e-6
    assert np.all(np.diff(code.band_scales) > 0) and code.band_scales[0] == 1.0


def test_bands_lower_the_error_of_heavy_tailed_weights():
    w = _weights(tail=True)
    without = relative_error(w, decode_values(encode(w, HyperSetting("lattice", 225, 0, 4.0))))
    with_bands = relative_error(w, decode_values(encode(w, HyperSetting("lattice", 225, 3, 4.0))))
    assert with_bands < 0.8 * without


def test_groups_have_their_own_centre_and_span_and_cost_side_bits():
    w = _weights()
    w[:48] += 1.0  # two halves far apart: one per-tensor square cannot hold both well
    tensor = encode(w, HyperSetting("grid", 16, 0, side=None))
    grouped = encode(w, HyperSetting("grid", 16, 0, side=None, group=64))
    assert grouped.centres.shape == (96, 2) and grouped.spans.shape == (96,)
    assert relative_error(w, decode_values(grouped)) < 0.5 * relative_error(w, decode_values(tensor))
    # one centre pair and one span per group of 64 weights instead of one for the whole tensor
    assert grouped.bits_per_weight() - tensor.bits_per_weight() == pytest.approx(3 * 32 / 64 - 3 * 32 / w.size)


def test_clipping_the_grid_to_a_few_rms_deviations_beats_its_full_range_on_heavy_tails():
    w = _weights(tail=True)
    full = relative_error(w, decode_values(encode(w, HyperSetting("grid", 16, 0, side=None))))
    clipped = relative_error(w, decode_values(encode(w, HyperSetting("grid", 16, 0, side=6.0))))
    assert clipped < 0.8 * full


def test_winding_in_three_dimensions_round_trips_to_its_nearest_codewords():
    w = _weights(shape=(30, 41))  # 1230 weights: not a multiple of 3, the last group is padded
    code = encode(w, HyperSetting("winding", 4096, 0, side=None, dims=3))
    decoded = decode_values(code)
    assert decoded.shape == w.shape and code.bits == 12
    assert relative_error(w, decoded) < 0.5


def test_a_constant_tensor_decodes_exactly():
    w = np.full((64, 64), 0.25, np.float32)
    for setting in (HyperSetting("lattice", 225, 3), HyperSetting("grid", 15, 0), HyperSetting("winding", 256, 0)):
        np.testing.assert_array_equal(decode_values(encode(w, setting)), w)


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


@pytest.mark.parametrize("bits", range(1, 17))
def test_row_unpacking_in_int32_arithmetic_matches_the_bit_stream_at_every_width(bits):
    rng = np.random.default_rng(100 + bits)
    count = 1003  # not whole rows: the last row is padded
    indices = rng.integers(0, 1 << bits, count)
    rows = pack_rows(indices, bits)
    assert rows.shape == (-(-count // 8), bits)
    np.testing.assert_array_equal(rows.reshape(-1)[: -(-count * bits // 8)], pack_indices(indices, bits))
    weights, _, _ = row_unpacking(bits)
    assert (rows.astype(np.int64) @ weights).max() < 2**24  # the window fits int32 (and float32) exactly
    np.testing.assert_array_equal(unpack_rows(rows, bits, count), indices)


def test_packing_refuses_indices_that_do_not_fit():
    with pytest.raises(ValueError):
        pack_indices(np.array([0, 8]), 3)


def test_setting_grid_fills_each_index_width():
    lattice = setting_grid(HyperSetting("lattice"), bits=[8, 10], bands=[0, 3], sides=[4.0])
    assert {(s.codes, s.bands) for s in lattice} == {(255, 0), (1023, 0), (63, 3), (255, 3)}
    assert all(index_bits(s.codes + 1, s.bands) in (8, 10) for s in lattice)  # n + 1 with the centre
    assert [s.codes for s in setting_grid(HyperSetting("grid"), bits=[8, 13], sides=[None])] == [16, 90]
    assert {s.side for s in setting_grid(HyperSetting("grid"), bits=[8])} == {None, 4.0, 6.0, 8.0, 12.0}
    assert [s.codes for s in setting_grid(HyperSetting("lattice", side=0.8, absolute_side=True), codes=[1600],
                                          bands=[4], sides=[3.0, 4.0])] == [1600]


def test_choose_setting_takes_the_fewest_bits_within_the_target_else_the_smallest_error():
    a, b, c = (HyperSetting("lattice", n) for n in (63, 255, 1023))
    results = [(a, 0.20, 4.0), (b, 0.08, 5.0), (c, 0.03, 6.0)]
    assert choose_setting(results, 0.1)[0] == b
    assert choose_setting(results, 0.01)[0] == c
    assert choose_setting(results, None)[0] == c


def test_evaluate_settings_samples_large_tensors_and_counts_bits_of_the_whole_tensor():
    w = _weights(shape=(1024, 512))
    setting = HyperSetting("lattice", 255, 0, 4.0)
    (_, error, bits), = evaluate_settings(w, [setting], sample=1 << 14)
    full = encode(w, setting)
    assert bits == pytest.approx(full.bits_per_weight(), rel=1e-6)
    assert error == pytest.approx(relative_error(w, decode_values(full)), rel=0.1)


def test_the_sample_is_coded_in_the_whole_tensors_frame_so_a_rare_outlier_still_counts():
    """One weight 20 RMS out sets the last band's edge: a sample that misses it must still be coded with it,
    and pairs (neighbours) are sampled whole."""
    w = _weights(shape=(512, 512))
    w[3, 5] = 20 * w.std()
    candidates = [HyperSetting("lattice", 255, k, side) for k in (0, 1, 3) for side in (3.0, 6.0)]
    for setting, sampled, _ in evaluate_settings(w, candidates, sample=1 << 14):
        whole = relative_error(w, decode_values(encode(w, setting)))
        assert sampled == pytest.approx(whole, rel=0.15), setting.label()


def test_the_plan_label_names_the_bands_really_used():
    w = _weights()  # Gaussian: at 8 RMS deviations no pair lies outside the square
    code = encode(w, HyperSetting("lattice", 255, 3, 8.0))
    assert len(code.band_scales) == 1 and "-K0-" in code.label()


@pytest.mark.slow  # about 6 s: the full search over 60 settings
def test_stopping_at_the_first_width_within_the_target_chooses_what_the_full_search_chooses():
    w = _weights(shape=(256, 128), tail=True)
    candidates = setting_grid(HyperSetting("lattice"), bits=range(4, 14), bands=(0, 1, 3), sides=(3.0, 6.0))
    full = evaluate_settings(w, candidates)
    for target in (0.03, 0.08, 0.2, 1e-6):
        early = evaluate_settings(w, candidates, stop_within=target)
        assert choose_setting(early, target)[0] == choose_setting(full, target)[0]
        if target >= 0.08:  # reached below 13 bits: the wider widths are skipped
            assert len(early) < len(full)
