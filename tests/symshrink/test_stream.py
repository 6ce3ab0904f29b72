"""Block by block: the partition, streamed runs equal to whole-model sessions, the spool, lazy weights, and
--stream writing the same bytes as the whole-model run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.cli import main
from symshrink.errors import BadInput
from symshrink.lazyweights import slim_proto
from symshrink.modelio import load_model
from symshrink.options import options_from
from symshrink.passes.analysis.blocks import partition
from symshrink.runtime.ort import run_all
from symshrink.runtime.subgraph import node_reads
from symshrink.stream import Spool, stream_outputs

D, HIDDEN, LAYERS = 32, 128, 6
LAYER_BYTES = 2 * D * HIDDEN * 4


def residual_mlp(layers: int = LAYERS, seed: int = 0, branch: bool = False) -> onnx.ModelProto:
    """x [?, D] -> layers of x + W2 relu(W1 x); with `branch`, an If after them whose branches read outer values."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32), f"W1_{i}"),
                  numpy_helper.from_array((rng.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN)).astype(np.float32), f"W2_{i}")]
        nodes += [helper.make_node("MatMul", [x, f"W1_{i}"], [f"h{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"W2_{i}"], [f"d{i}"], name=f"down{i}"),
                  helper.make_node("Add", [x, f"d{i}"], [f"x{i}"], name=f"res{i}")]
        x = f"x{i}"
    if branch:
        then = helper.make_graph([helper.make_node("Add", [x, "x"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
        other = helper.make_graph([helper.make_node("Sub", [x, "x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
        inits.append(numpy_helper.from_array(np.array(True), "flag"))
        nodes.append(helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then, else_branch=other))
    else:
        nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int = 3, rows: int = 16) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, D)).astype(np.float32)} for _ in range(count)]


@pytest.fixture
def residual_path(tmp_path) -> Path:
    path = tmp_path / "res.onnx"
    onnx.save(residual_mlp(), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((160, D)).astype(np.float32))
    return path


def test_blocks_cover_the_graph_in_order_within_the_budget_and_cut_where_one_value_is_live():
    model = ir.from_proto(residual_mlp())
    blocks = partition(model.graph, 2 * LAYER_BYTES)
    assert [n for b in blocks for n in b.nodes] == list(model.graph)
    assert all(b.weight_bytes <= 2 * LAYER_BYTES for b in blocks)
    assert len(blocks) == 3  # two layers a block
    for before, after in zip(blocks, blocks[1:]):
        assert set(after.inputs) <= set(before.outputs) | set(before.carried)
        assert len(after.inputs) == 1  # the residual stream alone


def test_a_node_heavier_than_the_budget_is_a_block_of_its_own():
    model = ir.from_proto(residual_mlp(layers=2))
    blocks = partition(model.graph, LAYER_BYTES // 4)
    heavy = [b for b in blocks if b.weight_bytes > LAYER_BYTES // 4]
    assert heavy and all(len(b.nodes) == 1 for b in heavy)


@pytest.mark.parametrize("budget", [1, LAYER_BYTES, 10 * LAYER_BYTES])
def test_streamed_outputs_equal_the_whole_model_session(budget):
    proto = residual_mlp(branch=True)
    expected = run_all(make_session_from(proto), _feeds())
    outputs = stream_outputs(ir.from_proto(proto), _feeds(), block_bytes=budget)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)


def make_session_from(proto: onnx.ModelProto, tmp: Path | None = None):
    import onnxruntime as ort  # noqa: PLC0415

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_subgraph_reads_outer_values():
    model = ir.from_proto(residual_mlp(layers=1, branch=True))
    branch = next(node for node in model.graph if node.op_type == "If")
    assert {"x", "x0", "flag"} <= node_reads(branch)


def test_the_spool_goes_to_disk_past_its_limit_and_cleans_up():
    spool = Spool(memory_bytes=0)
    arrays = _feeds(2)
    for feed in arrays:
        spool.append(feed)
    stored = spool.feeds[0]["x"]
    assert isinstance(stored, np.memmap) and np.array_equal(stored, arrays[0]["x"])
    folder = Path(spool._folder.name)
    spool.close()
    assert not folder.exists()


@pytest.mark.parametrize("external", [False, True])
def test_lazy_weights_equal_the_loaded_ones_and_stay_on_disk(tmp_path, external):
    path = tmp_path / "m.onnx"
    onnx.save(residual_mlp(), path, save_as_external_data=external, location="m.onnx.data")
    slim = slim_proto(path)
    assert slim.ByteSize() < 4096  # the graph without its weights
    lazy, _ = load_model(path, lazy=True)
    loaded, _ = load_model(path)
    for name, value in loaded.graph.initializers.items():
        tensor = lazy.graph.initializers[name].const_value
        assert isinstance(tensor, ir.ExternalTensor)
        assert np.array_equal(tensor.numpy(), value.const_value.numpy())


@pytest.mark.parametrize("cut", [1, 10, 100, 1000])
def test_a_truncated_file_is_refused_by_the_lazy_reader(tmp_path, cut):
    path = tmp_path / "m.onnx"
    data = residual_mlp().SerializeToString()
    path.write_bytes(data[:len(data) - cut])
    with pytest.raises(BadInput, match="not an ONNX model or truncated"):
        load_model(path, lazy=True)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("external", [False, True])
def test_stream_writes_the_bytes_of_the_whole_model_run(residual_path, tmp_path, capsys, external):
    if external:
        onnx.save(onnx.load(residual_path), residual_path, save_as_external_data=True, location="res.onnx.data")
    before = _digest(residual_path)
    common = ["compress", residual_path, "--method", "quant", "--bits", "4", "--calib", tmp_path / "calib.npz", "-q",
              "--min-cosine", "0.9"]
    assert main([str(a) for a in [*common, "-o", tmp_path / "whole.onnx", "--no-stream"]]) == 0
    assert main([str(a) for a in [*common, "-o", tmp_path / "blocks.onnx", "--stream", "--block-bytes",
                                  str(LAYER_BYTES)]]) == 0
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "blocks.onnx").read_bytes()
    assert _digest(residual_path) == before
    written = onnx.load(tmp_path / "blocks.onnx")
    onnx.checker.check_model(written)
    assert not any(t.external_data for t in written.graph.initializer)  # nothing points back at the input
    assert not {t.name for t in written.graph.initializer} & {f"W{k}_{i}" for k in (1, 2) for i in range(LAYERS)}


def test_stream_refuses_the_allocator_and_other_methods():
    with pytest.raises(BadInput, match="--stream"):
        options_from(stream=True)
    with pytest.raises(BadInput, match="--stream"):
        options_from(stream=True, method="ternary")
    assert options_from(stream=True, method="quant", bits=4).streamable()


def test_a_local_cluster_writes_the_bytes_of_the_single_process_run(residual_path, tmp_path, capsys):
    pytest.importorskip("distributed")
    common = ["compress", residual_path, "--method", "quant", "--bits", "4", "--calib", tmp_path / "calib.npz", "-q",
              "--min-cosine", "0.9", "--stream", "--block-bytes", str(LAYER_BYTES)]
    assert main([str(a) for a in [*common, "-o", tmp_path / "one.onnx"]]) == 0
    assert main([str(a) for a in [*common, "-o", tmp_path / "two.onnx", "--cluster", "local:2"]]) == 0
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()


@pytest.mark.parametrize("argv, expected", [
    (["--cluster", "local:2"], "--cluster runs the encodings of --stream"),
    (["--stream", "--cluster", "local:x"], "local:N takes a number of workers"),
    (["--stream", "--block-bytes", "lots"], "--block-bytes must be a number of bytes"),
])
def test_cluster_and_block_options_are_checked(residual_path, tmp_path, capsys, argv, expected):
    code = main([str(a) for a in ["compress", residual_path, "-o", tmp_path / "o.onnx", "--method", "quant", "--bits",
                                  "4", "--random-calib", "-q", *argv]])
    assert code == 2 and expected in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_l3_block_by_block_writes_the_whole_model_runs_bytes(tmp_path, capsys):
    """A real model (tied-free BERT encoder, 6 blocks at 8 MB): --stream and the whole-model run agree to the byte."""
    common = ["compress", "minilm-l3", "--method", "quant", "--bits", "4", "--calib", "lee", "--calib-samples", "40",
              "-q", "--min-cosine", "0.9"]
    assert main([*common, "-o", str(tmp_path / "whole.onnx"), "--no-stream"]) == 0
    assert main([*common, "-o", str(tmp_path / "blocks.onnx"), "--stream", "--block-bytes", "8MB"]) == 0
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "blocks.onnx").read_bytes()


def test_the_api_streams_a_file_and_returns_a_self_contained_model(residual_path, tmp_path):
    from symshrink.api import compress  # noqa: PLC0415

    calib = [{"x": np.random.default_rng(3).standard_normal((16, D)).astype(np.float32)} for _ in range(10)]
    streamed, report = compress(str(residual_path), calib, method="quant", bits=4, min_cosine=0.9, stream=True,
                                block_bytes=LAYER_BYTES, progress=False)
    whole, _ = compress(str(residual_path), calib, method="quant", bits=4, min_cosine=0.9, stream=False, progress=False)
    assert report.passed and streamed.SerializeToString() == whole.SerializeToString()
    assert not any(t.external_data for t in streamed.graph.initializer)
    with pytest.raises(BadInput, match="give its path"):
        compress(onnx.load(residual_path), calib, method="quant", bits=4, stream=True)


def test_a_task_budget_is_not_streamed(residual_path, tmp_path, capsys):
    assert not options_from(method="quant", bits=4, max_loss=0.01, task=lambda s: 1.0).streamable()


def _biased_mlp(tail: bool = False, initializer_output: bool = False) -> onnx.ModelProto:
    """x -> MatMul W (its own block) -> Add b (the next block) -> Relu -> MatMul W2; with `tail`, a Cast after the
    last site's block; with `initializer_output`, b is a graph output too."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((D, HIDDEN)) / np.sqrt(D)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "b"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, D)) / np.sqrt(HIDDEN)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "W2"], ["y0"], name="fc2"),
             helper.make_node("Cast" if tail else "Identity", ["y0"], ["y"], name="tail", **({"to": 1} if tail else {}))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", D])]
    if initializer_output:
        outputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, [HIDDEN]))
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])], outputs,
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tail, initializer_output", [(False, False), (True, False), (False, True)])
def test_stream_cuts_between_a_product_and_its_bias_and_after_the_last_site(tmp_path, capsys, tail, initializer_output):
    """One block a node: the bias Add is the next block's (it is fused into the product once that block has run),
    a block without sites after the last one, a graph output that is a weight."""
    path = tmp_path / "m.onnx"
    onnx.save(_biased_mlp(tail, initializer_output), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(5).standard_normal((64, D)).astype(np.float32))
    common = ["compress", path, "--method", "quant", "--bits", "4", "--calib", tmp_path / "calib.npz", "-q",
              "--min-cosine", "0.5"]
    assert main([str(a) for a in [*common, "-o", tmp_path / "whole.onnx", "--no-stream"]]) == 0
    assert main([str(a) for a in [*common, "-o", tmp_path / "blocks.onnx", "--stream", "--block-bytes", "1"]]) == 0
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "blocks.onnx").read_bytes()


def test_an_unreachable_cluster_is_one_sentence(residual_path, tmp_path, capsys):
    pytest.importorskip("distributed")
    code = main([str(a) for a in ["compress", residual_path, "-o", tmp_path / "o.onnx", "--method", "quant", "--bits",
                                  "4", "--random-calib", "-q", "--stream", "--cluster", "tcp://127.0.0.1:notaport"]])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Dask scheduler" in err and len(err.strip().splitlines()) <= 2
