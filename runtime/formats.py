"""The table of stored formats: the one contract between the compiler (`passes/`) and the runtime.

Each `Format` row says how one kind of compressed weight is stored in an ONNX model: its name, its bytes
(a function of the shape and the settings, so they are known before encoding), the numpy reference
`encode(weight, **settings) -> Stored` (the initializers and node attributes it writes) and
`decode(stored) -> float32 weight` (what the ONNX nodes compute, in their float32 order), the nodes it
emits, the runtime kernels that read it on the device, and a named budget on its round-trip error.
The passes write these arrays and nothing else; the runtime reads them and nothing else.

Below the table, the layouts it is made of, moved here from the passes so that the runtime imports none:
- blocks of input rows and `QuantizedWeight` (codes behind DequantizeLinear, uint2, uint4 or uint8), the
  round-to-nearest grids of 8, 4 and 2 bits (`quantize_grid`);
- ternary codes (`ternarize`: the optimal fit) and their digits t + 1 in bytes: 2 bits (4 per byte, element 0
  in the low bits, ONNX's uint2 packing) or base 3 (5 per byte, 1.6 bits), and the TernaryMatMul inputs;
- hyperfunction codes (`encode_hyper`: codebooks, frames, bands, nearest codewords), their indices packed in
  rows of eight, and the HyperDecode / HyperDecodeGrouped inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import ml_dtypes
import numpy as np
from scipy.spatial import cKDTree

from symshrink.errors import BadInput

__all__ = ["FUNCTION_DOMAIN", "Stored", "Budget", "Format", "FORMATS", "BUDGETS", "stored_bytes", "relative_error",
           # DequantizeLinear
           "DEQUANTIZE_OPSET", "STORAGE_DTYPES", "QuantizedWeight", "split_blocks", "expand_scales", "block_count",
           "grid_frame", "round_to_grid", "quantize_grid", "quantize_uint8", "GRID_BITS", "dequantize_arrays",
           "decode_dequantize", "SIGNED_DTYPES",
           # DequantizeLinear -> Conv
           "conv_weight", "conv_matrix", "conv_accepts", "conv_arrays", "decode_conv",
           # GatherBlockQuantized
           "CONTRIB_DOMAIN", "gather_block", "gather_accepts", "tied_accepts", "TIED_EXTRA_BYTES", "pack_low_bits",
           "unpack_low_bits", "gather_arrays", "decode_gather", "MATMUL_NBITS_ACCURACY", "matmul_nbits_accepts",
           "matmul_nbits_arrays", "matmul_nbits_layout", "decode_matmul_nbits",
           # ternary
           "Ternary", "ternarize", "ternary_scales", "DIGITS_PER_BYTE", "pack_codes", "unpack_codes", "TERNARY_INPUTS",
           "TERNARY_RADIXES", "ternary_function_name", "ternary_function_arrays", "unpack_ternary_function",
           # hyperfunction
           "FIXED_POINT_BITS", "CODEBOOKS", "HyperSetting", "HyperCode", "Frame", "winding_steps", "winding_codebook",
           "lattice_offsets", "winding_offsets", "grid_offsets", "codebook_offsets", "index_bits", "nearest_codeword",
           "pack_indices", "unpack_indices", "INDICES_PER_ROW", "pack_rows", "row_unpacking", "cut_rows", "unpack_rows",
           "hyper_side_bits", "hyper_pairs", "frame_of", "encode_hyper", "encode_pairs", "codebook_table", "decode_values",
           "HYPER_INPUTS", "HYPER_MAX_BITS", "hyper_function_name", "is_grouped", "hyper_function_inputs",
           "decode_hyper_inputs", "HYPER_SHARED"]

FUNCTION_DOMAIN = "ai.symshrink"  # the domain of symshrink's model-local functions (TernaryMatMul, HyperDecode)


def relative_error(weight: np.ndarray, approx: np.ndarray) -> float:
    """||W - W'|| / ||W|| (its square is the normalised MSE): the measure of every round-trip budget."""
    weight = np.asarray(weight, np.float64)
    return float(np.linalg.norm(weight - approx) / max(np.linalg.norm(weight), 1e-30))


# -- blocks and DequantizeLinear ------------------------------------------------------------------------------
# A weight [K, N] (x W) is cut along K into ceil(K / block) blocks of `block` rows, the last one padded with
# zero rows; `block=None` means one block per column (per channel). Codes q [K, N] are stored in their own
# narrow type (uint2 for ternary codes, uint8), scales and zero points per block (`axis=0, block_size=block`)
# or per column (`axis=1`). onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits for 2-, 4- and 8-bit
# codes and block sizes 32..256 (and per-column scales), so the weight stays narrow in memory.

DEQUANTIZE_OPSET = 25  # the first opset whose DequantizeLinear takes uint2
STORAGE_DTYPES = {2: ml_dtypes.uint2, 4: ml_dtypes.uint4, 8: np.uint8}  # code bits -> storage type
SIGNED_DTYPES = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}  # ... of symmetric grids (no zero points)


def block_count(rows: int, block: int | None) -> int:
    return 1 if block is None else -(-rows // block)


def split_blocks(weight: np.ndarray, block: int | None) -> np.ndarray:
    """weight [K, N] -> [blocks, block, N] in float64, zero-padded to whole blocks."""
    rows, cols = weight.shape
    size = rows if block is None else block
    padded = np.zeros((block_count(rows, block) * size, cols))
    padded[:rows] = weight
    return padded.reshape(-1, size, cols)


DEQUANTIZE_COLUMNS = 1 << 13


def expand_scales(scales: np.ndarray, rows: int, block: int | None) -> np.ndarray:
    """Per-block values [blocks, N] -> one per weight row [K, N]."""
    return np.repeat(scales, rows if block is None else block, axis=0)[:rows]


@dataclass(frozen=True)
class QuantizedWeight:
    """w ~ scales * (codes - zero_points): codes [K, N] (unsigned, below 2**bits), scales and zero points
    [blocks, N] per block of `block` input rows (None: per column)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    block: int | None
    bits: int
    symmetric: bool = False  # every zero point 2^(bits-1): stored as signed codes q - 2^(bits-1), without them

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        values = np.empty((rows, cols), self.scales.dtype)
        for start in range(0, cols, DEQUANTIZE_COLUMNS):  # float64 temporaries of K x DEQUANTIZE_COLUMNS at most
            part = slice(start, start + DEQUANTIZE_COLUMNS)
            offsets = self.codes[:, part].astype(np.float64) - expand_scales(self.zero_points[..., part], rows, self.block)
            values[:, part] = offsets * expand_scales(self.scales[..., part], rows, self.block)
        return values


GRID_BITS = (8, 4, 2)  # the integer grids written: onnxruntime's MatMulNBits keeps each narrow in memory


def grid_frame(blocks: np.ndarray, bits: int, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points [..., N] of the grid of 2^bits levels over values [..., rows, N]. Asymmetric: the
    range widened to hold 0 (so that zero stays exact), scale = (max - min) / (2^bits - 1). Symmetric: zero point
    2^(bits-1) and scale = -m / 2^(bits-1) for m the value of largest magnitude, so that m takes the lowest level
    and the other side reaches 2^(bits-1) - 1 steps (a negative scale where m > 0; onnxruntime's RTN does the same)."""
    levels = (1 << bits) - 1
    if symmetric:
        rows = np.argmax(np.abs(blocks), axis=-2)[..., None, :]
        extreme = np.take_along_axis(blocks, rows, axis=-2)[..., 0, :]
        half = 1 << (bits - 1)
        return -extreme / half, np.full(extreme.shape, float(half))
    low = np.minimum(blocks.min(axis=-2), 0.0)
    high = np.maximum(blocks.max(axis=-2), 0.0)
    scales = (high - low) / levels
    zero_points = np.clip(np.round(-low / np.where(scales > 0, scales, 1.0)), 0, levels)
    return scales, zero_points


def round_to_grid(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Codes 0..2^bits - 1 of the nearest grid points (scales and zero points broadcast against values)."""
    safe = np.where(scales != 0, scales, 1.0)
    return np.clip(np.round(values / safe) + zero_points, 0, (1 << bits) - 1)


def quantize_grid(weight: np.ndarray, block: int | None, bits: int, symmetric: bool = False) -> QuantizedWeight:
    """Round-to-nearest on a grid of 2^bits levels: per output column and block of input rows, w ~ scale * (q -
    zero_point) with q in 0..2^bits - 1 (`grid_frame`). The error per weight is at most |scale| / 2 inside the grid."""
    blocks = split_blocks(weight, block)
    scales, zero_points = grid_frame(blocks, bits, symmetric)
    codes = round_to_grid(blocks, scales[:, None, :], zero_points[:, None, :], bits)
    codes = codes.reshape(-1, weight.shape[1])[: weight.shape[0]].astype(np.uint8)
    return QuantizedWeight(codes, scales.astype(weight.dtype), zero_points.astype(np.uint8), block, bits, symmetric)


def quantize_uint8(weight: np.ndarray, block: int | None = None) -> QuantizedWeight:
    """The 8-bit grid (`quantize_grid`), the ternary method's fallback."""
    return quantize_grid(weight, block, 8)


@dataclass(frozen=True)
class Stored:
    """What a format writes for one weight: initializers by input name (in the node's input order) and the
    attributes of the node that reads them."""

    arrays: dict[str, np.ndarray]
    attributes: dict[str, int] = field(default_factory=dict)

    def nbytes(self, without: tuple[str, ...] = ()) -> int:
        """Bytes in an ONNX file (`stored_bytes`), leaving out the arrays named in `without`."""
        return stored_bytes(a for key, a in self.arrays.items() if key not in without)


_PACKED_BITS = {np.dtype(ml_dtypes.uint2): 2, np.dtype(ml_dtypes.int2): 2, np.dtype(ml_dtypes.uint4): 4,
                np.dtype(ml_dtypes.int4): 4}


def stored_bytes(arrays) -> int:
    """Bytes of tensors as ONNX stores them: 2- and 4-bit types packed (4 or 2 elements a byte, per tensor)."""
    return sum(-(-a.size * _PACKED_BITS.get(a.dtype, 8 * a.dtype.itemsize) // 8) for a in arrays)


def dequantize_arrays(weight: QuantizedWeight) -> Stored:
    """DequantizeLinear's inputs (q, scale, zero_point) and attributes for a quantized weight: per column 1-D
    scales along the output axis, else blocked along the input axis. Symmetric: signed codes, no zero point."""
    if weight.block is None:
        scales, zero_points, attributes = weight.scales.reshape(-1), weight.zero_points.reshape(-1), {"axis": 1}
    else:
        scales, zero_points, attributes = weight.scales, weight.zero_points, {"axis": 0, "block_size": weight.block}
    if weight.symmetric:
        signed = weight.codes.astype(np.int16) - (1 << (weight.bits - 1))
        return Stored({"q": signed.astype(SIGNED_DTYPES[weight.bits]), "scale": scales}, attributes)
    dtype = STORAGE_DTYPES[weight.bits]
    return Stored({"q": weight.codes.astype(dtype), "scale": scales, "zero_point": zero_points.astype(dtype)},
                  attributes)


def decode_dequantize(stored: Stored) -> np.ndarray:
    """numpy reference of DequantizeLinear [K, N] as `dequantize_arrays` writes it: (q - zero_point) * scale in
    float32, the executor's order."""
    q, scale = stored.arrays["q"], stored.arrays["scale"]
    zero_point = stored.arrays.get("zero_point", np.zeros(scale.shape, np.int32))
    block = stored.attributes.get("block_size", 0)
    if block:
        scale, zero_point = (np.repeat(a, block, axis=0)[: q.shape[0]] for a in (scale, zero_point))
    else:
        scale, zero_point = scale.reshape(1, -1), zero_point.reshape(1, -1)
    codes = q.astype(np.int32) - zero_point.astype(np.int32)
    return codes.astype(np.float32) * scale.astype(np.float32)


# A Conv weight [Cout, Cin, kh, kw] is the site W [K = kh kw Cin, N = Cout] with its rows tap-major (each tap's Cin
# input channels in one run, the order of the patches the calibration takes), so that a block of input rows is a
# block of input channels at one tap: DequantizeLinear blocks axis 1 of the 4-D codes directly, scales
# [Cout, ceil(Cin / block), kh, kw] (per output channel: [Cout] along axis 0). Whole blocks of channels per tap
# unless the kernel is 1x1 (then the last block may be short, as for a MatMul).


def conv_weight(matrix: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """W [kh kw Cin, Cout] (rows tap-major) -> the Conv weight [Cout, Cin, kh, kw]; any per-row array likewise."""
    kh, kw = kernel
    return matrix.reshape(kh, kw, -1, matrix.shape[1]).transpose(3, 2, 0, 1)


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """The Conv weight [Cout, Cin, kh, kw] -> W [kh kw Cin, Cout], rows tap-major (inverse of `conv_weight`)."""
    return weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])


def conv_accepts(shape: tuple[int, int], block: int | None = 32, kernel: tuple[int, int] = (1, 1), **settings) -> bool:
    """Whether DequantizeLinear can block a Conv weight of kernel `kernel` as W [K, N] is blocked: K whole taps, and
    whole blocks of input channels per tap unless the kernel is 1x1 or the scales are per output channel."""
    taps = kernel[0] * kernel[1]
    return shape[0] % taps == 0 and (block is None or taps == 1 or shape[0] // taps % block == 0)


def conv_arrays(weight: QuantizedWeight, kernel: tuple[int, int]) -> Stored:
    """DequantizeLinear's inputs for a Conv weight of kernel `kernel` from its site's codes (`dequantize_arrays`
    laid out as [Cout, Cin, kh, kw]): blocked along axis 1, or per output channel along axis 0."""
    if not conv_accepts(weight.codes.shape, weight.block, kernel):
        raise ValueError(f"a {kernel[0]}x{kernel[1]} Conv weight of {weight.codes.shape[0]} input rows cannot be cut "
                         f"into blocks of {weight.block} input channels per tap")
    stored = dequantize_arrays(weight)
    if weight.block is None:
        return Stored({"q": conv_weight(stored.arrays["q"], kernel), **{k: a for k, a in stored.arrays.items()
                                                                         if k != "q"}}, {"axis": 0})
    return Stored({k: np.ascontiguousarray(conv_weight(a, kernel)) for k, a in stored.arrays.items()},
                  {"axis": 1, "block_size": weight.block})


def decode_conv(stored: Stored) -> np.ndarray:
    """numpy reference of DequantizeLinear over `conv_arrays`' arrays, as the site's W [kh kw Cin, Cout] float32."""
    block = stored.attributes.get("block_size")
    arrays = {k: conv_matrix(a) if a.ndim == 4 else a for k, a in stored.arrays.items()}
    return decode_dequantize(Stored(arrays, {"axis": 0, "block_size": block} if block else {"axis": 1}))


# GatherBlockQuantized (onnxruntime's com.microsoft domain) reads an embedding table E [V, D] kept packed: a row
# per token, `bits`-bit codes packed low bits first into bytes along D, a scale (and a packed zero point) per
# block of `block_size` entries of the row (a power of two >= 16; the last block may be short). As a weight
# site the table is W = E^T [K = D, N = V]: the same blocks of input rows per column as DequantizeLinear's.
CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops: GatherBlockQuantized, MatMulNBits
GATHER_MIN_BLOCK = 16
MATMUL_NBITS_ACCURACY = 4  # int8 activations: what onnxruntime gives the MatMulNBits it fuses from DequantizeLinear


def gather_block(rows: int, block: int | None) -> int:
    """GatherBlockQuantized's block size for a table of rows of `rows` entries: `block`, or for one scale a row
    (None) the smallest power of two >= rows (the last block may be short)."""
    return block if block is not None else max(GATHER_MIN_BLOCK, 1 << (rows - 1).bit_length())


def gather_accepts(shape: tuple[int, int], bits: int) -> bool:
    """Whether a table's rows fill whole bytes (onnxruntime unpacks rows of whole bytes only)."""
    return shape[0] * bits % 8 == 0


def tied_accepts(shape: tuple[int, int], block: int | None) -> bool:
    """Whether onnxruntime's MatMulNBits can read a table's GatherBlockQuantized codes as a tied head's weight:
    in the table's blocks (`gather_block`), whole ones (its rows of bytes are read as [blocks, block bytes])."""
    size = gather_block(shape[0], block)
    return matmul_nbits_accepts(shape, size) and shape[0] % size == 0


TIED_EXTRA_BYTES = 24  # the int64 [V, blocks, block bytes] shape through which the head reads the table's codes


def pack_low_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [R, C] below 2^bits -> bytes [R, ceil(C bits / 8)], element 0 in the low bits (ONNX's uint4/uint2
    packing, row by row)."""
    per_byte = 8 // bits
    rows, cols = codes.shape
    padded = np.zeros((rows, -(-cols // per_byte) * per_byte), np.uint16)
    padded[:, :cols] = codes
    shifts = (bits * np.arange(per_byte)).astype(np.uint16)
    return (padded.reshape(rows, -1, per_byte) << shifts).sum(axis=-1).astype(np.uint8)


def unpack_low_bits(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of `pack_low_bits`: codes [R, cols] as uint8."""
    shifts = (bits * np.arange(8 // bits)).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols]


def _token_rows(weight: QuantizedWeight) -> dict[str, np.ndarray]:
    """The codes of W [K, N] as N rows of packed bytes along K, scales [N, blocks] and (unless symmetric) packed
    zero points [N, bytes]: the layout GatherBlockQuantized and MatMulNBits share."""
    arrays = {"data": pack_low_bits(weight.codes.T, weight.bits), "scales": np.ascontiguousarray(weight.scales.T)}
    if not weight.symmetric:
        arrays["zero_points"] = pack_low_bits(weight.zero_points.T, weight.bits)
    return arrays


def gather_arrays(weight: QuantizedWeight) -> Stored:
    """GatherBlockQuantized's constant inputs (data, scales[, zero_points]) and attributes for the table E = W^T of
    a quantized W [D, V]: per token row, codes packed along D, scales [V, blocks]. Symmetric: no zero points
    (the op's default is 2^(bits-1))."""
    rows, _ = weight.codes.shape
    if not gather_accepts(weight.codes.shape, weight.bits):
        raise ValueError(f"GatherBlockQuantized cannot hold rows of {rows} {weight.bits}-bit codes")
    block = gather_block(rows, weight.block)
    return Stored(_token_rows(weight), {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": weight.bits})


def matmul_nbits_accepts(shape: tuple[int, int], block: int | None) -> bool:
    """Whether MatMulNBits holds a weight [K, N]: blocks of K of a power of two >= 16 (the last one may be short:
    its codes are padded to a whole block, which the op never reads)."""
    return block is not None and block >= GATHER_MIN_BLOCK and block & (block - 1) == 0


def matmul_nbits_arrays(weight: QuantizedWeight) -> Stored:
    """MatMulNBits' constant inputs (B [N, blocks, block bytes], scales [N, blocks][, zero_points]) and attributes:
    the codes onnxruntime would fuse from DequantizeLinear, written as it holds them (no fusion at load: less
    memory). A short last block is padded with code 0."""
    rows, cols = weight.codes.shape
    whole = block_count(rows, weight.block) * weight.block if weight.block else rows
    padded = np.zeros((whole, cols), weight.codes.dtype)
    padded[:rows] = weight.codes
    arrays = _token_rows(replace(weight, codes=padded))
    shape, attributes = matmul_nbits_layout(weight.codes.shape, weight.bits, weight.block)
    return Stored({"B": arrays.pop("data").reshape(shape), **arrays}, attributes)


def matmul_nbits_layout(shape: tuple[int, int], bits: int, block: int | None) -> tuple[tuple[int, int, int], dict]:
    """MatMulNBits' view of W [K, N] in blocks of `block` rows: the shape of B [N, blocks, block bytes] (the rows of
    packed bytes `_token_rows` writes, cut into blocks) and the node's attributes."""
    rows, cols = shape
    if not matmul_nbits_accepts(shape, block):
        raise ValueError(f"MatMulNBits cannot hold {rows} rows in blocks of {block}")
    attributes = {"K": rows, "N": cols, "bits": bits, "block_size": block, "accuracy_level": MATMUL_NBITS_ACCURACY}
    return (cols, block_count(rows, block), block * bits // 8), attributes


def decode_matmul_nbits(stored: Stored) -> np.ndarray:
    """numpy reference of MatMulNBits' weight as `matmul_nbits_arrays` writes it: W [K, N] float32."""
    bits, block = stored.attributes["bits"], stored.attributes["block_size"]
    codes = stored.arrays["B"].reshape(stored.attributes["N"], -1)
    table = Stored({"data": codes, **{k: a for k, a in stored.arrays.items() if k != "B"}},
                   {"bits": bits, "block_size": block})
    return decode_gather(table)[: stored.attributes["K"]]


def decode_gather(stored: Stored) -> np.ndarray:
    """numpy reference of GatherBlockQuantized's table as `gather_arrays` writes it, as W = E^T [D, V] float32."""
    bits, block = stored.attributes["bits"], stored.attributes["block_size"]
    scales = stored.arrays["scales"]
    rows = min(stored.arrays["data"].shape[1] * 8 // bits, scales.shape[1] * block)
    codes = unpack_low_bits(stored.arrays["data"], bits, rows).astype(np.int32)
    if "zero_points" in stored.arrays:
        zero_points = unpack_low_bits(stored.arrays["zero_points"], bits, scales.shape[1]).astype(np.int32)
    else:
        zero_points = np.full(scales.shape, 1 << (bits - 1), np.int32)
    offsets = codes - np.repeat(zero_points, block, axis=1)[:, :rows]
    return (offsets.astype(np.float32) * np.repeat(scales.astype(np.float32), block, axis=1)[:, :rows]).T


# -- ternary ----------------------------------------------------------------------------------------------------
# w ~ alpha * t with t in {-1, 0, +1}, per output unit and block of input rows. For a vector w and support S the
# best scale is alpha = mean_S |w_i| and the error is ||w||^2 - (sum_S |w_i|)^2 / |S|, so the optimal support is
# the k largest |w_i| for the k that maximises (sum of the k largest)^2 / k: exact in O(n log n).
# `ai.symshrink.TernaryMatMul` holds the digits t + 1 of the weight [blocks * block, N] (zero-padded rows) in
# base `radix`, element 0 lowest; its body computes digits = (byte / radix^i) mod radix, W = (digits - 1) *
# scale of each block, y = x @ W[:K] (opset 10).

DIGITS_PER_BYTE = {4: 4, 3: 5}  # radix -> codes per byte (3**5 = 243 <= 256)
TERNARY_INPUTS = ("x", "packed", "scales", "blocks_shape", "matrix_shape", "count", "rows")
TERNARY_RADIXES = {"TernaryMatMul": 4, "TernaryMatMulBase3": 3}  # function name -> radix of its bytes


def ternary_function_name(radix: int) -> str:
    return "TernaryMatMul" if radix == 4 else f"TernaryMatMulBase{radix}"


@dataclass(frozen=True)
class Ternary:
    """codes [K, N] in {-1, 0, 1} (int8) and scales [ceil(K / block), N] for a weight [K, N] (x @ W)."""

    codes: np.ndarray
    scales: np.ndarray
    block: int | None  # None: one scale per column

    def dequantize(self) -> np.ndarray:
        return self.codes * expand_scales(self.scales, self.codes.shape[0], self.block)

    def quantized(self, scales: np.ndarray | None = None) -> QuantizedWeight:
        """As 2-bit codes t + 1 with zero point 1 (DequantizeLinear's form), with these `scales` (default: its own)."""
        scales = self.scales if scales is None else scales
        return QuantizedWeight((self.codes + 1).astype(np.uint8), scales, np.ones(scales.shape, np.uint8), self.block,
                               bits=2)


def ternary_scales(rows: np.ndarray) -> np.ndarray:
    """The optimal ternary scale of each column of rows [M, N] (`_ternarize_columns`): [N]."""
    return _ternarize_columns(np.asarray(rows, np.float64))[1]


def _ternarize_columns(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Optimal ternary fit of each column of blocks [g, M]: (codes [g, M], scales [M])."""
    magnitude = np.abs(blocks)
    order = np.argsort(-magnitude, axis=0, kind="stable")
    sorted_mag = np.take_along_axis(magnitude, order, axis=0)
    prefix = np.cumsum(sorted_mag, axis=0)
    counts = np.arange(1, blocks.shape[0] + 1)[:, None]
    best = np.argmax(prefix**2 / counts, axis=0)  # support size - 1 per column
    columns = np.arange(blocks.shape[1])
    scales = prefix[best, columns] / (best + 1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(blocks.shape[0])[:, None].repeat(blocks.shape[1], axis=1), axis=0)
    codes = np.where(rank <= best[None, :], np.sign(blocks), 0).astype(np.int8)
    scales = np.where(magnitude.max(axis=0) > 0, scales, 0.0)
    return codes, scales


def ternarize(weight: np.ndarray, block: int | None = None) -> Ternary:
    """Ternary codes of weight [K, N] with one scale per output column and block of `block` input rows
    (None: one block per column, i.e. per channel)."""
    blocks = split_blocks(weight, block)  # [blocks, size, N]
    count, size, cols = blocks.shape
    codes, scales = _ternarize_columns(blocks.transpose(1, 0, 2).reshape(size, count * cols))
    codes = codes.reshape(size, count, cols).transpose(1, 0, 2).reshape(count * size, cols)[: weight.shape[0]]
    return Ternary(codes, scales.reshape(count, cols).astype(weight.dtype), block)


def pack_codes(codes: np.ndarray, radix: int = 4) -> np.ndarray:
    """Flattened codes in {-1, 0, 1} -> bytes holding the digits t + 1 in base `radix`, element 0 lowest:
    radix 4 puts 4 codes in a byte (2 bits each, ONNX's uint2 packing), radix 3 puts 5 (1.6 bits)."""
    per_byte = DIGITS_PER_BYTE[radix]
    digits = (codes.reshape(-1).astype(np.int16) + 1).astype(np.uint16)
    digits = np.concatenate([digits, np.zeros(-len(digits) % per_byte, np.uint16)]).reshape(-1, per_byte)
    return (digits @ (radix ** np.arange(per_byte, dtype=np.uint16))).astype(np.uint8)


def unpack_codes(packed: np.ndarray, count: int, radix: int = 4) -> np.ndarray:
    """Inverse of `pack_codes`: the first `count` codes, as int8 in {-1, 0, 1}."""
    powers = radix ** np.arange(DIGITS_PER_BYTE[radix], dtype=np.int32)
    digits = (packed.astype(np.int32)[:, None] // powers[None, :]) % radix
    return digits.reshape(-1)[:count].astype(np.int8) - 1


def ternary_function_arrays(weight: QuantizedWeight, radix: int) -> Stored:
    """TernaryMatMul's constant inputs (all but x) for 2-bit codes t + 1: the digits of the rows padded to whole
    blocks (t = 0), scales [blocks, 1, N], and the int64 shapes its body reshapes and slices by."""
    rows, cols = weight.codes.shape
    block = rows if weight.block is None else weight.block
    blocks = weight.scales.shape[0]
    codes = np.ones((blocks * block, cols), np.int8)  # digit 1 = t 0 in the padding rows
    codes[:rows] = weight.codes
    return Stored({"packed": pack_codes(codes - 1, radix), "scales": weight.scales.reshape(blocks, 1, cols),
                   "blocks_shape": np.array([blocks, block, cols]), "matrix_shape": np.array([blocks * block, cols]),
                   "count": np.array([blocks * block * cols]), "rows": np.array([rows])})


def unpack_ternary_function(inputs: dict[str, np.ndarray], radix: int) -> Ternary:
    """The codes [K, N], scales [blocks, N] and block of a TernaryMatMul's constant inputs (`TERNARY_INPUTS`)."""
    blocks, block, cols = (int(v) for v in inputs["blocks_shape"])
    depth = int(inputs["rows"][0])
    count = blocks * block * cols
    if inputs["packed"].size * DIGITS_PER_BYTE[radix] < count:
        raise ValueError("TernaryMatMul: fewer packed codes than blocks_shape says")
    codes = unpack_codes(inputs["packed"], count, radix).reshape(blocks * block, cols)[:depth]
    return Ternary(codes, inputs["scales"].reshape(blocks, cols), block)


# -- hyperfunction codes ------------------------------------------------------------------------------------
# Hyper-Compression (Fan et al.): groups of `dims` weights coded as one index into a fixed codebook, in one
# arithmetic shared by the encoder, onnxruntime and the GPU kernel. A tensor is flattened into pairs p (dims = 2;
# the winding also takes 3), cut into groups with a centre c_g and a span L_g. Codeword j of a fixed table of
# offsets u_j (in units of L) and band k of K radial bands decode to  p' = c_g + L_g * (u_j * s_k),  all in
# float32, in that order. Codebooks:
# - lattice (v3, the official code): u_0 = 0 (the centre) and the sheared lattice of a rational winding of
#   slope m = ceil(sqrt(n)), u_{1+t} = (t / m^2, (t mod m) / m) - 1/2 for t < n; outside the square
#   |z|_inf <= 1/2 a pair is in band k >= 1 when |z|_2 <= r_k = 1/2 + k (R - 1/2) / K (R the farthest
#   pair), shrunk by s_k = 2 r_k into the disc, coded, expanded back. Index j + (n + 1) k.
# - winding (v1, the paper): u_t = frac(t a) - 1/2, a_j = 1 / ((pi + j) R), frac in 32-bit fixed point.
# - grid: round-to-nearest with M levels per weight (M^dims codewords): RTN at exactly the same bits.
# A pair costs ceil(log2(codes * (K + 1))) bits; indices are packed little-endian into a bit stream, in rows of
# eight indices (`bits` bytes a row). HyperDecode (one group: the tensor) and HyperDecodeGrouped (a centre and
# span per group, padding past the last element cut off) decode them in ONNX function bodies of stock ops
# (opset 13: integer MatMul): window = row @ weights, index = (window / shifts) mod 2^bits in int32, the table
# T[j + codes k] = offsets[j] * band_scales[k], the weight c + L * T[index].

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
        return hyper_side_bits(self.band_scales.size, len(self.spans), self.setting.dims)

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


def hyper_side_bits(bands: int, groups: int, dims: int) -> int:
    """float32 band scales, and a centre (dims values) and a span per group."""
    return 32 * (bands + groups * (dims + 1))


def hyper_pairs(flat: np.ndarray, dims: int, group: int | None) -> np.ndarray:
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


def encode_hyper(weight: np.ndarray, setting: HyperSetting) -> HyperCode:
    """Nearest codeword of every pair (with its radial band on the lattice)."""
    pairs = hyper_pairs(np.asarray(weight, np.float64).reshape(-1), setting.dims, setting.group)
    return encode_pairs(pairs, frame_of(pairs, setting), setting, tuple(np.shape(weight)))


def encode_pairs(pairs: np.ndarray, frame: Frame, setting: HyperSetting, shape: tuple[int, ...]) -> HyperCode:
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


def codebook_table(offsets: np.ndarray, band_scales: np.ndarray) -> np.ndarray:
    """The decoded table T[j + codes k] = u_j s_k, [codes (K + 1), dims] float32, as the ONNX bodies build it."""
    return (band_scales.reshape(-1, 1, 1) * offsets[None, :, :]).reshape(-1, offsets.shape[1]).astype(np.float32)


def _decode_groups(indices: np.ndarray, offsets: np.ndarray, band_scales: np.ndarray, centres: np.ndarray,
                   spans: np.ndarray) -> np.ndarray:
    """c_g + L_g * T[index] for centres [G, dims] and spans [G]: pairs [G, per group, dims] float32."""
    pairs = codebook_table(offsets, band_scales)[np.asarray(indices, np.int64)].reshape(len(spans), -1, offsets.shape[1])
    return centres.reshape(len(spans), 1, -1) + pairs * spans.reshape(-1, 1, 1)


def decode_values(code: HyperCode) -> np.ndarray:
    """The numpy reference of the decode: the table T[j + codes k] = u_j s_k, then c_g + L_g * T[index], in
    float32, the order of the ONNX body."""
    values = _decode_groups(code.indices, code.offsets, code.band_scales, code.centres, code.spans)
    return values.reshape(-1)[: code.count].reshape(code.shape)


HYPER_MAX_BITS = 16  # the widest index the decode's int32 window arithmetic takes
_UNPACK = ("packed", "byte_weights", "shifts", "modulus", "pairs")
_TABLE = ("offsets", "band_scales", "centres", "spans")
HYPER_INPUTS = {"HyperDecode": (*_UNPACK, *_TABLE, "shape"),
                "HyperDecodeGrouped": (*_UNPACK, *_TABLE, "layout", "count", "shape")}
HYPER_SHARED = ("byte_weights", "shifts", "modulus", "offsets")  # one copy per width or codebook serves every tensor


def hyper_function_name(grouped: bool) -> str:
    return "HyperDecodeGrouped" if grouped else "HyperDecode"


def is_grouped(code: HyperCode) -> bool:
    """The grouped function: several groups, or padding past the tensor's last element to cut off."""
    return len(code.spans) > 1 or len(code.indices) * code.setting.dims != code.count


def hyper_function_inputs(code: HyperCode) -> dict[str, np.ndarray]:
    """The function's input arrays for one code, by input name (`HYPER_INPUTS`). Inputs: packed uint8 [rows,
    bits]; byte_weights int32 [bits, 8]; shifts int32 [8]; modulus int32 []; pairs int64 [1]; offsets float
    [codes, dims]; band_scales float [K + 1]; per tensor centres float [1, dims] and spans float [1, 1], per group
    centres [G, 1, dims] and spans [G, 1, 1], layout int64 [3] = [G, pairs per group, dims] and count int64 [1];
    shape int64 [rank]."""
    if code.bits > HYPER_MAX_BITS:
        raise BadInput(f"{code.bits}-bit indices: at most {HYPER_MAX_BITS} bits per index can be decoded")
    groups, dims, grouped = len(code.spans), code.setting.dims, is_grouped(code)
    byte_weights, shifts, modulus = row_unpacking(code.bits)
    arrays = {"packed": code.packed(), "byte_weights": byte_weights, "shifts": shifts,
              "modulus": np.array(modulus, np.int32), "pairs": np.array([len(code.indices)], np.int64),
              "offsets": code.offsets, "band_scales": code.band_scales,
              "centres": code.centres.reshape(groups, 1, dims) if grouped else code.centres.reshape(1, dims),
              "spans": code.spans.reshape(groups, 1, 1) if grouped else code.spans.reshape(1, 1)}
    if grouped:
        arrays["layout"] = np.array([groups, len(code.indices) // groups, dims], np.int64)
        arrays["count"] = np.array([code.count], np.int64)
    arrays["shape"] = np.array(code.shape, np.int64)
    return arrays


def decode_hyper_inputs(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """numpy reference of HyperDecode(Grouped) on its inputs (`hyper_function_inputs`): the tensor, float32."""
    pairs = int(inputs["pairs"][0])
    index = cut_rows(inputs["packed"], inputs["byte_weights"], inputs["shifts"], int(inputs["modulus"])).reshape(-1)
    groups, dims = inputs["spans"].size, inputs["offsets"].shape[1]
    values = _decode_groups(index[:pairs], inputs["offsets"], inputs["band_scales"],
                            inputs["centres"].reshape(groups, dims), inputs["spans"].reshape(groups))
    count = int(inputs["count"][0]) if "count" in inputs else pairs * dims
    return values.reshape(-1)[:count].reshape(tuple(int(d) for d in inputs["shape"]))


# -- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A named bound on a format's round trip: ||W - decode(encode(W))|| / ||W|| <= relative_error for weights
    drawn i.i.d. from a normal distribution (the table's test draws them), at the row's reference settings."""

    name: str
    relative_error: float
    why: str


BUDGETS = {budget.name: budget for budget in (
    Budget("ternary", 0.46, "the optimal ternary fit of a Gaussian leaves about 0.43 of its norm, per block or column"),
    Budget("uint8-rtn", 0.01, "255 levels over a block's range (5-6 sd for up to a few hundred rows): sd / 160"),
    Budget("uint4-rtn", 0.15, "15 levels over a block's range, up to 7.5 sd for a column of 4096 rows: steps of 0.5 sd"),
    Budget("uint2-rtn", 0.70, "3 levels over a block's range: 0.41 for blocks of 32, 0.68 for a column of 4096 rows"),
    Budget("hyper-4bit", 0.17, "8-bit indices a pair (4 bits a weight): lattice n 63 K 3 in 4 sd, or a 16-level grid "
                               "in 8 sd (steps of 0.53 sd: 0.15)"),
)}


@dataclass(frozen=True)
class Format:
    """One stored format: how a float32 weight [K, N] (hyperfunction codes: any shape) is written and read.

    predict_bytes(shape, **settings): the bytes the weight's own arrays take in the ONNX file, scales, zero points,
    centres, spans and int64 shapes included, known before encoding; `shared` names the arrays that one copy
    serves for every tensor of the same width or codebook (counted once a model, not here). For hyperfunction
    codes it is exact when the bands are used (some pair lies outside the square), else an upper bound."""

    name: str
    nodes: str  # the ONNX nodes it emits
    op_type: str  # the node that reads the stored arrays
    domain: str  # its domain ("" for the standard ops)
    kernels: tuple[str, ...]  # `runtime.kernels.KERNELS` that read it compressed on the device (else: the executor)
    budget: Budget
    encode: Callable[..., Stored]  # (weight, **settings)
    decode: Callable[[Stored], np.ndarray]  # -> float32 weight
    predict_bytes: Callable[..., int]  # (shape, **settings)
    settings: tuple[dict, ...]  # reference settings: the first is the default; the budget holds for each
    shared: tuple[str, ...] = ()
    accepts: Callable[..., bool] = lambda shape, **settings: True  # (shape, **settings): whether it can hold it

    def bits_per_weight(self, shape: tuple[int, ...], **settings) -> float:
        return 8 * self.predict_bytes(shape, **settings) / max(math.prod(shape), 1)


def _quantized_bytes(shape: tuple[int, int], block: int | None, bits: int, symmetric: bool = False) -> int:
    """DequantizeLinear: codes and zero points (none when symmetric) of `bits` bits (packed per tensor), a float
    scale a block."""
    rows, cols = shape
    scales = block_count(rows, block) * cols
    return -(-rows * cols * bits // 8) + (0 if symmetric else -(-scales * bits // 8)) + 4 * scales


def _gather_bytes(shape: tuple[int, int], block: int | None, bits: int, symmetric: bool = False) -> int:
    """GatherBlockQuantized: a row of packed codes per token, a float scale (and a zero point of `bits` bits,
    packed per row) a block."""
    rows, cols = shape
    blocks = block_count(rows, gather_block(rows, block))
    return cols * (-(-rows * bits // 8) + 4 * blocks + (0 if symmetric else -(-blocks * bits // 8)))


def _matmul_nbits_bytes(shape: tuple[int, int], block: int | None, bits: int, symmetric: bool = False) -> int:
    """MatMulNBits: a row of packed codes per output column in whole blocks (the last one padded), a float scale
    (and a zero point of `bits` bits, packed per row) a block."""
    rows, cols = shape
    blocks = block_count(rows, block)
    return _gather_bytes((blocks * block, cols), block, bits, symmetric)


def _ternary_dequantize(weight: np.ndarray, block: int | None = 32) -> Stored:
    return dequantize_arrays(ternarize(weight, block).quantized())


def _ternary_function(radix: int) -> tuple[Callable[..., Stored], Callable[[Stored], np.ndarray], Callable[..., int]]:
    def encode(weight: np.ndarray, block: int | None = 32) -> Stored:
        return ternary_function_arrays(ternarize(weight, block).quantized(), radix)

    def decode(stored: Stored) -> np.ndarray:
        return unpack_ternary_function(stored.arrays, radix).dequantize().astype(np.float32)

    def nbytes(shape: tuple[int, int], block: int | None = 32) -> int:
        rows, cols = shape
        blocks, size = block_count(rows, block), rows if block is None else block
        return -(-blocks * size * cols // DIGITS_PER_BYTE[radix]) + 4 * blocks * cols + 8 * 7  # 7 int64 shape values

    return encode, decode, nbytes


def _hyper(grouped: bool) -> tuple[Callable[..., Stored], Callable[..., int]]:
    def encode(weight: np.ndarray, **settings) -> Stored:
        code = encode_hyper(weight, HyperSetting(**settings))
        if is_grouped(code) != grouped:
            raise ValueError(f"{np.shape(weight)} under {settings} is written as {hyper_function_name(is_grouped(code))}")
        return Stored(hyper_function_inputs(code))

    def nbytes(shape: tuple[int, ...], **settings) -> int:
        setting, count = HyperSetting(**settings), math.prod(shape)
        groups = 1 if setting.group is None else -(-count // setting.group)
        pairs = -(-count // setting.dims) if setting.group is None else groups * (setting.group // setting.dims)
        bands = setting.bands if setting.codebook == "lattice" else 0
        side = hyper_side_bits(bands + 1, groups, setting.dims) // 8  # band scales, centres, spans
        ints = 1 + len(shape) + (4 if grouped else 0)  # pairs, shape (and layout, count): int64
        return -(-pairs // INDICES_PER_ROW) * setting.index_bits() + side + 8 * ints

    return encode, nbytes


_TERNARY_SETTINGS = ({"block": 32}, {"block": None}, {"block": 64})
_GRID_SETTINGS = (*_TERNARY_SETTINGS, {"block": 16, "symmetric": True}, {"block": None, "symmetric": True})


def _encode_grid(arrays: Callable[[QuantizedWeight], Stored], bits: int, weight: np.ndarray, block: int | None = 32,
                 symmetric: bool = False) -> Stored:
    return arrays(quantize_grid(weight, block, bits, symmetric))


_CONV_SETTINGS = ({"block": 32, "kernel": (1, 1)}, {"block": None, "kernel": (3, 3)},
                  {"block": 16, "symmetric": True, "kernel": (3, 3)}, {"block": 16, "kernel": (2, 2)})


def _encode_conv(bits: int, weight: np.ndarray, block: int | None = 32, symmetric: bool = False,
                 kernel: tuple[int, int] = (1, 1)) -> Stored:
    return _encode_grid(partial(conv_arrays, kernel=kernel), bits, weight, block, symmetric)


def _conv_bytes(shape: tuple[int, int], bits: int, block: int | None = 32, symmetric: bool = False,
                kernel: tuple[int, int] = (1, 1)) -> int:
    return _quantized_bytes(shape, block, bits, symmetric)  # the same arrays as DequantizeLinear's, laid out 4-D


_HYPER_SETTINGS = ({"codebook": "lattice", "codes": 63, "bands": 3, "side": 4.0},
                   {"codebook": "grid", "codes": 16, "bands": 0, "side": 8.0})


def _rows() -> list[Format]:
    rows = [
        Format("ternary-dequantize", "DequantizeLinear (uint2, zero point 1, blocked or per column) -> MatMul",
               "DequantizeLinear", "", ("ternary_matmul",), BUDGETS["ternary"], _ternary_dequantize, decode_dequantize,
               lambda shape, block=32: _quantized_bytes(shape, block, 2), _TERNARY_SETTINGS),
    ]
    for bits in GRID_BITS:
        rows.append(Format(f"uint{bits}-dequantize", f"DequantizeLinear (uint{bits}, or int{bits} when symmetric; "
                           "blocked or per column) -> MatMul", "DequantizeLinear", "", (), BUDGETS[f"uint{bits}-rtn"],
                           partial(_encode_grid, dequantize_arrays, bits), decode_dequantize,
                           partial(_quantized_bytes, bits=bits), _GRID_SETTINGS))
        rows.append(Format(f"uint{bits}-matmulnbits", f"{CONTRIB_DOMAIN}.MatMulNBits (bits={bits}) in place of MatMul, "
                           "blocks of input rows, the last one padded",
                           "MatMulNBits", CONTRIB_DOMAIN, (), BUDGETS[f"uint{bits}-rtn"],
                           partial(_encode_grid, matmul_nbits_arrays, bits), decode_matmul_nbits,
                           partial(_matmul_nbits_bytes, bits=bits), _GRID_SETTINGS[:1] + _GRID_SETTINGS[2:4],
                           accepts=lambda shape, block=32, **settings: matmul_nbits_accepts(shape, block)))
        rows.append(Format(f"uint{bits}-conv", f"DequantizeLinear (uint{bits}, or int{bits} when symmetric; "
                           "[Cout, Cin, kh, kw], blocks of input channels per tap or per output channel) -> Conv",
                           "DequantizeLinear", "", (), BUDGETS[f"uint{bits}-rtn"], partial(_encode_conv, bits),
                           decode_conv, partial(_conv_bytes, bits=bits), _CONV_SETTINGS, accepts=conv_accepts))
        rows.append(Format(f"uint{bits}-gather", f"{CONTRIB_DOMAIN}.GatherBlockQuantized (bits={bits}) in place of "
                           "Gather, reading the table E = W^T", "GatherBlockQuantized", CONTRIB_DOMAIN, (),
                           BUDGETS[f"uint{bits}-rtn"], partial(_encode_grid, gather_arrays, bits), decode_gather,
                           partial(_gather_bytes, bits=bits), _GRID_SETTINGS,
                           accepts=lambda shape, bits=bits, **settings: gather_accepts(shape, bits)))
    for radix in (4, 3):
        encode, decode, nbytes = _ternary_function(radix)
        name = ternary_function_name(radix)
        rows.append(Format("ternary-function" + ("" if radix == 4 else f"-base{radix}"),
                           f"{FUNCTION_DOMAIN}.{name} ({8 / DIGITS_PER_BYTE[radix]:g} bits a code) in place of MatMul", name,
                           FUNCTION_DOMAIN, ("ternary_matmul",), BUDGETS["ternary"], encode, decode, nbytes,
                           _TERNARY_SETTINGS))
    for grouped in (False, True):
        encode, nbytes = _hyper(grouped)
        name = hyper_function_name(grouped)
        settings = tuple({**s, "group": 64} for s in _HYPER_SETTINGS) if grouped else _HYPER_SETTINGS
        rows.append(Format("hyper-grouped" if grouped else "hyper",
                           f"{FUNCTION_DOMAIN}.{name} -> MatMul, Gemm, Gather, Conv (through a Transpose)", name,
                           FUNCTION_DOMAIN, ("hyper_matmul", "hyper_matmul_t", "hyper_gather"), BUDGETS["hyper-4bit"],
                           encode, lambda stored: decode_hyper_inputs(stored.arrays), nbytes, settings, HYPER_SHARED))
    return rows


FORMATS: dict[str, Format] = {row.name: row for row in _rows()}
