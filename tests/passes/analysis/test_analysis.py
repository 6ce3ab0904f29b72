import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.modelio import load_model
from symshrink.passes.analysis.groups import analyse
from tests.conftest import mlp_model, swiglu_nodes


def _groups(proto):
    return analyse(ir.from_proto(proto))


def _usable(groups, kind=None):
    return [g for g in groups if g.ok and (kind is None or g.kind == kind)]


@pytest.mark.parametrize("activation", ["Relu", "Gelu", "Sigmoid", "Tanh"])
def test_mlp_hidden_units_form_one_ffn_group(activation):
    proto = mlp_model(hidden=32, activation=activation, opset=20)  # Gelu is opset 20
    (group,) = _usable(_groups(proto))
    assert (group.kind, group.width) == ("ffn", 32)
    assert {c.node for c in group.producers} == {"fc1"} and {c.node for c in group.consumers} == {"fc2"}
    assert group.params == 8 * 32 + 32 + 32 * 4  # W1 columns, b1, W2 rows


def test_weights_given_as_constant_nodes_are_found():
    (group,) = _usable(_groups(mlp_model(hidden=16, constant_nodes=True)))
    assert group.width == 16


def test_output_layer_is_rejected_with_reason():
    rejected = [g for g in _groups(mlp_model()) if not g.ok]
    assert len(rejected) == 1 and "graph output" in rejected[0].reason


def _graph(nodes, arrays, out="y", inputs=8, outputs=4):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", inputs])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", outputs])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_swiglu_and_silu_form_one_group_with_two_producers():
    rng = np.random.default_rng(0)
    arrays = {"Wg": rng.standard_normal((8, 24)).astype(np.float32), "Wu": rng.standard_normal((8, 24)).astype(np.float32),
              "Wd": rng.standard_normal((24, 8)).astype(np.float32)}
    (group,) = _usable(_groups(_graph(swiglu_nodes(), arrays, outputs=8)))
    assert group.kind == "swiglu" and group.width == 24
    assert {c.node for c in group.producers} == {"gate", "up"}


def test_residual_reader_couples_the_group():
    rng = np.random.default_rng(0)
    arrays = {"W1": rng.standard_normal((8, 16)).astype(np.float32), "W2": rng.standard_normal((16, 8)).astype(np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "W2"], ["z"], name="fc2"),
        helper.make_node("ReduceSum", ["r"], ["s"], name="leak", keepdims=1),  # mixes units
        helper.make_node("Add", ["z", "s"], ["y"], name="out"),
    ]
    groups = _groups(_graph(nodes, arrays, outputs=8))
    fc1 = next(g for g in groups if "fc1" in g.where)
    assert not fc1.ok and "ReduceSum" in fc1.reason


def test_conv_channel_pair_with_batchnorm_and_depthwise():
    rng = np.random.default_rng(0)
    c, d = 3, 12
    arrays = {
        "W1": rng.standard_normal((d, c, 1, 1)).astype(np.float32), "scale": np.ones(d, np.float32),
        "bias": np.zeros(d, np.float32), "mean": np.zeros(d, np.float32), "var": np.ones(d, np.float32),
        "Wdw": rng.standard_normal((d, 1, 3, 3)).astype(np.float32), "W2": rng.standard_normal((4, d, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="expand"),
        helper.make_node("BatchNormalization", ["a", "scale", "bias", "mean", "var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="act"),
        helper.make_node("Conv", ["r", "Wdw"], ["dw"], name="depthwise", group=d, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["dw", "W2"], ["y"], name="project"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    groups = _groups(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (group,) = _usable(groups)
    assert group.kind == "conv" and group.width == d
    assert {cut.node for cut in group.passthrough} == {"bn", "depthwise"}


def test_minilm_l3_has_three_ffn_and_three_attention_groups():
    model, _ = load_model("minilm-l3")
    groups = analyse(model)
    ffn = _usable(groups, "ffn")
    heads = _usable(groups, "heads")
    assert [g.width for g in ffn] == [1536] * 3
    assert [g.width for g in heads] == [12] * 3
    assert all(g.detail == {"head_dim": 32, "kv_heads": 12, "grouped_query": False} for g in heads)
    # the residual-coupled projections are candidates with reasons, not groups
    assert all(g.reason for g in groups if not g.ok)


def test_fmnist_mlp_has_two_ffn_groups():
    model, _ = load_model("fmnist-mlp")
    assert [g.width for g in _usable(analyse(model), "ffn")] == [512, 256]
