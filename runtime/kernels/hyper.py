"""Hyperfunction-coded matmul with the indices kept packed on the device: y = x @ W, each pair
(W[r, c], W[r, c + 1]) = centre + T[index] * span, T[j + codes k] = u_j s_k the codebook's pairs (shared by
every tensor of one codebook on the device), float32 in the ONNX body's order: the weights are onnxruntime's
bit for bit (on a GPU up to denormals, which CuPy's -ftz=true flushes to zero).

Fused for `HyperDecode` (per tensor) and `HyperDecodeGrouped` (centre and span per group of a multiple of 8
pairs) coding pairs of a W [R, C] with C a multiple of 16: a row of eight indices is then 16 consecutive
elements of one weight row, in one group, and the packed rows are used as they are. Readers:
x @ W (`hyper_matmul`), x @ W^T (`hyper_matmul_t`: a Transpose before the MatMul, as a tied LM head reads
the embedding table, or Gemm with transB), and W[indices] (`hyper_gather`, Gather on axis 0, decoding only
the rows gathered; array code that runs as it is on numpy or CuPy arrays). Each CUDA kernel has its numpy
reference with the same signature.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache

import numpy as np

from symshrink.runtime.formats import INDICES_PER_ROW, codebook_table, cut_rows, row_unpacking, unpack_rows
from symshrink.runtime.kernels.launch import COLUMNS_PER_THREAD, DeviceWeight, cuda_matmul

__all__ = ["HyperWeight", "function_weight", "fusable", "dense_hyper", "hyper_matmul_reference", "hyper_matmul_cuda",
           "hyper_matmul_t_reference", "hyper_matmul_t_cuda", "hyper_gather", "ERROR_BUDGET"]

# |y - y_exact| <= ERROR_BUDGET * (|x| @ |W|): float32 sums over the depth, in any order the kernel splits it
ERROR_BUDGET = 1e-5
PAIR = 2


@dataclass(frozen=True)
class HyperWeight(DeviceWeight):
    packed: np.ndarray  # uint8 [R * C / 16, bits]: rows of eight indices, pair p = (r C + c) / 2
    table: np.ndarray  # float32 [entries, 2]: the codebook's pairs T
    frames: np.ndarray  # float32 [groups, 3]: each group's centre (x, y) and span
    rows_per_frame: int  # packed rows a group (the tensor's for one group)
    bits: int
    rows: int  # R
    cols: int  # C, a multiple of 16

    def arrays(self) -> list:
        return [self.packed, self.table, self.frames]

    def format_ints(self) -> tuple[int, ...]:
        """The kernels' integer arguments after the shapes."""
        return self.bits, self.rows_per_frame

    def to(self, backend, tables: dict) -> HyperWeight:
        """On the backend's device; the codebook table shared with the other weights in `tables`."""
        key = (self.table.shape, self.table.tobytes())
        if key not in tables:
            tables[key] = backend.to_device(self.table)
        return HyperWeight(backend.to_device(self.packed), tables[key], backend.to_device(self.frames),
                           self.rows_per_frame, self.bits, self.rows, self.cols)


def _decode(weight: HyperWeight, packed_rows, indices):
    """centre + T[indices] * span for indices [n, 8] cut from packed rows [n]: pairs [n, 8, 2], in the ONNX
    body's rounding."""
    frames = weight.frames[packed_rows // weight.rows_per_frame][:, None, :]
    return frames[..., :PAIR] + weight.table[indices] * frames[..., PAIR:]


def fusable(inputs: dict[str, np.ndarray]) -> str | None:
    """Why a HyperDecode(Grouped) cannot feed the kernels (None: it can)."""
    shape = [int(v) for v in inputs["shape"]]
    if inputs["offsets"].shape[1] != PAIR:
        return "the kernels decode pairs, not triples"
    if len(shape) != 2 or shape[1] % COLUMNS_PER_THREAD:
        return f"the kernels need a [R, C] weight with C a multiple of {COLUMNS_PER_THREAD}; it is {shape}"
    if "layout" in inputs and int(inputs["layout"][1]) % INDICES_PER_ROW:
        return f"groups of {int(inputs['layout'][1])} pairs split rows of {INDICES_PER_ROW} indices"
    return None


def function_weight(inputs: dict[str, np.ndarray]) -> HyperWeight:
    """The weight of a HyperDecode or HyperDecodeGrouped node from its constant inputs (`formats.HYPER_INPUTS`;
    the grouped form's padding past the last element lies past the last row, where no kernel reads)."""
    rows, cols = (int(v) for v in inputs["shape"])
    packed_rows, bits = inputs["packed"].shape
    if packed_rows * INDICES_PER_ROW * PAIR < rows * cols:
        raise ValueError("HyperDecode: fewer packed indices than the shape needs")
    groups = inputs["spans"].size
    frames = np.concatenate([inputs["centres"].reshape(groups, PAIR), inputs["spans"].reshape(groups, 1)], axis=1)
    rows_per_frame = int(inputs["layout"][1]) // INDICES_PER_ROW if "layout" in inputs else packed_rows
    table = codebook_table(inputs["offsets"], inputs["band_scales"])
    return HyperWeight(np.ascontiguousarray(inputs["packed"]), table, frames.astype(np.float32), rows_per_frame, bits,
                       rows, cols)


def dense_hyper(weight: HyperWeight) -> np.ndarray:
    """The float32 weight [R, C] (numpy)."""
    used_rows = weight.rows * weight.cols // (INDICES_PER_ROW * PAIR)
    indices = unpack_rows(weight.packed[:used_rows], weight.bits, used_rows * INDICES_PER_ROW)
    pairs = _decode(weight, np.arange(used_rows), indices.reshape(used_rows, INDICES_PER_ROW))
    return pairs.reshape(weight.rows, weight.cols)


def hyper_matmul_reference(x: np.ndarray, weight: HyperWeight) -> np.ndarray:
    """numpy reference of the kernel: the indices cut from their rows, the pairs gathered, then x @ W."""
    return np.asarray(x, np.float32) @ dense_hyper(weight)


def hyper_matmul_t_reference(x: np.ndarray, weight: HyperWeight) -> np.ndarray:
    """numpy reference of the transposed kernel: x @ W^T."""
    return np.asarray(x, np.float32) @ dense_hyper(weight).T


@cache
def _unpacking(xp, bits: int) -> tuple:
    """`row_unpacking(bits)` as arrays of `xp` (made once per namespace and width)."""
    byte_weights, shifts, modulus = row_unpacking(bits)
    return xp.asarray(byte_weights), xp.asarray(shifts), modulus


def hyper_gather(indices, weight: HyperWeight):
    """W[indices] (Gather on axis 0, negative indices from the end), decoding only the rows it reads."""
    xp = np if isinstance(indices, np.ndarray) else sys.modules["cupy"]
    per_row = weight.cols // COLUMNS_PER_THREAD  # packed rows of eight indices a weight row
    rows = xp.asarray(indices, dtype=xp.int64)
    rows = xp.where(rows < 0, rows + weight.rows, rows)  # as Gather: negative ids count from the end
    packed_rows = (rows.reshape(-1, 1) * per_row + xp.arange(per_row)).reshape(-1)
    index = cut_rows(weight.packed[packed_rows], *_unpacking(xp, weight.bits))
    return _decode(weight, packed_rows, index).reshape(*rows.shape, weight.cols)


def hyper_matmul_cuda(x, weight: HyperWeight):
    """The CUDA kernel on CuPy arrays (weight on the device: `weight.to(backend, {})`)."""
    return cuda_matmul("hyper_matmul", x, weight, weight.rows, weight.cols // COLUMNS_PER_THREAD)


def hyper_matmul_t_cuda(x, weight: HyperWeight):
    """The transposed CUDA kernel on CuPy arrays: x [..., C] @ W^T -> [..., R]."""
    return cuda_matmul("hyper_matmul_t", x, weight, weight.cols, weight.rows)
