"""The per-tensor choice of a hyperfunction setting (Hyper-Compression, Fan et al.): candidate settings per index
width, their error measured on a fixed sample of the tensor, and the fewest bits within the target.

The codes themselves (codebooks, frames, bands, nearest codewords, the packed indices and their decode) are a
stored format: `symshrink.runtime.formats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from symshrink.runtime.formats import (
    Frame,
    HyperCode,
    HyperSetting,
    decode_values,
    encode_pairs,
    frame_of,
    hyper_pairs,
    hyper_side_bits,
    relative_error,
)

__all__ = ["HyperSetting", "choose_setting", "evaluate_settings", "setting_grid", "DEFAULT_SIDES", "ChooseSetting"]


# relative sides tried when none is given: the lattice's bands take the outliers, so its square is small;
# the grid tries its full range (plain round-to-nearest) and clipped ranges (the best of which is the
# strong RTN baseline); the winding keeps the paper's range
DEFAULT_SIDES: dict[str, tuple[float | None, ...]] = {"lattice": (3.0, 4.0, 6.0), "grid": (None, 4.0, 6.0, 8.0, 12.0),
                                                      "winding": (None,)}


def setting_grid(base: HyperSetting, bits: Sequence[int] = range(4, 14), bands: Sequence[int] = (0,),
                 sides: Sequence[float | None] = (), codes: Sequence[int] = ()) -> list[HyperSetting]:
    """Candidate settings for the per-tensor choice. Without explicit `codes`, each index width b in `bits`
    is filled: the lattice takes n = 2^b / (K + 1) - 1 (plus its centre codeword), the winding n = 2^b, the
    grid M = floor(2^(b / dims)) levels per weight. `sides` (relative, or None for the range) default to
    DEFAULT_SIDES; an absolute side is the base's alone."""
    bands = bands if base.codebook == "lattice" else (0,)
    sides = (base.side,) if base.absolute_side else tuple(sides) or DEFAULT_SIDES[base.codebook]

    if any(not 1 <= b <= 16 for b in bits):
        raise ValueError(f"index widths must be 1..16 bits, not {list(bits)}")

    def sizes(k: int) -> list[int]:
        if codes:
            return list(codes)
        if base.codebook == "lattice":
            return [(1 << b) // (k + 1) - 1 for b in bits if (1 << b) // (k + 1) - 1 >= 2]
        if base.codebook == "winding":
            return [1 << b for b in bits]
        return [math.floor(2 ** (b / base.dims) + 1e-9) for b in bits]

    settings = [HyperSetting(base.codebook, n, k, s, base.absolute_side, base.group, base.dims)
                for k in bands for n in sizes(k) for s in sides]
    return list(dict.fromkeys(settings))


def evaluate_settings(weight: np.ndarray, settings: Iterable[HyperSetting], sample: int = 1 << 16, seed: int = 0,
                      stop_within: float | None = None) -> list[tuple[HyperSetting, float, float]]:
    """(setting, relative error, bits per weight) of each candidate. The error is measured on a fixed random
    sample of at most `sample` weights: whole pairs (per tensor) or whole groups, coded in the frame of the
    whole tensor (centres, spans, farthest pair), so that choosing stays fast on large tensors and sees the
    outliers. `stop_within`: candidates go in order of index width, and the widths after the first one with
    an error within this are not tried (what `choose_setting` would pick is among those tried)."""
    flat = np.asarray(weight, np.float64).reshape(-1)
    results = []
    done_at = None
    samples: dict[tuple, tuple[np.ndarray, Frame]] = {}  # the frame and sample depend on neither n nor K: one per side
    for setting in sorted(settings, key=HyperSetting.index_bits):
        width = setting.index_bits()
        if done_at is not None and width > done_at:
            break
        key = (setting.side, setting.absolute_side, setting.group, setting.dims)
        if key not in samples:
            samples[key] = _sample(flat, setting, sample, seed)
        pairs, frame = samples[key]
        code = encode_pairs(pairs, frame, setting, (pairs.size,))
        error = relative_error(pairs.reshape(-1), decode_values(code))
        results.append((setting, error, _bits_per_weight(setting, code, flat.size)))
        if stop_within is not None and error <= stop_within and done_at is None:
            done_at = width
    return results


def _sample(flat: np.ndarray, setting: HyperSetting, sample: int, seed: int) -> tuple[np.ndarray, Frame]:
    """At most `sample` weights of the tensor in its pairs layout, and the whole tensor's frame for them:
    random whole pairs (per tensor) or random whole groups."""
    pairs = hyper_pairs(flat, setting.dims, setting.group)
    frame = frame_of(pairs, setting)
    if pairs.size <= sample:
        return pairs, frame
    rng = np.random.default_rng(seed)
    if len(pairs) == 1:
        return pairs[:, np.sort(rng.choice(pairs.shape[1], sample // setting.dims, replace=False))], frame
    groups = np.sort(rng.choice(len(pairs), max(1, sample // pairs[0].size), replace=False))
    return pairs[groups], frame.select(groups)


def _bits_per_weight(setting: HyperSetting, code: HyperCode, count: int) -> float:
    """Bits per weight of the whole tensor under `setting`, from a code of a sample of it."""
    groups = 1 if setting.group is None else -(-count // setting.group)
    pairs = -(-count // setting.dims) if setting.group is None else groups * (setting.group // setting.dims)
    return (code.bits * pairs + hyper_side_bits(code.band_scales.size, groups, setting.dims)) / count


def choose_setting(results: list[tuple[HyperSetting, float, float]], target: float | None
                   ) -> tuple[HyperSetting, float, float]:
    """The fewest bits per weight within the relative error `target` (without one, or when none is within
    it: the smallest error). Pure: swappable."""
    within = [r for r in results if target is not None and r[1] <= target]
    return min(within, key=lambda r: (r[2], r[1])) if within else min(results, key=lambda r: (r[1], r[2]))


ChooseSetting = Callable[[list[tuple[HyperSetting, float, float]], float | None], tuple[HyperSetting, float, float]]
