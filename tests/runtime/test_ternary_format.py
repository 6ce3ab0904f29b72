"""Ternary numerics: the threshold is optimal (against brute force) and the 2-bit packing round-trips."""

import itertools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from symshrink.runtime.formats import pack_codes, ternarize, unpack_codes


def _brute_force_error(w: np.ndarray) -> float:
    best = float(np.sum(w**2))
    for pattern in itertools.product((-1, 0, 1), repeat=len(w)):
        t = np.array(pattern, dtype=np.float64)
        if not t.any():
            continue
        alpha = max(float(t @ w) / float(t @ t), 0.0)  # the best scale for this pattern
        best = min(best, float(np.sum((w - alpha * t) ** 2)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_threshold_and_scale_are_optimal(seed):
    w = np.random.default_rng(seed).standard_normal((7, 1)) * np.random.default_rng(seed + 10).uniform(0.1, 3.0)
    fit = ternarize(w)
    error = float(np.sum((w - fit.dequantize()) ** 2))
    assert error == pytest.approx(_brute_force_error(w[:, 0]), rel=1e-12, abs=1e-15)


def test_blocks_have_their_own_scales():
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_normal((32, 5)), 100 * rng.standard_normal((32, 5))])
    per_channel, blocked = ternarize(w), ternarize(w, block=32)
    assert blocked.scales.shape == (2, 5) and per_channel.scales.shape == (1, 5)
    assert np.all(blocked.scales[1] > 10 * blocked.scales[0])
    assert np.sum((w - blocked.dequantize()) ** 2) < np.sum((w - per_channel.dequantize()) ** 2)
    ragged = ternarize(w[:50], block=32)  # a last block shorter than the others
    assert ragged.codes.shape == (50, 5) and ragged.scales.shape == (2, 5)


def test_zero_columns_stay_zero():
    fit = ternarize(np.zeros((8, 3)))
    assert not fit.codes.any() and not fit.scales.any()


@pytest.mark.parametrize("count", [1, 3, 4, 5, 64, 1001])
def test_packing_round_trips_and_matches_onnx_uint2_order(count):
    codes = np.random.default_rng(count).integers(-1, 2, count).astype(np.int8)
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and len(packed) == -(-count // 4)
    np.testing.assert_array_equal(unpack_codes(packed, count), codes)
    # the same bytes as onnx's own packing of a UINT2 tensor (what DequantizeLinear reads)
    reference = numpy_helper.from_array((codes + 1).astype(ml_dtypes.uint2))
    assert reference.data_type == onnx.TensorProto.UINT2
    assert bytes(packed) == reference.raw_data


@pytest.mark.parametrize("count", [1, 4, 5, 6, 999, 1000, 1001])
def test_base3_packing_holds_five_codes_per_byte_and_round_trips(count):
    codes = np.random.default_rng(count).integers(-1, 2, count).astype(np.int8)
    packed = pack_codes(codes, radix=3)
    assert packed.dtype == np.uint8 and len(packed) == -(-count // 5) and packed.max() <= 242
    np.testing.assert_array_equal(unpack_codes(packed, count, radix=3), codes)


def test_uint2_dequantize_linear_becomes_a_2bit_matmul_in_onnxruntime(tmp_path):
    # the storage issue 5 builds on: DequantizeLinear(uint2 codes, blocked scales, zero point 1) -> MatMul at
    # opset 25 is fused by onnxruntime into MatMulNBits with 2-bit weights, so they stay 2-bit in memory
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper  # noqa: PLC0415

    k, n, block = 256, 128, 64
    rng = np.random.default_rng(0)
    fit = ternarize(rng.standard_normal((k, n)).astype(np.float32), block)
    initializers = [numpy_helper.from_array((fit.codes + 1).astype(ml_dtypes.uint2), "W_q"),
                    numpy_helper.from_array(fit.scales.astype(np.float32), "W_s"),
                    numpy_helper.from_array(np.ones(fit.scales.shape, ml_dtypes.uint2), "W_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["W_q", "W_s", "W_zp"], ["W"], axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "ternary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "t.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((4, k)).astype(np.float32)
    reference = x @ fit.dequantize().astype(np.float32)
    y = session.run(None, {"x": x})[0]
    # onnxruntime 1.32 computes it with int8-quantized activations: measured rel. error 0.006 at 1024 x 1024
    assert np.linalg.norm(y - reference) / np.linalg.norm(reference) < 0.02
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert [node.op_type for node in optimized.graph.node] == ["MatMulNBits"]
    packed = next(i for i in optimized.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 3)
    assert int(np.prod(packed.dims)) * 4 == k * n  # 2 bits per weight
