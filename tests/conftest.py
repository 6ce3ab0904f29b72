"""Shared fixtures: small inline models (built with onnx.helper) and their files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def mlp_model(hidden: int = 32, inputs: int = 8, outputs: int = 4, seed: int = 0, activation: str = "Relu",
              constant_nodes: bool = False, opset: int = 17) -> onnx.ModelProto:
    """x[?, inputs] -> MatMul W1 -> Add b1 -> activation -> MatMul W2 -> Add b2 -> y."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W1": (rng.standard_normal((inputs, hidden)) / np.sqrt(inputs)).astype(np.float32),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "W2": (rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)).astype(np.float32),
        "b2": (rng.standard_normal(outputs) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node(activation, ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "W2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias"),
    ]
    initializers = []
    if constant_nodes:
        nodes = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in arrays.items()] + nodes
    else:
        initializers = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def swiglu_nodes(out: str = "y") -> list[onnx.NodeProto]:
    """x -> gate (MatMul Wg) -> SiLU (x * sigmoid x) -> * up (MatMul Wu) -> down (MatMul Wd) -> out."""
    return [
        helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
        helper.make_node("Sigmoid", ["g"], ["s"], name="sig"),
        helper.make_node("Mul", ["g", "s"], ["silu"], name="silu"),
        helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
        helper.make_node("Mul", ["silu", "u"], ["gu"], name="glu"),
        helper.make_node("MatMul", ["gu", "Wd"], [out], name="down"),
    ]


@pytest.fixture
def mlp_path(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return path


@pytest.fixture
def mlp_calib(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32))
    return path
