"""The Python API and the calibration sources: ModelProto in, ModelProto and report out; any sequence of complete
runs as calibration; bad arguments raise BadInput with a sentence."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import symshrink
from symshrink.calibration.feeds import load_feeds
from symshrink.cli import main
from symshrink.errors import BadInput
from symshrink.models.types import InputSpec
from symshrink.testing import assert_outputs_close
from tests.conftest import mlp_model

X = InputSpec("x", "float32", ("batch", 64))


def _model() -> onnx.ModelProto:
    return mlp_model(hidden=512, inputs=64, outputs=16)


def _feeds(n: int = 10, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(n)]


class Reader:
    """onnxruntime's CalibrationDataReader protocol: get_next() until None."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


@pytest.mark.parametrize("calibration", [_feeds(), Reader(_feeds()), (f for f in _feeds())], ids=["list", "reader", "generator"])
def test_compress_a_model_proto(calibration):
    model = _model()
    original = model.SerializeToString()
    small, report = symshrink.compress(model, calibration, method="ternary", min_cosine=0.0, progress=False)
    assert model.SerializeToString() == original  # the caller's proto is not modified
    onnx.checker.check_model(small)
    assert report.passed and report.bytes_after < 0.2 * report.bytes_before
    assert_outputs_close(model, small, _feeds(2, seed=5), max_rel_error=0.5)


def test_api_is_deterministic():
    a, _ = symshrink.compress(_model(), _feeds(), method="hyper", progress=False)
    b, _ = symshrink.compress(_model(), _feeds(), method="hyper", progress=False)
    assert a.SerializeToString() == b.SerializeToString()


def test_save_refuses_an_existing_file(tmp_path):
    small, _ = symshrink.compress(_model(), _feeds(), method="ternary", progress=False)
    path = symshrink.save(small, tmp_path / "small.onnx")
    with pytest.raises(BadInput, match="--force"):
        symshrink.save(small, path)
    symshrink.save(small, path, force=True)


def test_exclude_as_one_string_is_one_pattern():
    _, report = symshrink.compress(_model(), _feeds(), method="ternary", exclude="fc1", progress=False)
    assert [layer.node for layer in report.ternary.layers] == ["fc2"]


@pytest.mark.parametrize("model, calibration, options, message", [
    (3, None, {}, "not int"),
    ("MODEL", 42, {"method": "ternary"}, "not int"),
    ("MODEL", "FEEDS", {"keep": "half"}, "option keep"),
    ("MODEL", "FEEDS", {"method": "ternary", "nonsense": 1}, "unknown option nonsense"),
    ("MODEL", [[1, 2]], {"method": "ternary"}, "feed 0"),
    ("MODEL", [{"y": np.zeros((2, 64), np.float32)}] * 4, {"method": "ternary"}, "missing inputs ['x']"),
    ("MODEL", [{"x": np.zeros((2, 64), np.float64)}] * 4, {"method": "ternary"}, "dtype float64"),
    ("MODEL", None, {"method": "ternary"}, "give calibration data"),
])
def test_bad_arguments_raise_bad_input(model, calibration, options, message):
    model = _model() if model == "MODEL" else model
    calibration = _feeds() if calibration == "FEEDS" else calibration
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        symshrink.compress(model, calibration, progress=False, **options)


def _scalar_input_model() -> onnx.ModelProto:
    """y = MatMul(x [1, 64], W) * gain, with gain a scalar input (a sample rate, say) and a fixed batch of 1."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "gain"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_runs_layout_calibrates_a_model_with_a_scalar_input(tmp_path, capsys):
    onnx.save(_scalar_input_model(), tmp_path / "s.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "runs.npz", x=rng.standard_normal((12, 1, 64)).astype(np.float32),
             gain=rng.uniform(0.5, 2, 12).astype(np.float32))
    argv = ["compress", str(tmp_path / "s.onnx"), "-o", str(tmp_path / "o.onnx"), "--method", "hyper", "-q",
            "--calib", str(tmp_path / "runs.npz")]
    assert main(argv) == 2 and "--calib-layout runs" in capsys.readouterr().err  # split on axis 0 cannot work
    assert main([*argv, "--calib-layout", "runs"]) == 0


def test_folder_of_npz_runs(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, 64)).astype(np.float32), gain=np.float32(i))
    specs = [InputSpec("x", "float32", (1, 64)), InputSpec("gain", "float32", ())]
    feeds = load_feeds(str(folder), specs, samples=3)
    assert len(feeds) == 3 and [float(f["gain"]) for f in feeds] == [0.0, 1.0, 2.0]


def test_batch_layout_splits_rows_and_caps_samples(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((150, 64), np.float32))
    feeds = load_feeds(str(tmp_path / "c.npz"), [X], samples=100)
    assert [f["x"].shape[0] for f in feeds] == [64, 36]


@pytest.mark.parametrize("calibration, options, message", [
    ([{"x": np.zeros((0, 64), np.float32)}] * 4, {"method": "ternary"}, "empty"),
    ([{"x": [[1.0, 2.0], [3.0]]}] * 4, {"method": "ternary"}, "not arrays"),
    ("FEEDS", {"method": "hyper", "index_bits": ("8",)}, "option index_bits"),
    ("FEEDS", {"method": "ternary", "exclude": [1, 2]}, "option exclude"),
    ("FEEDS", {"method": ["moment", 1]}, "method"),
    ("FEEDS", {"method": "hyper", "index_bits": (1,), "bands": (0,)}, "no codebook"),
    ("FEEDS", {"method": "hyper", "codebook": "grid", "codes": (1 << 20,)}, "codes"),
])
def test_odd_values_are_bad_input(calibration, options, message):
    calibration = _feeds() if calibration == "FEEDS" else calibration
    with pytest.raises(BadInput, match=message):
        symshrink.compress(_model(), calibration, progress=False, **options)


def test_a_generator_is_read_only_as_far_as_the_samples():
    def endless():
        rng = np.random.default_rng(0)
        while True:
            yield {"x": rng.standard_normal((8, 64)).astype(np.float32)}

    _, report = symshrink.compress(_model(), endless(), calib_samples=6, method="ternary", progress=False)
    assert report.holdout_feeds == 1
