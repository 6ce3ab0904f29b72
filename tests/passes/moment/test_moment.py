"""Moment reduction of each group kind on small inline models, checked through onnxruntime.

Each model duplicates half of its units (same producer slices, so the same activations): keeping one of
each pair and refitting the consumer must reproduce the original outputs, so the tolerances are tight.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.options import options_from
from symshrink.pipeline import compress
from symshrink.testing import assert_outputs_close
from tests.conftest import swiglu_nodes

SELECTORS_EXACT_ON_DUPLICATES = ["select", "fold"]


def _save(tmp_path, nodes, arrays, x_shape, y_shape, calib_rows):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *x_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", *y_shape])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path, calib = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(calib, x=np.random.default_rng(1).standard_normal((calib_rows, *x_shape)).astype(np.float32))
    return path, calib


def _dup(array, axis, units, block=1):
    """Copy the first half of `units` unit slices (of `block` entries) along `axis` onto the second half."""
    moved = np.moveaxis(array, axis, 0).copy()
    half = units // 2 * block
    moved[half: 2 * half] = moved[:half]
    return np.moveaxis(moved, 0, axis)


def _compress(tmp_path, path, calib, **options):
    out = tmp_path / "small.onnx"
    if "max_error" not in options:
        options.setdefault("min_cosine", 0.0)  # the gate widened: these tests look at the rewrite itself
    report = compress(str(path), out, options_from(calib=str(calib), progress=False, ridge=1e-9, **options))
    onnx.checker.check_model(onnx.load(out), full_check=True)
    return out, report, {i.name: tuple(i.dims) for i in onnx.load(out).graph.initializer}


def _swiglu(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"Wg": _dup(rng.standard_normal((8, 24)), 1, 24), "Wu": _dup(rng.standard_normal((8, 24)), 1, 24),
              "Wd": rng.standard_normal((24, 8)) / 5, "bd": rng.standard_normal(8)}
    nodes = [*swiglu_nodes(out="d"), helper.make_node("Add", ["d", "bd"], ["y"], name="down_bias")]
    return _save(tmp_path, nodes, arrays, [8], [8], 512)


@pytest.mark.parametrize("selector", SELECTORS_EXACT_ON_DUPLICATES)
def test_swiglu_gate_and_up_columns_go_together(tmp_path, selector):
    path, calib = _swiglu(tmp_path)
    out, report, shapes = _compress(tmp_path, path, calib, keep=0.5, selector=selector)
    assert shapes[f"Wg.{selector}12"] == (8, 12) and shapes[f"Wu.{selector}12"] == (8, 12)
    assert shapes[f"Wd.{selector}12"] == (12, 8)
    assert_outputs_close(path, out, [{"x": np.random.default_rng(2).standard_normal((32, 8)).astype(np.float32)}],
                         max_rel_error=1e-4)


def _conv(tmp_path):
    """Conv 1x1 -> BatchNorm -> Relu -> depthwise 3x3 -> Conv 3x3 stride 2 with bias: a kxk consumer."""
    rng = np.random.default_rng(0)
    c, d = 3, 12
    arrays = {
        "W1": _dup(rng.standard_normal((d, c, 1, 1)), 0, d), "scale": _dup(rng.uniform(0.5, 2, d), 0, d),
        "shift": _dup(rng.standard_normal(d), 0, d), "mean": _dup(rng.standard_normal(d) * 0.1, 0, d),
        "var": _dup(rng.uniform(0.5, 2, d), 0, d), "Wdw": _dup(rng.standard_normal((d, 1, 3, 3)), 0, d),
        "W2": rng.standard_normal((4, d, 3, 3)) / 6, "B2": rng.standard_normal(4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="expand"),
        helper.make_node("BatchNormalization", ["a", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="act"),
        helper.make_node("Conv", ["r", "Wdw"], ["dw"], name="depthwise", group=d, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["dw", "W2", "B2"], ["y"], name="project", pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    return _save(tmp_path, nodes, arrays, [c, 8, 8], [4, 4, 4], 64)


@pytest.mark.parametrize("selector", SELECTORS_EXACT_ON_DUPLICATES)
def test_conv_channels_through_batchnorm_and_depthwise_into_a_kxk_consumer(tmp_path, selector):
    path, calib = _conv(tmp_path)
    out, report, shapes = _compress(tmp_path, path, calib, keep=0.5, selector=selector)
    assert shapes[f"W1.{selector}6"] == (6, 3, 1, 1) and shapes[f"Wdw.{selector}6"] == (6, 1, 3, 3)
    assert shapes[f"W2.{selector}6"] == (4, 6, 3, 3) and shapes[f"var.{selector}6"] == (6,)
    group_attr = next(n for n in onnx.load(out).graph.node if n.name == "depthwise").attribute
    assert next(a.i for a in group_attr if a.name == "group") == 6
    assert_outputs_close(path, out, [{"x": np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)}],
                         max_rel_error=1e-4)


def _attention(tmp_path, heads=4, head_dim=4, seq=5, sdpa=False):
    """Multi-head self-attention as torch exports it: Q/K/V projections with biases, a constant head split,
    scaled scores, softmax, context, head merge and the output projection. Head 3 copies head 1.
    `sdpa`: as newer torch exports scaled_dot_product_attention: a NaN guard after the softmax and a
    rank-keeping Reshape of the context (with the head count) before the merge."""
    rng = np.random.default_rng(0)
    width = heads * head_dim

    def projection():
        w, b = rng.standard_normal((width, width)) / 4, rng.standard_normal(width)
        w[:, 3 * head_dim: 4 * head_dim], b[3 * head_dim: 4 * head_dim] = w[:, head_dim: 2 * head_dim], b[head_dim: 2 * head_dim]
        return w, b

    (wq, bq), (wk, bk), (wv, bv) = projection(), projection(), projection()
    arrays = {"Wq": wq, "bq": bq, "Wk": wk, "bk": bk, "Wv": wv, "bv": bv, "Wo": rng.standard_normal((width, width)) / 4,
              "bo": rng.standard_normal(width), "scale": np.array(np.sqrt(head_dim))}
    split = numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split")
    merge = numpy_helper.from_array(np.array([0, 0, width], np.int64), "merge")
    nodes = [helper.make_node("Constant", [], ["split"], value=split), helper.make_node("Constant", [], ["merge"], value=merge)]
    for name in "qkv":
        perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
        nodes += [
            helper.make_node("MatMul", ["x", f"W{name}"], [f"{name}0"], name=f"{name}_proj"),
            helper.make_node("Add", [f"{name}0", f"b{name}"], [f"{name}1"], name=f"{name}_bias"),
            helper.make_node("Reshape", [f"{name}1", "split"], [f"{name}2"], name=f"{name}_split"),
            helper.make_node("Transpose", [f"{name}2"], [name], name=f"{name}_t", perm=perm),
        ]
    nodes += [
        helper.make_node("MatMul", ["q", "k"], ["s0"], name="scores"),
        helper.make_node("Div", ["s0", "scale"], ["s1"], name="scaled"),
        helper.make_node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
    ]
    if sdpa:
        view = numpy_helper.from_array(np.array([0, heads, -1, head_dim], np.int64), "view")
        nodes += [
            helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
            helper.make_node("Where", ["nan", "zero", "p"], ["pg"], name="guard"),
            helper.make_node("MatMul", ["pg", "v"], ["cv"], name="context"),
            helper.make_node("Constant", [], ["view"], value=view),
            helper.make_node("Reshape", ["cv", "view"], ["c0"], name="c_view"),
        ]
        arrays["zero"] = np.zeros(1)
    else:
        nodes.append(helper.make_node("MatMul", ["p", "v"], ["c0"], name="context"))
    nodes += [
        helper.make_node("Transpose", ["c0"], ["c1"], name="c_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="c_merge"),
        helper.make_node("MatMul", ["c2", "Wo"], ["o0"], name="o_proj"),
        helper.make_node("Add", ["o0", "bo"], ["y"], name="o_bias"),
    ]
    return _save(tmp_path, nodes, arrays, [seq, width], [seq, width], 128)


@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_heads_are_removed_with_their_projections_and_head_count(tmp_path, sdpa):
    path, calib = _attention(tmp_path, sdpa=sdpa)
    out, report, shapes = _compress(tmp_path, path, calib, keep=0.75)
    (planned,) = report.plan.groups
    assert planned.kind == "heads" and len(planned.kept) == 3
    assert not {1, 3} <= set(planned.kept)  # one copy of the duplicated head is the one dropped
    for name in ("Wq", "Wk", "Wv"):
        assert shapes[f"{name}.select3"] == (16, 12)
    assert shapes["bq.select3"] == (12,) and shapes["Wo.select3"] == (12, 16)
    assert shapes["split.select3"] == (4,) and shapes["merge.select3"] == (3,)
    split = next(i for i in onnx.load(out).graph.initializer if i.name == "split.select3")
    assert numpy_helper.to_array(split).tolist() == [0, 0, 3, 4]
    if sdpa:
        view = next(i for i in onnx.load(out).graph.initializer if i.name == "view.select3")
        assert numpy_helper.to_array(view).tolist() == [0, 3, -1, 4]
    assert_outputs_close(path, out, [{"x": np.random.default_rng(2).standard_normal((8, 5, 16)).astype(np.float32)}],
                         max_rel_error=1e-4)


@pytest.mark.parametrize("selector", ["select", "recombine", "fold", "magnitude"])
def test_every_selector_at_full_width_reproduces_the_model(tmp_path, selector):
    path, calib = _swiglu(tmp_path)
    out, report, _ = _compress(tmp_path, path, calib, keep=1.0, selector=selector)
    assert_outputs_close(path, out, [{"x": np.random.default_rng(2).standard_normal((32, 8)).astype(np.float32)}],
                         max_rel_error=1e-6)


@pytest.mark.parametrize("selector", ["select", "recombine", "magnitude"])
def test_heads_under_every_data_aware_selector_stay_close(tmp_path, selector):
    # at 3 of 4 heads with one head duplicated, select is exact; recombine and pruning are not, but the
    # kept heads' rows must still be where they belong (a wrong slice gives errors near 1)
    path, calib = _attention(tmp_path)
    out, report, _ = _compress(tmp_path, path, calib, keep=0.75, selector=selector)
    feeds = [{"x": np.random.default_rng(2).standard_normal((8, 5, 16)).astype(np.float32)}]
    assert_outputs_close(path, out, feeds, max_rel_error={"select": 1e-4, "recombine": 0.3, "magnitude": 0.6}[selector])


def test_a_weight_that_is_one_group_s_consumer_and_the_next_one_s_producer(tmp_path):
    # conv1 -> BN -> Relu -> conv2 (no bias; the shift of its refit goes into the next BN's mean) -> BN
    # -> Relu -> conv3: conv2's rows are refitted for group 1 and its outputs sliced for group 2
    rng = np.random.default_rng(0)
    arrays = {"W1": _dup(rng.standard_normal((8, 3, 1, 1)), 0, 8),
              "W2": _dup(_dup(rng.standard_normal((12, 8, 1, 1)), 0, 12), 1, 8), "W3": rng.standard_normal((4, 12, 1, 1))}
    for name, width in (("1", 8), ("2", 12)):
        arrays |= {f"g{name}": _dup(rng.uniform(0.5, 2, width), 0, width), f"s{name}": _dup(rng.standard_normal(width), 0, width),
                   f"m{name}": _dup(rng.standard_normal(width), 0, width), f"v{name}": _dup(rng.uniform(0.5, 2, width), 0, width)}
    nodes = []
    for name, source in (("1", "x"), ("2", "r1")):
        nodes += [helper.make_node("Conv", [source, f"W{name}"], [f"c{name}"], name=f"conv{name}"),
                  helper.make_node("BatchNormalization", [f"c{name}", f"g{name}", f"s{name}", f"m{name}", f"v{name}"],
                                   [f"b{name}"], name=f"bn{name}"),
                  helper.make_node("Relu", [f"b{name}"], [f"r{name}"], name=f"act{name}")]
    nodes.append(helper.make_node("Conv", ["r2", "W3"], ["y"], name="conv3"))
    path, calib = _save(tmp_path, nodes, arrays, [3, 6, 6], [4, 6, 6], 64)
    out, report, shapes = _compress(tmp_path, path, calib, keep=0.5)
    assert [len(g.kept) for g in report.plan.groups] == [4, 6]
    assert (6, 4, 1, 1) in shapes.values()  # conv2: 6 of 12 outputs, 4 of 8 inputs
    assert_outputs_close(path, out, [{"x": np.random.default_rng(2).standard_normal((4, 3, 6, 6)).astype(np.float32)}],
                         max_rel_error=1e-4)
