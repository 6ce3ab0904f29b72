"""The kernels of the GPU runtime: numpy references against brute-force dense products, the CUDA source
compiled for sm_90 (nvcc) and run over an emulated grid on the CPU (g++), and on a GPU when there is one."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from symshrink.passes.hyper.function import function_inputs
from symshrink.runtime.backend import cuda_backend, gpu_available
from symshrink.runtime.formats import (
    HyperSetting,
    decode_matmul_nbits,
    decode_values,
    matmul_nbits_arrays,
    pack_codes,
    quantize_grid,
)
from symshrink.runtime.formats import encode_hyper as encode
from symshrink.runtime.kernels import KERNELS, grid, hyper, ternary
from symshrink.runtime.kernels.launch import (
    CUDA_SOURCES,
    GEOMETRY,
    NVRTC_OPTIONS,
    TILE_ROWS,
    cuda_code,
    cuda_source,
    launch_config,
    sliced_matmul,
)
from tests.runtime.cuda_emulation import compiler, host_launcher
from tests.runtime.strict_device import strict_backend

BUDGETS = {"ternary_matmul": grid.ERROR_BUDGET, "hyper_matmul": hyper.ERROR_BUDGET,
           "hyper_matmul_t": hyper.ERROR_BUDGET, **dict.fromkeys(grid.GRID_KERNELS.values(), grid.ERROR_BUDGET)}
# (rows of x, depth, columns, ternary scale block): batch 1 and a few rows, ragged depths and blocks
SHAPES = [(1, 64, 32, 64), (3, 100, 48, 32), (5, 257, 16, 7), (9, 48, 80, 48)]


def _ternary_case(rows_x: int, depth: int, cols: int, block: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(depth, cols)).astype(np.int8)
    scales = rng.uniform(0.5, 2.0, size=(-(-depth // block), cols)).astype(np.float32)
    dense = codes.astype(np.float64) * np.repeat(scales, block, axis=0)[:depth]
    x = rng.standard_normal((rows_x, depth)).astype(np.float32)
    return x, ternary.ternary_weight(codes, scales, block), dense


def _hyper_case(rows_x: int, depth: int, cols: int, bits: int, transposed: bool = False, group: int | None = None,
                seed: int = 0):
    """x [rows_x, depth] @ W: W [depth, cols] coded as it is, or W^T coded ([cols, depth]) for the transposed
    kernel, per tensor or with a centre and span per `group` weights; the dense float64 product's W."""
    rng = np.random.default_rng(seed)
    tensor = rng.standard_normal((cols, depth) if transposed else (depth, cols)).astype(np.float32)
    tensor *= np.linspace(0.2, 3.0, tensor.size, dtype=np.float32).reshape(tensor.shape)  # groups differ
    code = encode(tensor, HyperSetting(codebook="lattice", codes=(1 << bits) - 1, bands=0, group=group))
    weight = hyper.function_weight(function_inputs(code))
    x = rng.standard_normal((rows_x, depth)).astype(np.float32)
    dense = decode_values(code).astype(np.float64)
    return x, weight, dense.T if transposed else dense


def _grid_case(rows_x: int, depth: int, cols: int, bits: int, block: int, symmetric: bool, seed: int = 0):
    """x and a MatMulNBits weight (blocks of `block` rows; its last block short when the depth is not whole blocks)
    in the kernel's layout, and the dense float64 weight onnxruntime's layout stands for."""
    rng = np.random.default_rng(seed)
    stored = matmul_nbits_arrays(quantize_grid(rng.standard_normal((depth, cols)).astype(np.float32), block, bits,
                                               symmetric))
    weight = grid.matmul_nbits_weight(stored.arrays["B"], stored.arrays["scales"], stored.arrays.get("zero_points"),
                                      depth, cols, bits, block)
    x = rng.standard_normal((rows_x, depth)).astype(np.float32)
    return x, weight, decode_matmul_nbits(stored).astype(np.float64)


def _cases():
    for bits, symmetric, (rows_x, depth, cols, block) in [(2, False, (1, 64, 32, 16)), (2, True, (3, 100, 48, 32)),
                                                          (4, False, (5, 257, 17, 32)), (4, True, (1, 96, 8, 64)),
                                                          (8, False, (9, 48, 80, 16)), (8, True, (4, 130, 6, 128))]:
        yield pytest.param(f"grid_matmul_b{bits}", *_grid_case(rows_x, depth, cols, bits, block, symmetric),
                           id=f"grid-{bits}bit{'-sym' if symmetric else ''}-{rows_x}x{depth}x{cols}b{block}")
    for rows_x, depth, cols, block in SHAPES:
        yield pytest.param("ternary_matmul", *_ternary_case(rows_x, depth, cols, block),
                           id=f"ternary-{rows_x}x{depth}x{cols}b{block}")
    for bits in (3, 5, 8, 11, 16):  # 5 and 11 bits make indices straddle bytes and the 64-bit halves
        rows_x, depth, cols, _ = SHAPES[bits % len(SHAPES)]
        yield pytest.param("hyper_matmul", *_hyper_case(rows_x, depth, cols, bits), id=f"hyper-{bits}bits-{depth}x{cols}")
    # depth a multiple of 16; 130 columns: two blocks of threads across the columns, for each tile of rows
    for bits, (rows_x, depth, cols) in zip((5, 11, 16, 7), [(1, 64, 40), (6, 48, 33), (9, 272, 5), (6, 32, 130)]):
        yield pytest.param("hyper_matmul_t", *_hyper_case(rows_x, depth, cols, bits, transposed=True),
                           id=f"hyper-t-{bits}bits-{depth}x{cols}")
    for kernel, group, (rows_x, depth, cols) in [("hyper_matmul", 64, (3, 40, 48)), ("hyper_matmul", 256, (1, 70, 32)),
                                                   ("hyper_matmul_t", 32, (5, 48, 20))]:  # groups of 2-8 packed rows
        yield pytest.param(kernel, *_hyper_case(rows_x, depth, cols, 9, kernel == "hyper_matmul_t", group),
                           id=f"{kernel}-g{group}-{depth}x{cols}")


CASES = list(_cases())


def _within_budget(kernel: str, x: np.ndarray, dense: np.ndarray, y) -> None:
    exact = x.astype(np.float64) @ dense
    bound = np.abs(x.astype(np.float64)) @ np.abs(dense)
    excess = np.abs(np.asarray(y, np.float64) - exact) - BUDGETS[kernel] * bound
    assert y.shape == exact.shape and y.dtype == np.float32
    assert excess.max() <= 0, f"{kernel}: error exceeds the budget by {excess.max():.3g}"


@pytest.mark.parametrize(("kernel", "x", "weight", "dense"), CASES)
def test_reference_matches_dense_product(kernel, x, weight, dense):
    _within_budget(kernel, x, dense, KERNELS[kernel].reference(x, weight))


def test_ternary_layout_round_trip():
    x, weight, dense = _ternary_case(2, 70, 37, 16)
    assert weight.words.shape == (70, 3)  # 37 columns padded to 48: three words a row
    np.testing.assert_array_equal(grid.dense_grid(weight), dense.astype(np.float32))


def test_grid_decodes_as_device_array_code():
    """`dense_grid` on a stand-in device (host arrays refused, as CuPy does): the numpy decode, bit for bit."""
    backend = strict_backend()
    for _, weight, _ in (_grid_case(3, 100, 37, 4, 32, False), _ternary_case(2, 70, 37, 16)):
        on_device = grid.dense_grid(weight.to(backend, {}), backend.xp)
        np.testing.assert_array_equal(backend.to_host(on_device), grid.dense_grid(weight))


def test_ternary_function_inputs_give_the_same_weight():
    """TernaryMatMul's base-3 and base-4 packed inputs decode to the layout built from the codes."""
    _, weight, dense = _ternary_case(1, 40, 24, 16)
    codes = np.rint(dense / np.repeat(weight.scales[:, :24], 16, axis=0)[:40]).astype(np.int8)
    padded = np.zeros((48, 24), np.int8)
    padded[:40] = codes
    for radix in (3, 4):
        inputs = {"packed": pack_codes(padded, radix), "scales": weight.scales[:, None, :24],
                  "blocks_shape": np.array([3, 16, 24]), "matrix_shape": np.array([48, 24]),
                  "count": np.array([48 * 24]), "rows": np.array([40])}
        np.testing.assert_array_equal(grid.dense_grid(ternary.function_weight(inputs, radix)),
                                      dense.astype(np.float32))


def test_launch_config_fills_the_device_and_covers_the_depth():
    config = launch_config(rows_x=1, depth=4096, workers=256, target_blocks=528)
    assert config.grid[0] * config.grid[1] * config.grid[2] >= 264
    assert config.rows_per_slice * config.slices >= 4096 > config.rows_per_slice * (config.slices - 1)
    assert launch_config(rows_x=33, depth=16, workers=1, target_blocks=528).grid == (9, 1, 1)  # tiles of 4 rows
    assert launch_config(rows_x=1, depth=16, workers=1, target_blocks=1).tile == 1
    huge = launch_config(rows_x=32 * 8192, depth=576, workers=192, target_blocks=528)  # a long batch of tokens
    assert max(huge.grid[1:]) <= 65535 and huge.grid[0] < 2**31
    assert launch_config(rows_x=1, depth=4000, workers=3, target_blocks=528, depth_step=16).rows_per_slice % 16 == 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("kernel", sorted(CUDA_SOURCES))
def test_cuda_source_compiles_for_sm90(kernel, tmp_path):
    result = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", str(cuda_source(kernel)), "-o", str(tmp_path / "out.ptx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ptx = (tmp_path / "out.ptx").read_text()
    assert all(f".entry {kernel}_m{tile}(" in ptx for tile in TILE_ROWS)


def _nvrtc():
    """CuPy's NVRTC binding, when the library loads (the nvidia-cuda-nvrtc wheel; no GPU needed)."""
    try:
        from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415

        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 (no CuPy, or no libnvrtc: the test is skipped)
        return None
    return nvrtc


@pytest.mark.skipif(_nvrtc() is None, reason="CuPy's NVRTC library is not loadable")
@pytest.mark.parametrize("kernel", sorted(CUDA_SOURCES))
def test_cuda_code_compiles_with_nvrtc_as_cupy_does(kernel):
    """The exact text and options CuPy's RawModule gets (headers pasted in), with the -ftz=true CuPy adds."""
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(cuda_code(kernel), f"{kernel}.cu", [], [])
    try:
        nvrtc.compileProgram(program, [*NVRTC_OPTIONS, "-ftz=true", "--gpu-architecture=compute_90"])
        ptx = nvrtc.getPTX(program).decode()
    finally:
        nvrtc.destroyProgram(program)
    assert all(f".entry {kernel}_m{tile}(" in ptx for tile in TILE_ROWS)


@pytest.mark.skipif(compiler() is None, reason="g++ is not installed")
@pytest.mark.parametrize(("kernel", "x", "weight", "dense"), CASES)
@pytest.mark.parametrize("target_blocks", [1, 528])  # one slice, and the depth cut into many slices
def test_cuda_source_on_emulated_grid(kernel, x, weight, dense, target_blocks, tmp_path):
    """The kernel's own source, every thread run in turn on the CPU, through the launcher's slicing."""
    codes = weight.arrays()
    depth, cols = x.shape[1], dense.shape[1]
    launched = weight.kernel if isinstance(weight, grid.GridWeight) else kernel  # ternary: the 2-bit grid's
    workers = -(-cols // GEOMETRY[launched].columns)  # the columns a thread owns: 1, 16, or a word's codes
    y = sliced_matmul(np, host_launcher(tmp_path), launched, x, codes, depth, workers, weight.format_ints(),
                      target_blocks)
    _within_budget(kernel, x, dense, y[:, : dense.shape[1]])


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU (cupy.cuda.is_available() is False)")
@pytest.mark.parametrize(("kernel", "x", "weight", "dense"), CASES)
def test_cuda_kernel_on_gpu(kernel, x, weight, dense):
    backend = cuda_backend()
    y = KERNELS[kernel].cuda(backend.to_device(x), weight.to(backend, {}))
    _within_budget(kernel, x, dense, backend.to_host(y))
