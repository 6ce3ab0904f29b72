"""The error contract: one clear line, exit code 2, no traceback, input untouched, no file left."""

import hashlib

import numpy as np
import onnx
import pytest

from symshrink.cli import main
from symshrink.modelio import load_model, save_model
from tests.conftest import mlp_model


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _assert_clean_failure(code, err, expected, folder, before):
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("symshrink: error:")
    assert expected in err
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def _compress(capsys, folder, model_path, *extra):
    return _run(capsys, "compress", str(model_path), "-o", str(folder / "out.onnx"), "--keep", "0.5", "-q", *extra)


def test_missing_file(capsys, folder):
    code, err = _compress(capsys, folder, folder / "nope.onnx", "--random-calib")
    _assert_clean_failure(code, err, "no such file", folder, [])


def test_folder_is_not_a_file(capsys, folder):
    (folder / "dir.onnx").mkdir()
    code, err = _compress(capsys, folder, folder / "dir.onnx", "--random-calib")
    _assert_clean_failure(code, err, "not a file", folder, ["dir.onnx"])


def test_not_onnx(capsys, folder):
    (folder / "junk.onnx").write_text("this is not a protobuf\n" * 10)
    code, err = _compress(capsys, folder, folder / "junk.onnx", "--random-calib")
    _assert_clean_failure(code, err, "not an ONNX model", folder, ["junk.onnx"])


def test_truncated_protobuf(capsys, folder):
    data = mlp_model().SerializeToString()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    code, err = _compress(capsys, folder, folder / "cut.onnx", "--random-calib")
    _assert_clean_failure(code, err, "truncated", folder, ["cut.onnx"])


def test_unsupported_opset(capsys, folder):
    model = mlp_model()
    model.opset_import[0].version = 99
    onnx.save(model, folder / "future.onnx")
    code, err = _compress(capsys, folder, folder / "future.onnx", "--random-calib")
    _assert_clean_failure(code, err, "unsupported opset 99", folder, ["future.onnx"])


def test_missing_external_data(capsys, folder):
    onnx.save(mlp_model(hidden=512), folder / "ext.onnx", save_as_external_data=True, location="ext.data",
              size_threshold=0)
    (folder / "ext.data").unlink()
    code, err = _compress(capsys, folder, folder / "ext.onnx", "--random-calib")
    _assert_clean_failure(code, err, "missing external data", folder, ["ext.onnx"])


def test_calibration_names_that_do_not_fit(capsys, folder, mlp_path):
    np.savez(folder / "wrong.npz", not_x=np.zeros((4, 8), np.float32))
    before = sorted(p.name for p in folder.iterdir())
    code, err = _compress(capsys, folder, mlp_path, "--calib", str(folder / "wrong.npz"))
    _assert_clean_failure(code, err, "missing inputs ['x']", folder, before)


def test_calibration_shape_that_does_not_fit(capsys, folder, mlp_path):
    np.savez(folder / "wrong.npz", x=np.zeros((4, 9), np.float32))
    before = sorted(p.name for p in folder.iterdir())
    code, err = _compress(capsys, folder, mlp_path, "--calib", str(folder / "wrong.npz"))
    _assert_clean_failure(code, err, "model expects", folder, before)


def test_no_calibration_data_is_an_error_not_random(capsys, folder, mlp_path):
    code, err = _compress(capsys, folder, mlp_path)
    _assert_clean_failure(code, err, "--random-calib", folder, ["mlp.onnx"])


def test_input_model_is_never_modified(folder, mlp_path, mlp_calib):
    digest = hashlib.sha256(mlp_path.read_bytes()).hexdigest()
    assert main(["compress", str(mlp_path), "-o", str(folder / "out.onnx"), "--keep", "0.5", "--min-cosine", "0",
                 "--calib", str(mlp_calib), "-q"]) == 0
    assert hashlib.sha256(mlp_path.read_bytes()).hexdigest() == digest
    # compressing onto the input path itself replaces it only atomically, after the verify step
    assert (folder / "out.onnx").stat().st_size < mlp_path.stat().st_size


def test_external_data_round_trip(folder):
    onnx.save(mlp_model(hidden=64), folder / "m.onnx")
    model, _ = load_model(folder / "m.onnx")
    save_model(model, folder / "ext.onnx", external_data=True)
    assert (folder / "ext.onnx.data").stat().st_size >= 4 * (8 * 64 + 64 * 4)  # both matrices
    again, _ = load_model(folder / "ext.onnx")
    np.testing.assert_array_equal(again.graph.initializers["W1"].const_value.numpy(),
                                  model.graph.initializers["W1"].const_value.numpy())
    assert sorted(p.name for p in folder.iterdir()) == ["ext.onnx", "ext.onnx.data", "m.onnx"]
