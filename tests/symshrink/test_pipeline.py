"""End to end through onnxruntime: compress, verify, plan replay, and the diff gate."""

import json

import numpy as np
import onnx
import pytest

from symshrink.cli import main
from symshrink.options import options_from
from symshrink.pipeline import compress
from symshrink.runtime.diff import compare_outputs
from symshrink.runtime.ort import make_session, run_all
from symshrink.testing import assert_outputs_close
from tests.conftest import mlp_model


def _feeds(n=64, seed=5):
    return [{"x": np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)}]


def test_keep_one_reproduces_the_original(mlp_path, mlp_calib, tmp_path):
    out = tmp_path / "same.onnx"
    compress(str(mlp_path), out, options_from(keep=1.0, calib=str(mlp_calib), progress=False))
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert_outputs_close(mlp_path, out, _feeds(), max_rel_error=1e-4)


def test_the_report_gives_bits_per_weight_of_the_original_models_weights(mlp_path, mlp_calib, tmp_path):
    out = tmp_path / "half.onnx"
    report = compress(str(mlp_path), out, options_from(keep=0.5, calib=str(mlp_calib), min_cosine=0.0, progress=False))
    weights = sum(int(np.prod(t.dims)) for t in onnx.load(mlp_path).graph.initializer)
    assert report.parameters == weights
    before, after = (8 * n / weights for n in (report.bytes_before, report.bytes_after))
    assert 32 < before < 40 and after < before  # fp32 and the graph's few bytes
    assert f"({before:.2f} bpw) -> " in report.summary() and f"({after:.2f} bpw), " in report.size_line()


def test_keep_half_halves_the_hidden_layer_and_refits(mlp_path, mlp_calib, tmp_path):
    out = tmp_path / "half.onnx"
    report = compress(str(mlp_path), out, options_from(keep=0.5, calib=str(mlp_calib), min_cosine=0.0, progress=False))
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: t.dims for t in model.graph.initializer}
    assert sorted(tuple(d) for d in weights.values()) == sorted([(8, 16), (16,), (16, 4), (4,)])
    assert [g.keep_width for g in report.plan.groups] == [16]
    # refit beats dropping the same units without refit, measured on held-out inputs
    feeds = _feeds()
    ref = run_all(make_session(mlp_path), feeds)
    refit_err = compare_outputs(ref, run_all(make_session(out), feeds))[0].rel_l2
    assert refit_err < 0.5


def test_plan_out_replays_to_the_same_model(mlp_path, mlp_calib, tmp_path):
    plan = tmp_path / "plan.json"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compress(str(mlp_path), a, options_from(keep=0.25, calib=str(mlp_calib), plan_out=str(plan), min_cosine=0.0, progress=False))
    data = json.loads(plan.read_text())
    assert data["groups"][0]["keep_width"] == 8 and len(data["groups"][0]["kept"]) == 8
    compress(str(mlp_path), b, options_from(plan=str(plan), calib=str(mlp_calib), min_cosine=0.0, progress=False))
    assert_outputs_close(a, b, _feeds(), max_rel_error=0.0)


def test_gate_failure_writes_nothing_and_exits_1(mlp_path, mlp_calib, tmp_path, capsys):
    out = tmp_path / "bad.onnx"
    code = main(["compress", str(mlp_path), "-o", str(out), "--width", "1", "--calib", str(mlp_calib),
                 "--min-cosine", "0.9999", "-q"])
    assert code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "mlp.onnx"]  # no output, no temp file
    assert "outside tolerance" in capsys.readouterr().err


def test_diff_of_a_model_with_itself_is_exactly_zero(mlp_path, mlp_calib, capsys):
    assert main(["diff", str(mlp_path), str(mlp_path), "--data", str(mlp_calib), "--json",
                 "--max-error", "0", "--min-cosine", "1"]) == 0
    (diff,) = json.loads(capsys.readouterr().out)
    assert diff["max_abs"] == 0.0 and diff["rel_l2"] == 0.0 and diff["cosine"] == pytest.approx(1.0, abs=1e-12)


def test_diff_of_a_perturbed_model_fails_the_gate(mlp_path, mlp_calib, tmp_path, capsys):
    model = onnx.load(mlp_path)
    w2 = next(t for t in model.graph.initializer if t.name == "W2")
    array = onnx.numpy_helper.to_array(w2).copy()
    array[0] += 0.05
    w2.CopyFrom(onnx.numpy_helper.from_array(array, "W2"))
    perturbed = tmp_path / "perturbed.onnx"
    onnx.save(model, perturbed)
    code = main(["diff", str(mlp_path), str(perturbed), "--data", str(mlp_calib), "--max-error", "1e-3"])
    assert code == 1 and "outside tolerance" in capsys.readouterr().err
    with pytest.raises(AssertionError):
        assert_outputs_close(mlp_path, perturbed, _feeds(), max_rel_error=1e-3)


@pytest.mark.slow
def test_minilm_l3_keep_one_within_1e4(tmp_path):
    out = tmp_path / "minilm.onnx"
    report = compress("minilm-l3", out, options_from(keep=1.0, calib="lee", calib_samples=16, progress=False))
    assert all(d.rel_l2 <= 1e-4 for d in report.diffs)
    assert len(report.plan.groups) == 6  # 3 FFN + 3 head groups


@pytest.mark.slow
def test_minilm_l3_keep_half_is_smaller_and_close(tmp_path):
    out = tmp_path / "minilm.onnx"
    report = compress("minilm-l3", out, options_from(keep=0.5, calib="lee", calib_samples=24, min_cosine=0.0, progress=False))
    # per layer: FFN in/out 768 x 384 each, Q/K/V/O 192 x 384 each (6 of 12 heads of 32)
    assert report.bytes_after < report.bytes_before - 3 * (2 * 768 + 4 * 192) * 384 * 4 * 0.99
    # halving every head group and FFN with 19 calibration sentences: measured rel. L2 0.55, cosine 0.87
    assert max(d.rel_l2 for d in report.diffs) < 0.7
    assert min(d.cosine for d in report.diffs) > 0.8
    onnx.checker.check_model(str(out), full_check=True)
    shapes = {i.name: tuple(i.dims) for i in onnx.load(out).graph.initializer}
    assert sum(shape == (384, 192) for shape in shapes.values()) == 3 * 3  # Q, K, V of each layer
    assert sum(shape == (192, 384) for shape in shapes.values()) == 3  # the output projections


def test_recorded_shapes_of_every_group_tensor_follow_the_new_width(tmp_path, mlp_calib):
    # regression (PP-OCR's mixer): a dropout Identity inside the group kept the old width in value_info
    model = mlp_model(hidden=32, activation="Sigmoid")
    act = next(n for n in model.graph.node if n.name == "act")
    act.output[0] = "s"
    model.graph.node.insert(3, onnx.helper.make_node("Identity", ["s"], ["h2"], name="dropout"))
    model = onnx.shape_inference.infer_shapes(model)
    assert any(v.name == "s" for v in model.graph.value_info)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "small.onnx"
    compress(str(path), out, options_from(keep=0.5, calib=str(mlp_calib), min_cosine=0.0, progress=False))
    onnx.checker.check_model(onnx.load(out), full_check=True)
    make_session(out)


def _two_layer(tmp_path):
    """x -> 256 ReLU units -> 256 ReLU units -> 4 outputs: two FFN groups of 256."""
    rng = np.random.default_rng(0)
    arrays = {"W1": rng.standard_normal((8, 256)) / 3, "b1": rng.standard_normal(256) * 0.1,
              "W2": rng.standard_normal((256, 256)) / 16, "b2": rng.standard_normal(256) * 0.1,
              "W3": rng.standard_normal((256, 4)) / 16, "b3": rng.standard_normal(4)}
    nodes = [onnx.helper.make_node("MatMul", ["x", "W1"], ["a"]), onnx.helper.make_node("Add", ["a", "b1"], ["a1"]),
             onnx.helper.make_node("Relu", ["a1"], ["h1"]), onnx.helper.make_node("MatMul", ["h1", "W2"], ["c"]),
             onnx.helper.make_node("Add", ["c", "b2"], ["c1"]), onnx.helper.make_node("Relu", ["c1"], ["h2"]),
             onnx.helper.make_node("MatMul", ["h2", "W3"], ["e"]), onnx.helper.make_node("Add", ["e", "b3"], ["y"])]
    graph = onnx.helper.make_graph(nodes, "mlp2", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])],
                                   [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    path = tmp_path / "mlp2.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def test_target_size_is_reached_by_a_global_allocation(tmp_path, mlp_calib):
    path, out = _two_layer(tmp_path), tmp_path / "small.onnx"
    report = compress(str(path), out, options_from(target_size=0.5, calib=str(mlp_calib), progress=False))
    assert report.bytes_after <= 0.5 * report.bytes_before * 1.01  # protobuf framing is not counted by the planner
    widths = [len(g.kept) for g in report.plan.groups]
    assert widths != [widths[0]] * len(widths) or widths[0] < 256  # the allocator chose the widths


def test_max_error_alone_is_a_budget_and_a_gate(tmp_path, mlp_calib):
    path, out = _two_layer(tmp_path), tmp_path / "small.onnx"
    report = compress(str(path), out, options_from(method="moment", max_error=0.05, calib=str(mlp_calib), progress=False))
    assert max(d.rel_l2 for d in report.diffs) <= 0.05
    assert report.bytes_after < 0.9 * report.bytes_before  # the budget buys a real reduction
    assert any(len(g.kept) < g.width for g in report.plan.groups)


def test_width_rule_sqrt(tmp_path, mlp_calib):
    path, out = _two_layer(tmp_path), tmp_path / "small.onnx"
    report = compress(str(path), out, options_from(sqrt_c=2.0, calib=str(mlp_calib), min_cosine=0.0, progress=False))
    assert [g.keep_width for g in report.plan.groups] == [32, 32]  # ceil(2 sqrt 256)


def test_unreachable_target_size_is_bad_input_and_writes_nothing(tmp_path, mlp_calib):
    path, out = _two_layer(tmp_path), tmp_path / "small.onnx"
    code = main(["compress", str(path), "-o", str(out), "--target-size", "100B", "--calib", str(mlp_calib), "-q"])
    assert code == 2 and not out.exists()


@pytest.mark.slow
def test_ppocr_cls_conv_groups_are_rewritten(tmp_path):
    # a real conv net (PP-OCR's direction classifier): conv -> BatchNorm -> hard-swish / depthwise chains
    out = tmp_path / "cls.onnx"
    report = compress("ppocr-cls", out, options_from(keep=0.75, min_cosine=0.0, progress=False))
    assert [(g.kind, len(g.kept) < g.width) for g in report.plan.groups] == [("conv", True)] * 4
    # measured: rel. L2 0.073, cosine 0.997 on the 14 held-out feeds
    assert max(d.rel_l2 for d in report.diffs) < 0.15
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.slow
@pytest.mark.zoo
def test_smollm2_swiglu_groups_are_rewritten(tmp_path):
    pytest.importorskip("torch")
    from symshrink.models.types import cache_dir  # noqa: PLC0415

    if not (cache_dir() / "smollm2-135m" / "model.onnx").is_file():
        pytest.skip("smollm2-135m is not exported yet (symshrink zoo get smollm2-135m)")
    out = tmp_path / "smol.onnx"
    report = compress("smollm2-135m", out, options_from(keep=0.9, calib_samples=12, min_cosine=0.0, progress=False))
    assert {g.kind for g in report.plan.groups} == {"swiglu"} and len(report.plan.groups) == 30
    assert all(len(g.kept) == 1383 for g in report.plan.groups)  # ceil(0.9 * 1536): gate and up columns together
    # measured with 12 calibration windows: rel. L2 of the logits 0.37 (an LLM is far more sensitive
    # to width than the encoders: see docs/benchmarks.md); a wrong gate/up slice gives errors near 1
    assert max(d.rel_l2 for d in report.diffs) < 0.5


@pytest.mark.slow
def test_minilm_l3_on_the_4bit_grid_codes_its_embedding_tables_too(tmp_path):
    out = tmp_path / "minilm.onnx"
    report = compress("minilm-l3", out, options_from(method="quant", bits=4, block=32, calib="lee", calib_samples=24,
                                                     min_cosine=0.98, progress=False))
    model = onnx.load(out)
    lookups = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 2 and {n.domain for n in lookups} == {"com.microsoft"}  # words, positions
    tables = {i.name: i for i in model.graph.initializer}
    left = [tables[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables]
    assert [list(t.dims) for t in left] == [[2, 384]]  # token types: below MIN_ELEMENTS, kept fp32
    # every MatMul weight and table at 4 bits with a float scale per 32 (5 bits a weight): measured 0.159x, held-out
    # cosine 0.990 (2-core AMD EPYC, onnxruntime 1.32)
    assert report.bytes_after < 0.17 * report.bytes_before
    assert min(d.cosine for d in report.diffs) > 0.97
    onnx.checker.check_model(str(out))


@pytest.mark.slow
def test_ppocr_cls_1x1_convs_on_the_4bit_grid_become_matmulnbits(tmp_path):
    # a real conv net: its 1x1 convs (squeeze-excitation ones too, on pooled maps, K = 50 and 200: ragged blocks)
    # become MatMulNBits over the channels; its kxk convs stay fp32 without --dequantize-convs
    out = tmp_path / "cls.onnx"
    report = compress("ppocr-cls", out, options_from(method="quant", bits=4, block=32, progress=False))
    coded = [layer for layer in report.quant.layers if layer.op == "Conv"]
    assert len(coded) == 9 and {layer.codec for layer in coded} == {"uint4"}
    assert any("prepacked kernels" in why for why in report.quant.passed_over.values())
    model = onnx.load(out)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 9 and "DequantizeLinear" not in ops
    # measured: cosine 0.99975, top-1 0.9955 on the 14 held-out feeds (2-core AMD EPYC, onnxruntime 1.32)
    assert min(d.cosine for d in report.diffs) > 0.995
    onnx.checker.check_model(str(out), full_check=True)
