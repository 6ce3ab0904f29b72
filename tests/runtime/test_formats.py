"""The table of stored formats: every row's round trip within its named budget, its bytes as predicted, its
decode deterministic (llama.cpp's test-quantize-fns is the model); every format the passes write has a row;
the runtime imports nothing from the passes."""

import ast
import copy
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.passes.hyper import function as hyper_function
from symshrink.passes.ternary import function as ternary_function
from symshrink.passes.ternary.codes import STORAGES
from symshrink.runtime.executor import Executor
from symshrink.runtime.formats import FORMATS, FUNCTION_DOMAIN, HYPER_INPUTS, TERNARY_INPUTS, relative_error
from symshrink.runtime.kernels import KERNELS
from symshrink.runtime.ops import OPS, op_key

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(64, 32), (130, 24), (96, 48), (288, 16)]  # whole blocks, a ragged last block, per-column sizes that
# differ, and a 3x3 or 2x2 Conv's taps of 32 or 72 input channels
CASES = [(name, index) for name, row in FORMATS.items() for index in range(len(row.settings))]


def _stored_inputs(row, settings: dict) -> tuple[str, ...]:
    """The names of the inputs the row's node reads from the stored arrays, in order."""
    symmetric = settings.get("symmetric", False)
    if row.op_type == "DequantizeLinear":
        return ("q", "scale") if symmetric else ("q", "scale", "zero_point")
    if row.op_type in ("GatherBlockQuantized", "MatMulNBits"):
        data = "data" if row.op_type == "GatherBlockQuantized" else "B"
        return (data, "scales") if symmetric else (data, "scales", "zero_points")
    return HYPER_INPUTS[row.op_type] if row.op_type in HYPER_INPUTS else TERNARY_INPUTS[1:]


@pytest.mark.parametrize("name, index", CASES, ids=[f"{name}-{i}" for name, i in CASES])
def test_round_trip_within_budget_bytes_as_predicted_and_decode_deterministic(name, index):
    row = FORMATS[name]
    settings = row.settings[index]
    for seed, shape in enumerate(SHAPES):
        weight = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
        if not row.accepts(shape, **settings):
            with pytest.raises(ValueError):
                row.encode(weight, **settings)
            continue
        stored = row.encode(weight, **settings)
        assert tuple(stored.arrays) == _stored_inputs(row, settings)
        decoded = row.decode(stored)
        assert decoded.dtype == np.float32 and decoded.shape == weight.shape
        error = relative_error(weight, decoded)
        assert error <= row.budget.relative_error, f"{name} {settings} {shape}: {error:.4f} over {row.budget.name}"
        predicted = row.predict_bytes(shape, **settings)
        assert stored.nbytes(row.shared) == predicted
        assert row.bits_per_weight(shape, **settings) * weight.size / 8 == pytest.approx(predicted, rel=1e-12)
        again = row.decode(copy.deepcopy(stored))
        assert again.tobytes() == decoded.tobytes()
        recoded = row.encode(weight.copy(), **settings)
        assert all(recoded.arrays[k].tobytes() == a.tobytes() for k, a in stored.arrays.items())


def test_every_format_the_passes_write_has_a_row():
    for storage, radix in STORAGES.items():
        row = FORMATS[f"ternary-{storage}"]
        if radix is None:
            assert (row.domain, row.op_type) == ("", "DequantizeLinear")
        else:
            assert (row.domain, row.op_type) == (ternary_function.DOMAIN, ternary_function.function_name(radix))
    assert FORMATS["uint8-dequantize"].op_type == "DequantizeLinear"  # the 8-bit fallback of any storage
    hyper_rows = {(row.domain, row.op_type) for row in FORMATS.values()}
    for grouped in (False, True):
        assert (hyper_function.DOMAIN, hyper_function.function_name(grouped)) in hyper_rows
    for row in FORMATS.values():
        assert set(row.kernels) <= set(KERNELS), row.name
        assert op_key(row.domain, row.op_type) in OPS or row.domain == FUNCTION_DOMAIN, row.name
        assert row.budget.relative_error > 0 and row.settings


def test_runtime_imports_nothing_from_the_passes():
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[:2] == ["symshrink", "passes"] or n.split(".")[0] == "passes"]
    assert not offenders


# onnxruntime runs a fused DequantizeLinear -> MatMul as MatMulNBits with int8 activations (accuracy level 4):
# its products differ from the float32 reference by the activations' rounding, about 2^-8 of their range.
MATMUL_NBITS_TOLERANCE = 0.02  # relative L2 of x @ W against the reference's
GRID_CASES = [(name, index) for name, index in CASES if FORMATS[name].op_type in ("DequantizeLinear",
                                                                                    "GatherBlockQuantized",
                                                                                    "MatMulNBits")]


def _grid_model(row, stored, shape: tuple[int, int]):
    """The row's node over its stored arrays: GatherBlockQuantized looking up token ids, DequantizeLinear -> Conv
    over maps x [2, Cin, 5, 6], or DequantizeLinear -> MatMul over an activation x [.., K]."""
    rows, cols = shape
    initializers = [numpy_helper.from_array(a, name) for name, a in stored.arrays.items()]
    if row.op_type == "GatherBlockQuantized":
        nodes = [helper.make_node("GatherBlockQuantized", ["data", "ids", *list(stored.arrays)[1:]], ["y"],
                                  domain=row.domain, **stored.attributes)]
        feed = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid(row.domain, 1)]
    elif row.op_type == "MatMulNBits":
        nodes = [helper.make_node("MatMulNBits", ["x", *stored.arrays], ["y"], domain=row.domain, **stored.attributes)]
        feed = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, rows])
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid(row.domain, 1)]
    elif stored.arrays["q"].ndim == 4:
        nodes = [helper.make_node("DequantizeLinear", list(stored.arrays), ["w"], **stored.attributes),
                 helper.make_node("Conv", ["x", "w"], ["y"])]
        feed = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, stored.arrays["q"].shape[1], 5, 6])
        opsets = [helper.make_opsetid("", 25)]
    else:
        nodes = [helper.make_node("DequantizeLinear", list(stored.arrays), ["w"], **stored.attributes),
                 helper.make_node("MatMul", ["x", "w"], ["y"])]
        feed = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, rows])
        opsets = [helper.make_opsetid("", 25)]
    graph = helper.make_graph(nodes, row.name, [feed], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    return helper.make_model(graph, opset_imports=opsets)


def _conv_reference(x: np.ndarray, weight: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """Conv (no pads, stride 1) of maps x [n, Cin, h, w] by a site's W [kh kw Cin, Cout] (rows tap-major)."""
    windows = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))  # [n, Cin, ho, wo, kh, kw]
    patches = windows.transpose(0, 2, 3, 4, 5, 1).reshape(*windows.shape[:1], *windows.shape[2:4], -1)
    return (patches @ weight).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name, index", GRID_CASES, ids=[f"{name}-{i}" for name, i in GRID_CASES])
def test_onnxruntime_and_the_executor_read_the_grid_codes_as_the_reference_does(name, index):
    """GatherBlockQuantized rows give the reference's table rows exactly; MatMulNBits and DequantizeLinear -> MatMul
    (MatMulNBits in onnxruntime) give x @ W within MATMUL_NBITS_TOLERANCE, and the reference's numbers on the
    executor."""
    row, settings = FORMATS[name], FORMATS[name].settings[index]
    rng = np.random.default_rng(index)
    for shape in [s for s in SHAPES if row.accepts(s, **settings)]:
        weight = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        stored = row.encode(weight, **settings)
        reference = row.decode(stored)
        model = _grid_model(row, stored, shape)
        if row.op_type == "GatherBlockQuantized":
            feeds = {"ids": np.array([[0, shape[1] - 1, 5], [-1, 2, 2]], np.int64)}
            expected = reference.T[feeds["ids"]]
        elif "kernel" in settings:
            feeds = {"x": rng.standard_normal((2, shape[0] // np.prod(settings["kernel"]), 5, 6)).astype(np.float32)}
            expected = _conv_reference(feeds["x"], reference, settings["kernel"])
        else:
            feeds = {"x": rng.standard_normal((4, shape[0])).astype(np.float32)}
            expected = feeds["x"] @ reference
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        executed = Executor(ir.from_proto(model)).run(feeds)["y"]
        if row.op_type == "GatherBlockQuantized":
            np.testing.assert_array_equal(got, expected)
        else:
            assert relative_error(expected, got) <= MATMUL_NBITS_TOLERANCE, (name, settings, shape)
        np.testing.assert_allclose(executed, expected, rtol=1e-5, atol=1e-6)
