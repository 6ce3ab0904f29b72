"""Hyperfunction codes (Hyper-Compression, Fan et al.): groups of `dims` weights coded as one index into a
fixed codebook, in one arithmetic shared by the encoder, onnxruntime and the GPU kernel.

A tensor is flattened into pairs p (dims = 2; the winding also takes 3), cut into groups with a centre c_g
and a span L_g. Codeword j of a fixed table of offsets u_j (in units of L) and band k of K radial bands
decode to  p' = c_g + L_g * (u_j * s_k),  all in float32, in that order. Codebooks:
- lattice (v3, the official code): u_0 = 0 (the centre) and the sheared lattice of a rational winding of
  slope m = ceil(sqrt(n)), u_{1+t} = (t / m^2, (t mod m) / m) - 1/2 for t < n; outside the square
  |z|_inf <= 1/2 a pair is in band k >= 1 when |z|_2 <= r_k = 1/2 + k (R - 1/2) / K (R the farthest
  pair), shrunk by s_k = 2 r_k into the disc, coded, expanded back. Index j + (n + 1) k.
- winding (v1, the paper): u_t = frac(t a) - 1/2, a_j = 1 / ((pi + j) R), frac in 32-bit fixed point.
- grid: round-to-nearest with M levels per weight (M^dims codewords): RTN at exactly the same bits.
A pair costs ceil(log2(codes * (K + 1))) bits; indices are packed little-endian into a bit stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["FIXED_POINT_BITS", "CODEBOOKS", "HyperSetting", "HyperCode", "winding_steps", "winding_codebook",
           "lattice_offsets", "winding_offsets", "grid_offsets", "codebook_offsets", "nearest_codeword",
           "pack_indices", "unpack_indices", "pack_rows", "row_unpacking", "unpack_rows", "index_bits", "encode",
           "decode_values", "relative_error", "choose_setting", "evaluate_settings", "setting_grid", "DEFAULT_SIDES",
           "Frame", "frame_of"]

FIXED_POINT_BITS = 32
_MASK = (1 << FIXED_POINT_BITS) - 1
CODEBOOKS = ("lattice", "winding", "grid")
WINDING_RADIUS = 10.0  # R of the paper's direction a_j = 1 / ((pi + j) R)


def winding_steps(dims: int, radius: float) -> np.ndarray:
    """A_j = floor(frac(1 / ((pi + j) R)) 2^32) for j = 0..dims-1, as int64."""
    return np.array([int(math.fmod(1.0 / ((math.pi + j) * radius), 1.0) * (1 << FIXED_POINT_BITS)) for j in range(dims)],
                    dtype=np.int64)


def winding_codebook(size: int, dims: int, radius: float) -> np.ndarray:
    """Codewords frac(theta * a) for theta = 0..size-1: [size, dims] float64 in [0, 1), exact in fixed point."""
    theta = np.arange(size, dtype=np.int64)[:, None]
    # theta < 2^31 and A_j < 2^32: the product overflows int64, so multiply in two 16-bit halves of A_j
    steps = winding_steps(dims, radius)[None, :]
    low = (theta * (steps & 0xFFFF)) & _MASK
    high = ((theta * (steps >> 16)) & 0xFFFF) << 16
    return ((low + high) & _MASK).astype(np.float64) / (1 << FIXED_POINT_BITS)


def lattice_offsets(size: int) -> np.ndarray:
    """The v3 inner codebook in units of the square's side: the centre, then `size` points of the sheared
    lattice (t / m^2, (t mod m) / m) - 1/2, m = ceil(sqrt(size)). [size + 1, 2] float32."""
    slope = math.isqrt(size - 1) + 1 if size > 1 else 1  # ceil(sqrt(size)) in exact integers
    t = np.arange(size, dtype=np.int64)
    lattice = np.stack([t / slope**2, (t % slope) / slope], axis=1) - 0.5
    return np.concatenate([np.zeros((1, 2)), lattice]).astype(np.float32)


def winding_offsets(size: int, dims: int = 2, radius: float = WINDING_RADIUS) -> np.ndarray:
    """The v1 codebook frac(t a) - 1/2: [size, dims] float32."""
    return (winding_codebook(size, dims, radius) - 0.5).astype(np.float32)


def grid_offsets(levels: int, dims: int = 2) -> np.ndarray:
    """Round-to-nearest: `levels` evenly spaced values on [-1/2, 1/2] per weight, all combinations
    (the first weight of a pair varies slowest). [levels ** dims, dims] float32."""
    axis = np.linspace(-0.5, 0.5, levels)
    return np.stack(np.meshgrid(*[axis] * dims, indexing="ij"), axis=-1).reshape(-1, dims).astype(np.float32)


@dataclass(frozen=True)
class HyperSetting:
    """One codec setting. codes: n of the lattice or winding, levels per weight of the grid. bands: K (lattice
    only). side: the codebook square's side around the group's mean, absolute (`absolute_side`, the paper's L)
    or in units of the group's RMS deviation from it; None: the square [min, max]^dims of the group's range
    (the v1 scaling; round-to-nearest without clipping). group: weights per group (centre and span), None:
    the tensor."""

    codebook: str = "lattice"
    codes: int = 225
    bands: int = 3
    side: float | None = 4.0
    absolute_side: bool = False
    group: int | None = None
    dims: int = 2

    def __post_init__(self) -> None:
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {', '.join(CODEBOOKS)}, not {self.codebook!r}")
        if self.dims != 2 and self.codebook != "winding":
            raise ValueError("groups of 3 weights need the winding codebook")
        if self.codes < 2 or self.bands < 0 or (self.side is not None and self.side <= 0):
            raise ValueError("codes must be >= 2, bands >= 0 and side > 0")
        if self.group is not None and (self.group < self.dims or self.group % self.dims):
            raise ValueError(f"group must be a multiple of {self.dims} weights")

    def offsets(self) -> np.ndarray:
        return codebook_offsets(self)

    def index_bits(self) -> int:
        """Bits per stored index: the table's size times the bands."""
        size = {"lattice": self.codes + 1, "winding": self.codes, "grid": self.codes**self.dims}[self.codebook]
        return index_bits(size, self.bands if self.codebook == "lattice" else 0)

    def table_key(self) -> tuple[str, int, int]:
        """What the codebook table depends on: tensors with the same key share one table."""
        return self.codebook, self.codes, self.dims

    def label(self) -> str:
        group = "tensor" if self.group is None else f"g{self.group}"
        side = "range" if self.side is None else f"L{self.side:g}" if self.absolute_side else f"{self.side:g}sd"
        if self.codebook == "grid":
            return f"grid-{self.codes}-{side}-{group}"
        bands = f"-K{self.bands}" if self.codebook == "lattice" else ""
        return f"{self.codebook}-n{self.codes}{bands}-{side}-{group}" + (f"-d{self.dims}" if self.dims != 2 else "")


def codebook_offsets(setting: HyperSetting) -> np.ndarray:
    if setting.codebook == "lattice":
        return lattice_offsets(setting.codes)
    if setting.codebook == "winding":
        return winding_offsets(setting.codes, setting.dims)
    return grid_offsets(setting.codes, setting.dims)


def index_bits(codes: int, bands: int) -> int:
    """Bits per stored index j + codes k: ceil(log2(codes (bands + 1)))."""
    return max(1, (codes * (bands + 1) - 1).bit_length())


def nearest_codeword(codebook: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword (Euclidean) of each point [m, dims]: int64 [m]."""
    _, index = cKDTree(codebook).query(points)
    return index.astype(np.int64)


_PACK_CHUNK = 1 << 20  # indices per chunk: the bit matrix of a chunk is `bits` bytes per index


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative indices below 2**bits -> bytes, `bits` per index, index 0 in the lowest bits."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be 1..16, not {bits}")
    values = np.asarray(indices, dtype=np.int64).reshape(-1)
    if values.size and (values.min() < 0 or values.max() >= 1 << bits):
        raise ValueError(f"indices must lie in [0, 2**{bits})")
    # chunks of a multiple of 8 indices fill whole bytes, so the chunks' bytes concatenate
    chunks = [np.packbits(((values[i:i + _PACK_CHUNK, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1),
                          bitorder="little") for i in range(0, values.size, _PACK_CHUNK)]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_indices`: the first `count` indices, int64."""
    stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return stream @ (1 << np.arange(bits, dtype=np.int64))


INDICES_PER_ROW = 8  # eight indices of `bits` bits fill exactly `bits` bytes


def pack_rows(indices: np.ndarray, bits: int) -> np.ndarray:
    """`pack_indices` padded with index 0 to whole rows of eight indices: uint8 [rows, bits]."""
    values = np.asarray(indices, np.int64).reshape(-1)
    padded = np.concatenate([values, np.zeros(-values.size % INDICES_PER_ROW, np.int64)])
    return pack_indices(padded, bits).reshape(-1, bits)


def row_unpacking(bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """How a row of `bits` bytes yields its eight indices in integer arithmetic: window = row @ weights
    [bits, 8] (index k's bytes q..q+2 at 1, 256, 65536, q = k bits / 8; bytes past the row are never needed),
    index = (window / shifts) mod 2^bits with shifts[k] = 2^(k bits mod 8). int32 throughout (< 2^24)."""
    weights = np.zeros((bits, INDICES_PER_ROW), np.int32)
    start = np.arange(INDICES_PER_ROW) * bits
    for k, first in enumerate(start // 8):
        for byte in range(3):
            if first + byte < bits:
                weights[first + byte, k] = 1 << (8 * byte)
    return weights, (1 << (start % 8)).astype(np.int32), 1 << bits


def cut_rows(rows, weights, shifts, modulus: int):
    """The decode's integer arithmetic (`row_unpacking`'s arrays, of the rows' own array type: numpy or CuPy):
    the eight indices of each row, int32 [rows, 8]."""
    return (rows.astype(np.int32) @ weights) // shifts % modulus


def unpack_rows(rows: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` indices of the packed rows (`cut_rows` in numpy), int32."""
    return cut_rows(rows, *row_unpacking(bits)).reshape(-1)[:count]


@dataclass(frozen=True)
class HyperCode:
    """A tensor in hyperfunction codes: `indices` [pairs] (j + codes k), the codebook `offsets` [codes, dims],
    `band_scales` [K + 1] (s_0 = 1), per group `centres` [G, dims] and `spans` [G], all float32."""

    setting: HyperSetting
    shape: tuple[int, ...]
    indices: np.ndarray
    offsets: np.ndarray
    band_scales: np.ndarray
    centres: np.ndarray
    spans: np.ndarray

    @property
    def bits(self) -> int:
        return index_bits(len(self.offsets), len(self.band_scales) - 1)

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def side_bits(self) -> int:
        """Bits of the band scales, centres and spans (float32). The codebook table depends only on the
        codebook, n and dims: one copy serves every tensor that shares them (`table_bits`)."""
        return _side_bits(self.band_scales.size, len(self.spans), self.setting.dims)

    def table_bits(self) -> int:
        return 32 * self.offsets.size

    def bits_per_weight(self) -> float:
        return (self.bits * len(self.indices) + self.side_bits()) / max(self.count, 1)

    def label(self) -> str:
        """The setting's label with the bands really used (none when no pair lies outside the square)."""
        return replace(self.setting, bands=len(self.band_scales) - 1).label()

    def packed(self) -> np.ndarray:
        """The indices in rows of eight: uint8 [ceil(pairs / 8), bits]."""
        return pack_rows(self.indices, self.bits)


def _groups(flat: np.ndarray, dims: int, group: int | None) -> np.ndarray:
    """Weights [count] -> pairs [G, pairs per group, dims]; padding repeats the last weight, a value the
    group already holds, so that it moves neither the range nor (much) the centre."""
    per_group = flat.size if group is None else group
    per_group = -(-per_group // dims) * dims
    total = -(-flat.size // per_group) * per_group
    padded = np.concatenate([flat, np.full(total - flat.size, flat[-1] if flat.size else 0.0)])
    return padded.reshape(-1, per_group // dims, dims)


def _centres_and_spans(pairs: np.ndarray, setting: HyperSetting) -> tuple[np.ndarray, np.ndarray]:
    if setting.side is None:  # the group's range [min, max] in every coordinate
        low, high = pairs.min(axis=(1, 2)), pairs.max(axis=(1, 2))
        return np.repeat(((low + high) / 2)[:, None], pairs.shape[2], axis=1), high - low
    centres = pairs.mean(axis=1)
    if setting.absolute_side:
        return centres, np.full(len(pairs), setting.side)
    return centres, setting.side * np.sqrt(((pairs - centres[:, None, :]) ** 2).mean(axis=(1, 2)))


@dataclass(frozen=True)
class Frame:
    """Where a tensor's pairs are coded: per group the centre [G, dims] and span [G] (float32), and over the
    tensor the farthest normalised radius |z|_2 (the last band's edge) and whether any pair lies outside the
    square. Taken from the whole tensor even when a sample is coded, so that a sample without the tensor's
    extreme pairs is still coded as the tensor would be."""

    centres: np.ndarray
    spans: np.ndarray
    farthest: float
    outside: bool

    def normalise(self, pairs: np.ndarray) -> np.ndarray:
        """[G, per group, dims] -> z = (p - c_g) / L_g, [G * per group, dims]."""
        safe = np.where(self.spans > 0, self.spans, 1.0).astype(np.float64)  # a constant group decodes to its centre
        return ((pairs - self.centres[:, None, :]) / safe[:, None, None]).reshape(-1, pairs.shape[2])

    def select(self, groups: np.ndarray) -> Frame:
        return Frame(self.centres[groups], self.spans[groups], self.farthest, self.outside)


def frame_of(pairs: np.ndarray, setting: HyperSetting) -> Frame:
    centres, spans = _centres_and_spans(pairs, setting)
    partial = Frame(centres.astype(np.float32), spans.astype(np.float32), 0.0, False)
    normalised = partial.normalise(pairs)
    return Frame(partial.centres, partial.spans, float(np.linalg.norm(normalised, axis=1).max(initial=0.0)),
                 bool((np.abs(normalised) > 0.5).any()))


def encode(weight: np.ndarray, setting: HyperSetting) -> HyperCode:
    """Nearest codeword of every pair (with its radial band on the lattice)."""
    pairs = _groups(np.asarray(weight, np.float64).reshape(-1), setting.dims, setting.group)
    return _encode_pairs(pairs, frame_of(pairs, setting), setting, tuple(np.shape(weight)))


def _encode_pairs(pairs: np.ndarray, frame: Frame, setting: HyperSetting, shape: tuple[int, ...]) -> HyperCode:
    normalised = frame.normalise(pairs)
    bands, band_scales = _bands(normalised, frame, setting)
    offsets = setting.offsets()
    codes = nearest_codeword(offsets.astype(np.float64), normalised / band_scales[bands].astype(np.float64)[:, None])
    return HyperCode(setting, shape, codes + len(offsets) * bands, offsets, band_scales, frame.centres, frame.spans)


def _bands(normalised: np.ndarray, frame: Frame, setting: HyperSetting) -> tuple[np.ndarray, np.ndarray]:
    """Band of each normalised pair and the band scales s_k = 2 r_k (s_0 = 1): band 0 inside the square
    |z|_inf <= 1/2, band k the first ring with |z|_2 <= r_k, r_K the farthest pair of the tensor."""
    bands = np.zeros(len(normalised), np.int64)
    if setting.codebook != "lattice" or setting.bands == 0 or not frame.outside:
        return bands, np.ones(1, np.float32)
    outside = np.abs(normalised).max(axis=1) > 0.5
    radius = np.linalg.norm(normalised, axis=1)
    rings = 0.5 + np.arange(1, setting.bands + 1) * (frame.farthest - 0.5) / setting.bands
    rings[-1] = frame.farthest
    bands[outside] = 1 + np.minimum(np.searchsorted(rings, radius[outside]), setting.bands - 1)
    return bands, np.concatenate([[1.0], 2.0 * rings]).astype(np.float32)


def decode_values(code: HyperCode) -> np.ndarray:
    """The numpy reference of the decode: the table T[j + codes k] = u_j s_k, then c_g + L_g * T[index], in
    float32, the order of the ONNX body."""
    table = (code.band_scales[:, None, None] * code.offsets[None, :, :]).reshape(-1, code.setting.dims)
    scaled = table[np.asarray(code.indices, np.int64)]
    groups = len(code.spans)
    pairs = scaled.reshape(groups, -1, code.setting.dims)
    values = code.centres[:, None, :] + pairs * code.spans[:, None, None]
    return values.reshape(-1)[: code.count].reshape(code.shape)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """||W - W'|| / ||W|| (its square is the normalised MSE)."""
    weight = np.asarray(weight, np.float64)
    return float(np.linalg.norm(weight - approx) / max(np.linalg.norm(weight), 1e-30))


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
        code = _encode_pairs(pairs, frame, setting, (pairs.size,))
        error = relative_error(pairs.reshape(-1), decode_values(code))
        results.append((setting, error, _bits_per_weight(setting, code, flat.size)))
        if stop_within is not None and error <= stop_within and done_at is None:
            done_at = width
    return results


def _sample(flat: np.ndarray, setting: HyperSetting, sample: int, seed: int) -> tuple[np.ndarray, Frame]:
    """At most `sample` weights of the tensor in its pairs layout, and the whole tensor's frame for them:
    random whole pairs (per tensor) or random whole groups."""
    pairs = _groups(flat, setting.dims, setting.group)
    frame = frame_of(pairs, setting)
    if pairs.size <= sample:
        return pairs, frame
    rng = np.random.default_rng(seed)
    if len(pairs) == 1:
        return pairs[:, np.sort(rng.choice(pairs.shape[1], sample // setting.dims, replace=False))], frame
    groups = np.sort(rng.choice(len(pairs), max(1, sample // pairs[0].size), replace=False))
    return pairs[groups], frame.select(groups)


def _side_bits(bands: int, groups: int, dims: int) -> int:
    """float32 band scales, and a centre (dims values) and a span per group."""
    return 32 * (bands + groups * (dims + 1))


def _bits_per_weight(setting: HyperSetting, code: HyperCode, count: int) -> float:
    """Bits per weight of the whole tensor under `setting`, from a code of a sample of it."""
    groups = 1 if setting.group is None else -(-count // setting.group)
    pairs = -(-count // setting.dims) if setting.group is None else groups * (setting.group // setting.dims)
    return (code.bits * pairs + _side_bits(code.band_scales.size, groups, setting.dims)) / count


def choose_setting(results: list[tuple[HyperSetting, float, float]], target: float | None
                   ) -> tuple[HyperSetting, float, float]:
    """The fewest bits per weight within the relative error `target` (without one, or when none is within
    it: the smallest error). Pure: swappable."""
    within = [r for r in results if target is not None and r[1] <= target]
    return min(within, key=lambda r: (r[2], r[1])) if within else min(results, key=lambda r: (r[1], r[2]))


ChooseSetting = Callable[[list[tuple[HyperSetting, float, float]], float | None], tuple[HyperSetting, float, float]]
