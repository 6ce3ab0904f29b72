"""Integer grids: the round-to-nearest codes (numpy), the offer and rule over them, and the rewrite through
onnxruntime (DequantizeLinear uint8 / uint4 / uint2 -> MatMul)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from symshrink.passes.analysis.weights import find_weight_sites
from symshrink.passes.quant.grid import encode_grid, grid_offer
from symshrink.rules import quant_rule
from symshrink.runtime.executor import Executor
from symshrink.runtime.formats import quantize_grid
from symshrink.runtime.ort import run_all, session_for_model
from tests.conftest import mlp_model


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_grid_error_is_within_half_a_step_and_zero_is_exact(bits):
    weight = np.random.default_rng(bits).standard_normal((100, 30))
    weight[7] = 0.0
    quantized = quantize_grid(weight, 32, bits)
    step = np.repeat(quantized.scales, 32, axis=0)[:100]
    assert quantized.codes.max() <= (1 << bits) - 1
    assert np.all(np.abs(quantized.dequantize() - weight) <= step / 2 + 1e-12)
    assert np.all(quantized.dequantize()[7] == 0.0)


def _model() -> ir.Model:
    return ir.from_proto(mlp_model(hidden=256, inputs=64, outputs=32))


def _offer(model: ir.Model):
    sites, passed = find_weight_sites(model)
    return grid_offer(sites, {}, {node.name: node for node in model.graph}, 32, passed)


def test_offer_is_widest_grid_first_then_fp32():
    offer = _offer(_model())
    for site in offer.sites:
        options = offer.candidates[site.name]
        assert [c.method for c in options] == ["uint8", "uint4", "uint2", "fp32"]
        uint8, uint4, uint2, fp32 = (c.bytes_after for c in options)
        assert uint2 < uint4 < uint8 < fp32 == site.bytes
        errors = [c.predicted_error() for c in options[:3]]
        assert errors == sorted(errors) and options[-1].predicted_error() == 0


def test_rule_takes_the_asked_grid_or_the_fewest_bits_within_the_layer_budget():
    offer = _offer(_model())
    chosen, reasons = quant_rule(offer, 4, None)
    assert {c.method for c in chosen.values()} == {"uint4"} and not reasons
    budget = 0.05  # between the 4-bit and 8-bit errors of a Gaussian layer
    chosen, reasons = quant_rule(offer, 2, budget)
    for site, pick in chosen.items():
        assert pick.predicted_error() <= budget and pick.method in ("uint8", "uint4")
        assert "fewest bits" in reasons[site]
    chosen, reasons = quant_rule(offer, 4, 1e-9)
    assert {c.method for c in chosen.values()} == {"fp32"} and all("8-bit error" in r for r in reasons.values())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_rewrite_runs_in_onnxruntime_as_the_numpy_grid_network(bits):
    model = _model()
    x = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    weights = {name: model.graph.initializers[name].const_value.numpy() for name in ("W1", "W2")}
    biases = {name: model.graph.initializers[name].const_value.numpy() for name in ("b1", "b2")}
    offer = _offer(model)
    chosen, _ = quant_rule(offer, bits, None)
    offer.rewrite(chosen)(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]  # whole blocks: onnxruntime's own layout
    assert len(nbits) == 2 and {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {bits}
    (y,) = run_all(session_for_model(model), [{"x": x}])[0].values()
    w1, w2 = (quantize_grid(weights[w], 32, bits).dequantize() for w in ("W1", "W2"))
    expected = np.maximum(x @ w1 + biases["b1"], 0) @ w2 + biases["b2"]
    # onnxruntime's MatMulNBits runs with int8 activations (accuracy level 4): a few 1e-3 relative
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 2e-2


def test_encode_grid_error_is_the_calibrated_output_error_without_stats():
    weight = np.random.default_rng(0).standard_normal((64, 8))
    encoded = encode_grid(weight, None, 32, 4)
    approx = encoded.weight.dequantize()
    assert encoded.relative_error == pytest.approx(np.linalg.norm(weight - approx) / np.linalg.norm(weight))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_symmetric_grid_keeps_each_blocks_extreme_and_zero_exact(bits):
    weight = np.random.default_rng(bits).standard_normal((100, 30))
    weight[7] = 0.0
    quantized = quantize_grid(weight, 32, bits, symmetric=True)
    assert np.all(quantized.zero_points == 1 << (bits - 1)) and quantized.symmetric
    approx, step = quantized.dequantize(), np.abs(np.repeat(quantized.scales, 32, axis=0)[:100])
    assert np.all(approx[7] == 0.0)
    assert np.all(np.abs(approx - weight) <= step + 1e-12)  # one side of zero reaches 2^(bits-1) - 1 steps only
    for start in range(0, 100, 32):
        block = weight[start:start + 32]
        extreme = np.argmax(np.abs(block), axis=0)
        columns = np.arange(30)
        np.testing.assert_allclose(approx[start:start + 32][extreme, columns], block[extreme, columns], rtol=1e-12)


def _embedding_model(vocab: int = 200, width: int = 64, tied: bool = False) -> ir.Model:
    """ids -> Gather(E) -> MatMul(W) -> y; `tied`: the output is MatMul(h, Transpose(E)) instead, E read twice."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((vocab, width)) * 0.1).astype(np.float32)
    weight = (rng.standard_normal((width, width)) * 0.1).astype(np.float32)
    nodes = [onnx.helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             onnx.helper.make_node("MatMul", ["h", "W"], ["z"], name="proj")]
    if tied:
        nodes += [onnx.helper.make_node("Transpose", ["E"], ["Et"], name="head_t", perm=[1, 0]),
                  onnx.helper.make_node("MatMul", ["z", "Et"], ["y"], name="head")]
    else:
        nodes.append(onnx.helper.make_node("Identity", ["z"], ["y"], name="out"))
    graph = onnx.helper.make_graph(
        nodes, "embedding", [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "t"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "t", "n"])],
        [onnx.numpy_helper.from_array(table, "E"), onnx.numpy_helper.from_array(weight, "W")])
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, True), (4, False), (2, True)])
def test_gather_tables_become_gather_block_quantized_with_the_numpy_grids_rows(bits, symmetric):
    model = _embedding_model()
    table, weight = (model.graph.initializers[name].const_value.numpy() for name in ("E", "W"))
    sites, passed = find_weight_sites(model, tables=True)
    assert [(s.node, s.op, s.rows, s.cols) for s in sites] == [("embed", "Gather", 64, 200), ("proj", "MatMul", 64, 64)]
    offer = grid_offer(sites, {}, {node.name: node for node in model.graph}, 32, passed, symmetric=symmetric)
    chosen, _ = quant_rule(offer, bits, None)
    offer.rewrite(chosen)(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    lookups = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookups) == 1 and lookups[0].domain == "com.microsoft" and lookups[0].name == "embed"
    assert (f"E.uint{bits}.zero_points" in {t.name for t in proto.graph.initializer}) != symmetric
    assert "E" not in {t.name for t in proto.graph.initializer}  # the fp32 table is gone
    ids = np.array([[0, 199, 5], [7, 7, 1]], np.int64)
    session = session_for_model(model)
    rows = quantize_grid(table.T, 32, bits, symmetric).dequantize().T[ids]
    (y,) = run_all(session, [{"ids": ids}])[0].values()
    expected = rows @ quantize_grid(weight, 32, bits, symmetric).dequantize()
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 2e-2  # MatMulNBits' int8 activations


@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, False), (2, False)])
def test_a_tied_head_and_its_table_share_one_set_of_codes(bits, symmetric):
    """Gather(E) and MatMul(z, Transpose(E)): one site (the head's), one copy of the codes, read by
    GatherBlockQuantized and MatMulNBits; onnxruntime and the executor give the numpy grid's numbers."""
    model = _embedding_model(tied=True)
    table, weight = (model.graph.initializers[name].const_value.numpy() for name in ("E", "W"))
    sites, passed = find_weight_sites(model, tables=True)
    assert [(s.node, s.tied, s.rows, s.cols) for s in sites] == [("proj", None, 64, 64), ("head", "embed", 64, 200)]
    assert "tied head head" in passed["embed"]
    offer = grid_offer(sites, {}, {node.name: node for node in model.graph}, 32, passed, symmetric=symmetric)
    chosen, _ = quant_rule(offer, bits, None)
    offer.rewrite(chosen)(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert ops["embed"] == "GatherBlockQuantized" and ops["head"] == "MatMulNBits" and "head_t" not in ops
    codes = [t for t in proto.graph.initializer if t.name.startswith("E.")]
    assert sum(t.name.endswith(".data") for t in codes) == 1 and "E" not in {t.name for t in proto.graph.initializer}
    ids = np.array([[0, 199, 5], [7, 7, 1]], np.int64)
    approx_table = quantize_grid(table.T, 32, bits, symmetric).dequantize().T
    z = approx_table[ids] @ quantize_grid(weight, 32, bits, symmetric).dequantize()
    expected = z @ approx_table.T
    (y,) = run_all(session_for_model(model), [{"ids": ids}])[0].values()
    assert np.linalg.norm(y - expected) / np.linalg.norm(expected) < 2e-2  # int8 activations in MatMulNBits
    executed = Executor(model).run({"ids": ids})["y"]
    np.testing.assert_allclose(executed, expected, rtol=1e-4, atol=1e-5)


def test_a_table_read_otherwise_twice_is_passed_over_as_tied():
    proto = ir.to_proto(_embedding_model())
    proto.graph.node.append(onnx.helper.make_node("Gather", ["E", "ids"], ["h2"], name="embed2"))
    sites, passed = find_weight_sites(ir.from_proto(proto), tables=True)
    assert [s.node for s in sites] == ["proj"] and "tied" in passed["embed"] and "tied" in passed["embed2"]
    assert find_weight_sites(_embedding_model(), tables=False)[0][0].node == "proj"


def test_integer_tables_are_no_sites_and_a_grid_that_cannot_hold_a_table_gives_the_next_wider():
    proto = ir.to_proto(_embedding_model(width=75))  # rows of 75: whole bytes at 8 bits only
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(400, dtype=np.int64).reshape(200, 2), "T"))
    proto.graph.node.append(onnx.helper.make_node("Gather", ["T", "ids"], ["t"], name="lookup_ints"))
    model = ir.from_proto(proto)
    sites, passed = find_weight_sites(model, tables=True, min_elements=0)
    assert [s.node for s in sites] == ["embed", "proj"] and "lookup_ints" not in passed
    offer = grid_offer(sites, {}, {node.name: node for node in model.graph}, 32, passed)
    assert [c.method for c in offer.candidates["embed"]] == ["uint8", "fp32"]
    chosen, reasons = quant_rule(offer, 4, None)
    assert chosen["embed"].method == "uint8" and "8 bits" in reasons["embed"]
    assert chosen["proj"].method == "uint4" and "proj" not in reasons


def test_codes_matmulnbits_cannot_hold_stay_behind_dequantize_linear():
    """Per-column scales and a short last block: DequantizeLinear -> MatMul at opset 25 (unpadded in the file);
    whole blocks: MatMulNBits."""
    for block, op in ((None, "DequantizeLinear"), (128, "DequantizeLinear"), (32, "MatMulNBits")):
        model = _model()  # K = 64 and 256: blocks of 128 leave the first layer ragged
        sites, passed = find_weight_sites(model)
        offer = grid_offer(sites, {}, {node.name: node for node in model.graph}, block, passed)
        offer.rewrite(quant_rule(offer, 4, None)[0])(model)
        ops = [n.op_type for n in model.graph]
        assert op in ops and (model.opset_imports[""] == 25) == (op == "DequantizeLinear")


def test_a_tied_pair_whose_head_cannot_read_the_blocks_stays_fp32_and_says_why():
    model = _embedding_model(width=96, tied=True)  # per-column: one block of 128 over 96 columns, not whole
    sites, passed = find_weight_sites(model, tables=True)
    offer = grid_offer(sites, {}, {node.name: node for node in model.graph}, None, passed)
    assert [c.method for c in offer.candidates["head"]] == ["fp32"]
    chosen, reasons = quant_rule(offer, 4, None)
    assert chosen["head"].method == "fp32" and "whole blocks of 128" in passed["embed"]
