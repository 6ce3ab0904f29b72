"""`symshrink run` and `symshrink diff --device`: outputs, exit codes, and one clear line without a GPU."""

from __future__ import annotations

import types

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from symshrink.cli import main
from symshrink.runtime import backend
from symshrink.runtime.executor import Executor
from tests.conftest import mlp_model


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32))
    return path


def test_run_on_cpu_writes_the_outputs(mlp_path, data, tmp_path, capsys):
    out = tmp_path / "y.npz"
    assert main(["run", str(mlp_path), "--device", "cpu", "--data", str(data), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "device cpu" in printed and "y: float32 [6, 4]" in printed
    expected = Executor(ir.load(mlp_path)).run({"x": np.load(data)["x"]})["y"]
    np.testing.assert_allclose(np.load(out)["y"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(("cupy", "message"), [
    (None, "--device cuda needs CuPy"),
    (types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False)), "no CUDA GPU on this machine"),
])
def test_cuda_without_a_gpu_is_one_line_and_exit_2(mlp_path, data, tmp_path, capsys, monkeypatch, cupy, message):
    monkeypatch.setattr(backend, "_import_cupy", lambda: cupy)
    out = tmp_path / "y.npz"
    assert main(["run", str(mlp_path), "--device", "cuda", "--data", str(data), "-o", str(out)]) == 2
    assert main(["diff", str(mlp_path), str(mlp_path), "--device", "cuda", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(message in line for line in err)
    assert not out.exists()


def test_diff_on_the_runtime_gates_the_error(mlp_path, data, capsys):
    assert main(["diff", str(mlp_path), str(mlp_path), "--device", "cpu", "--data", str(data), "--max-error", "1e-6"]) == 0
    assert "symshrink runtime" in capsys.readouterr().out
    other = mlp_path.parent / "other.onnx"
    onnx.save(mlp_model(seed=5), other)
    assert main(["diff", str(mlp_path), str(other), "--device", "cpu", "--data", str(data), "--max-error", "0.01"]) == 1


def test_an_op_outside_the_list_is_named(tmp_path, data, capsys):
    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"])], "det",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path = tmp_path / "det.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["run", str(path), "--device", "cpu", "--engine", "executor", "--random"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Det" in err
    assert main(["run", str(path), "--device", "cpu", "--random"]) == 0  # the hybrid engine: onnxruntime runs it
    assert "hybrid engine" in capsys.readouterr().out


def test_run_into_a_missing_folder_is_bad_input(mlp_path, data, tmp_path, capsys):
    assert main(["run", str(mlp_path), "--device", "cpu", "--data", str(data), "-o", str(tmp_path / "no" / "y.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
