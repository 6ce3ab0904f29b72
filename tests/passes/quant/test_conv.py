"""Conv weights as integer-grid sites: W [kh kw Cin, Cout] over the patches of the input maps (taps first), the
numpy grid's numbers through onnxruntime and the executor, and second-moment rounding on the patches."""

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from symshrink.api import compress
from symshrink.calibration.stats import UnitStats, sample_patches
from symshrink.errors import NothingToCompress
from symshrink.passes.analysis.weights import Patch, find_weight_sites, weight_matrix
from symshrink.passes.quant.grid import encode_grid, grid_offer, packed_sites, site_block, site_format
from symshrink.rules import quant_rule
from symshrink.runtime.executor import Executor
from symshrink.runtime.formats import conv_matrix, conv_weight, quantize_grid
from symshrink.runtime.ort import run_all, session_for_model

CHANNELS, WIDE = 16, 32  # the 3x3 conv's input channels (whole blocks of 16 per tap), the 1x1 conv's


def _conv_model(seed: int = 0) -> onnx.ModelProto:
    """x [n, 16, 9, 11] -> Conv 3x3 (pads 1, bias) -> Relu -> Conv 1x1 (bias) -> Relu -> depthwise 3x3 -> y."""
    rng = np.random.default_rng(seed)
    arrays = {"W1": rng.standard_normal((WIDE, CHANNELS, 3, 3)) * 0.1, "b1": rng.standard_normal(WIDE) * 0.1,
              "W2": rng.standard_normal((CHANNELS, WIDE, 1, 1)) * 0.2, "b2": rng.standard_normal(CHANNELS) * 0.1,
              "W3": rng.standard_normal((CHANNELS, 1, 3, 3)) * 0.3}
    nodes = [onnx.helper.make_node("Conv", ["x", "W1", "b1"], ["h1"], name="conv3", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             onnx.helper.make_node("Conv", ["a1", "W2", "b2"], ["h2"], name="conv1"),
             onnx.helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             onnx.helper.make_node("Conv", ["a2", "W3"], ["y"], name="depthwise", group=CHANNELS, pads=[1, 1, 1, 1])]
    graph = onnx.helper.make_graph(
        nodes, "convs", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", CHANNELS, 9, 11])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(a.astype(np.float32), name) for name, a in arrays.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def _arrays() -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in _conv_model().graph.initializer}


def _depthwise(maps: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The 3x3 depthwise Conv (pads 1) of `_conv_model`, in numpy."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3),
                                                       axis=(2, 3))
    return np.einsum("nchwij,cij->nchw", windows, weight[:, 0])


def _smooth_maps(count: int, seed: int) -> np.ndarray:
    """Maps whose neighbouring pixels and channels are correlated (as images are): a blurred random field, its
    channels mixed the same way whatever the seed (one distribution)."""
    noise = np.random.default_rng(seed).standard_normal((count, CHANNELS, 11, 13))
    blurred = sum(noise[:, :, i: i + 9, j: j + 11] for i in range(3) for j in range(3)) / 3
    mixing = np.random.default_rng(99).standard_normal((CHANNELS, CHANNELS)) * 0.5 + np.eye(CHANNELS)
    mixed = np.einsum("dc,nchw->ndhw", mixing, blurred)
    return mixed.astype(np.float32)


def _conv(maps: np.ndarray, weight: np.ndarray, patch: Patch, bias: np.ndarray | None = None) -> np.ndarray:
    """A Conv of stride 1 as the product of every patch (`sample_patches`, taps first) and a site's W [kh kw Cin,
    Cout]."""
    n, _, height, width = maps.shape
    rows = sample_patches(maps, patch.kernel, patch.strides, patch.pads, patch.dilations, 10**9, None)
    out = rows @ weight + (0 if bias is None else bias)
    out_h = height + patch.pads[0] + patch.pads[2] - patch.kernel[0] + 1
    return out.reshape(n, out_h, -1, weight.shape[1]).transpose(0, 3, 1, 2)


def test_convs_are_sites_over_their_patches_and_grouped_ones_have_no_shared_moments():
    model = ir.from_proto(_conv_model())
    sites, passed = find_weight_sites(model, convs=True, min_elements=0)
    three, pad = Patch((3, 3), pads=(1, 1, 1, 1)), (1, 1, 1, 1)
    assert [(s.node, s.rows, s.cols, s.patch, s.groups) for s in sites] == [
        ("conv3", 9 * CHANNELS, WIDE, three, 1), ("conv1", WIDE, CHANNELS, Patch((1, 1)), 1),
        ("depthwise", 9, CHANNELS, Patch((3, 3), pads=pad), CHANNELS)]
    assert sites[1].patch.pointwise and not sites[0].patch.pointwise
    assert [s.moments for s in sites] == [True, True, False] and not passed
    assert find_weight_sites(model, min_elements=0)[0] == []  # convs only when asked for
    nodes = {node.name: node for node in model.graph}
    maps = _smooth_maps(2, 1)
    weight = weight_matrix(sites[0], nodes)
    np.testing.assert_array_equal(weight, conv_matrix(nodes["conv3"].inputs[1].const_value.numpy()))
    # the patches in the order the weight's rows take: their product is the Conv's output
    expected = _conv(maps, weight, sites[0].patch, _arrays()["b1"])
    proto = _conv_model()
    proto.graph.output[0].name = "h1"
    del proto.graph.node[1:]
    h1 = run_all(session_for_model(ir.from_proto(proto)), [{"x": maps}])[0]["h1"]
    np.testing.assert_allclose(h1, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, True), (2, True)])
def test_conv_codes_run_in_onnxruntime_and_the_executor_as_the_numpy_grid(bits, symmetric):
    """The 3x3 conv behind DequantizeLinear (4-D codes, blocks of 16 channels per tap), the 1x1 conv as
    Transpose -> MatMulNBits -> Transpose, the depthwise conv behind DequantizeLinear per output channel:
    onnxruntime within MatMulNBits' int8 activations of the numpy grid's network, the executor within float
    rounding; the ONNX checker passes; the fp32 weights are gone."""
    model = ir.from_proto(_conv_model())
    sites, passed = find_weight_sites(model, convs=True, min_elements=0)
    nodes = {node.name: node for node in model.graph}
    weights = {s.node: weight_matrix(s, nodes) for s in sites}
    offer = grid_offer(sites, {}, nodes, 16, passed, symmetric=symmetric)
    chosen, _ = quant_rule(offer, bits, None)
    offer.rewrite(chosen)(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Transpose") == 2 and ops.count("DequantizeLinear") == 2
    assert {"W1", "W2", "W3"}.isdisjoint(t.name for t in proto.graph.initializer)
    maps = _smooth_maps(3, 2)
    approx = {s.node: quantize_grid(weights[s.node], 16 if s.groups == 1 else None, bits, symmetric).dequantize()
              for s in sites}
    arrays = _arrays()
    a1 = np.maximum(_conv(maps, approx["conv3"], sites[0].patch, arrays["b1"]), 0)
    a2 = np.maximum(_conv(a1, approx["conv1"], sites[1].patch, arrays["b2"]), 0)
    expected = _depthwise(a2, conv_weight(approx["depthwise"], (3, 3)))
    got = run_all(session_for_model(model), [{"x": maps}])[0]["y"]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 2e-2  # MatMulNBits' int8 activations
    executed = Executor(model).run({"x": maps})["y"]
    np.testing.assert_allclose(executed, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 2])
def test_second_moment_rounding_of_a_conv_beats_nearest_on_held_out_patches(bits):
    model = ir.from_proto(_conv_model())
    site = find_weight_sites(model, convs=True, min_elements=0)[0][0]
    weight = weight_matrix(site, {node.name: node for node in model.graph})
    patch = site.patch
    stats = UnitStats(site.rows)
    stats.add(sample_patches(_smooth_maps(16, 3), patch.kernel, patch.strides, patch.pads, patch.dilations, 2000,
                             np.random.default_rng(0)))
    held_out = sample_patches(_smooth_maps(8, 4), patch.kernel, patch.strides, patch.pads, patch.dilations, 10**9, None)
    errors = {}
    for rounding in ("feedback", "nearest"):
        codes = encode_grid(weight, stats, 16, bits, rounding, symmetric=True, act_order=True).weight.dequantize()
        errors[rounding] = np.linalg.norm(held_out @ (weight - codes)) / np.linalg.norm(held_out @ weight)
    assert errors["feedback"] < 0.8 * errors["nearest"], errors


def test_compress_calibrates_convs_on_their_patches_and_verifies_through_onnxruntime():
    feeds = [{"x": maps[None]} for maps in _smooth_maps(20, 5)]
    proto, report = compress(_conv_model(), feeds, method="quant", bits=4, block=16, progress=False,
                             dequantize_convs=True)
    (layer,) = report.quant.layers  # the 1x1 and depthwise convs are below the 4096 elements worth a codec
    assert (layer.node, layer.op, layer.codec) == ("conv3", "Conv", "uint4") and layer.relative_error < 0.1
    assert all("below 4096" in report.quant.passed_over[name] for name in ("conv1", "depthwise"))
    assert report.failures == [] and report.diffs[0].cosine > 0.99
    onnx.checker.check_model(proto)
    with pytest.raises(NothingToCompress, match="conv k3x3 s1x1 p1.1.1.1 d1x1, group 1: onnxruntime's CPU Conv"):
        compress(_conv_model(), feeds, method="quant", bits=4, block=16, progress=False)


def _grouped_pointwise_model() -> onnx.ModelProto:
    """`_conv_model` whose last conv is a 1x1, stride 1 conv in four groups (a MatMul per group, not one MatMul)."""
    proto = _conv_model()
    proto.graph.node[4].attribute[0].CopyFrom(onnx.helper.make_attribute("group", 4))
    del proto.graph.node[4].attribute[1:]
    weight = np.random.default_rng(5).standard_normal((CHANNELS, 4, 1, 1)).astype(np.float32)
    proto.graph.initializer[4].CopyFrom(onnx.numpy_helper.from_array(weight, "W3"))
    return proto


def test_a_grouped_1x1_conv_is_no_matmul_and_reads_its_codes_per_output_channel():
    model = ir.from_proto(_grouped_pointwise_model())
    sites, passed = find_weight_sites(model, convs=True, min_elements=0)
    grouped = next(s for s in sites if s.node == "depthwise")
    assert grouped.patch.pointwise and grouped.groups == 4 and site_block(grouped, 16) is None
    assert site_format(grouped, None, True) == "conv"
    nodes = {node.name: node for node in model.graph}
    weights = {s.node: weight_matrix(s, nodes) for s in sites}
    offer = grid_offer(sites, {}, nodes, 16, passed)
    offer.rewrite(quant_rule(offer, 8, None)[0])(model)
    ops = {n.name: n.op_type for n in ir.to_proto(model).graph.node}
    assert ops["depthwise"] == "Conv" and ops["conv1"] == "MatMulNBits"
    maps = _smooth_maps(2, 6)
    arrays = _arrays()
    approx = {s.node: quantize_grid(weights[s.node], site_block(s, 16), 8).dequantize() for s in sites}
    a1 = np.maximum(_conv(maps, approx["conv3"], sites[0].patch, arrays["b1"]), 0)
    a2 = np.maximum(_conv(a1, approx["conv1"], sites[1].patch, arrays["b2"]), 0)
    w3 = conv_weight(approx["depthwise"], (1, 1))[:, :, 0, 0]  # [16 out, 4 in a group]
    expected = np.einsum("ngchw,gdc->ngdhw", a2.reshape(2, 4, 4, 9, 11), w3.reshape(4, 4, 4)).reshape(2, 16, 9, 11)
    executed = Executor(model).run({"x": maps})["y"]
    np.testing.assert_allclose(executed, expected, rtol=1e-4, atol=1e-4)
    got = run_all(session_for_model(model), [{"x": maps}])[0]["y"]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 2e-2


def test_by_default_only_1x1_convs_of_stride_1_without_pads_are_coded():
    proto = _conv_model()
    proto.graph.node[2].attribute.append(onnx.helper.make_attribute("strides", [2, 2]))  # conv1: 1x1, strided
    model = ir.from_proto(proto)
    sites, passed = find_weight_sites(model, convs=True, min_elements=0)
    kept = packed_sites(sites, passed, 16)
    assert kept == [] and all("prepacked kernels" in passed[name] for name in ("conv3", "conv1", "depthwise"))
    assert "conv k1x1 s2x2" in passed["conv1"]


def test_a_site_takes_the_largest_block_that_divides_its_rows():
    model = ir.from_proto(_conv_model())
    conv3, conv1, depthwise = find_weight_sites(model, convs=True, min_elements=0)[0]
    assert [site_block(conv3, b) for b in (64, 16, None)] == [16, 16, None]  # 16 channels a tap
    assert [site_block(conv1, b) for b in (64, 32)] == [32, 32] and site_block(depthwise, 64) is None
    assert site_block(replace(conv1, rows=48), 64) == 16 and site_block(replace(conv1, rows=50), 64) == 64  # padded
    assert site_block(replace(conv3, rows=9 * 24), 64) is None  # 24 channels a tap: one scale per output column
    assert site_block(replace(conv1, patch=None, rows=48), 64) == 64  # a product: as asked, its last block short


@pytest.mark.parametrize("kernel, strides, pads, dilations", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), ((2, 3), (2, 1), (0, 1, 2, 0), (1, 2)), ((3, 2), (3, 2), (0, 0, 0, 0), (2, 1)),
])
def test_patches_are_onnxruntimes_conv_inputs_at_any_stride_pad_and_dilation(kernel, strides, pads, dilations):
    rng = np.random.default_rng(8)
    maps = rng.standard_normal((2, 5, 11, 12)).astype(np.float32)
    weight = rng.standard_normal((7, 5, *kernel)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=list(strides), pads=list(pads),
                                 dilations=list(dilations))
    graph = onnx.helper.make_graph([node], "conv", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                   [onnx.numpy_helper.from_array(weight, "w")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    y = run_all(session_for_model(ir.from_proto(model)), [{"x": maps}])[0]["y"]
    rows = sample_patches(maps, kernel, strides, pads, dilations, 10**9, None)
    np.testing.assert_allclose(rows @ conv_matrix(weight), y.transpose(0, 2, 3, 1).reshape(-1, 7), rtol=1e-4, atol=1e-4)
    drawn = sample_patches(maps, kernel, strides, pads, dilations, 9, np.random.default_rng(0))
    assert len(drawn) == 9 and all((rows == row).all(axis=1).any() for row in drawn)  # drawn among them
