"""The hybrid runtime on the CPU: onnxruntime's CPU provider for the standard segments, the kernels' numpy references
for the packed nodes. Its outputs against the node-by-node executor and onnxruntime; its partitions and host-device
copies against the plan (the copies on `strict_device`, which stands in for a GPU)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.calibration.feeds import load_feeds
from symshrink.cli import main
from symshrink.errors import BadInput
from symshrink.runtime.backend import cpu_backend, cuda_backend, gpu_available
from symshrink.runtime.diff import compare_outputs
from symshrink.runtime.executor import Executor
from symshrink.runtime.formats import DEQUANTIZE_OPSET, dequantize_arrays, ternarize
from symshrink.runtime.hybrid import HybridRunner, open_runtime, probe_capabilities
from symshrink.runtime.ort import input_specs, make_session, run_all
from symshrink.runtime.partition import DEVICE, HOST, Capabilities, Moves, plan_partitions
from tests.runtime.compressed_models import compressed_fmnist
from tests.runtime.strict_device import strict_backend

# The kernels are the executor's (the same numpy references); onnxruntime and numpy differ in the standard ops'
# summation order only: measured 0 (fmnist-mlp), 2.6e-7 and 4.5e-7 (minilm-l3 ternary and hyper)
HYBRID_REL_L2 = 1e-5
# onnxruntime's MatMulNBits quantises activations to int8 (accuracy level 4), the executor's op does not: measured
# 5.0e-3 (fmnist-mlp, 2-bit), 1.2e-2 (minilm-l3, 4-bit)
INT8_ACTIVATIONS_REL_L2 = 2e-2
# A device whose onnxruntime runs MatMulNBits at 8 bits only (and no GatherBlockQuantized): the 2- and 4-bit nodes
# become packed nodes, as on a CUDA provider without them
NARROW_PROVIDER = Capabilities("narrow", {"com.microsoft::MatMulNBits": frozenset({8}),
                                          "com.microsoft::GatherBlockQuantized": frozenset()})
VARIANTS = {  # name: compress flags, capabilities, packed kernels
    "ternary": (["--method", "ternary"], None, {"ternary_matmul": 2}),
    "ternary-function": (["--method", "ternary", "--storage", "function"], None, {"ternary_matmul": 2}),
    "hyper": (["--method", "hyper", "--index-bits", "10", "--tensor-error", "0.1"], None, {"hyper_matmul": 2}),
    "grid-2bit": (["--method", "quant", "--bits", "2", "--zero-points"], None, {}),
    # fc1 as MatMulNBits; fc0 (784 rows, not whole blocks of 64) as DequantizeLinear, which stays standard
    "grid-2bit-narrow": (["--method", "quant", "--bits", "2", "--zero-points"], NARROW_PROVIDER,
                         {"grid_matmul_b2": 1}),
}


def _rel_l2(reference: list[dict], outputs: list[dict]) -> float:
    return max(d.rel_l2 for d in compare_outputs(reference, outputs))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict[str, str]:
    return compressed_fmnist(tmp_path_factory.mktemp("hybrid"), {name: flags for name, (flags, _, _) in VARIANTS.items()})


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"input": rng.standard_normal((rows, 784)).astype(np.float32)} for rows in (16, 1)]


def test_the_probe_finds_what_the_cpu_provider_runs_packed():
    capabilities = probe_capabilities("cpu")
    assert {2, 4, 8} <= capabilities.widths["com.microsoft::MatMulNBits"]
    assert {4, 8} <= capabilities.widths["com.microsoft::GatherBlockQuantized"]
    assert "MatMulNBits 2/4/8-bit" in capabilities.line()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hybrid_equals_the_executor_and_onnxruntime(compressed, variant):
    _, capabilities, kernels = VARIANTS[variant]
    model = ir.load(compressed[variant])
    runner = HybridRunner(model, capabilities=capabilities)
    assert runner.summary().kernels == kernels
    outputs = [runner.run(feed) for feed in _feeds()]
    grid = variant.startswith("grid")  # onnxruntime fuses fc0's DequantizeLinear and MatMul into MatMulNBits
    assert _rel_l2([Executor(model).run(feed) for feed in _feeds()], outputs) <= (
        INT8_ACTIVATIONS_REL_L2 if grid else HYBRID_REL_L2)
    if grid:  # onnxruntime's own graph, MatMulNBits fused as in the hybrid's segments (the narrow one runs fc1's op)
        session, tolerance = make_session(compressed[variant]), INT8_ACTIVATIONS_REL_L2 if capabilities else HYBRID_REL_L2
    else:  # onnxruntime's unfused graph: the ONNX semantics in float32
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(compressed[variant], options, providers=["CPUExecutionProvider"])
        tolerance = HYBRID_REL_L2
    assert _rel_l2(run_all(session, _feeds()), outputs) <= tolerance


@pytest.mark.parametrize("variant", VARIANTS)
def test_copies_between_host_and_device_are_what_the_plan_says(compressed, variant):
    """onnxruntime's CPU provider on the host, the packed nodes on a stand-in device: each packed segment takes its
    input up and hands its product down, and the run counts exactly the plan's copies; the outputs are the CPU's."""
    _, capabilities, kernels = VARIANTS[variant]
    model = ir.load(compressed[variant])
    backend = strict_backend()
    runner = HybridRunner(model, backend, capabilities=capabilities)
    on_cpu = HybridRunner(model, capabilities=capabilities)
    predicted = runner.plan.moves(HOST, DEVICE)
    packed = runner.plan.count("packed")
    assert predicted == (Moves(packed, packed) if kernels else Moves(0, 0))  # a chain: one value in, one out
    assert on_cpu.summary().moves == Moves(0, 0)
    for feed in _feeds():
        before = backend.xp.downloads
        outputs = runner.run(feed)
        assert runner.moves == predicted
        assert backend.xp.downloads - before == predicted.downloads
        for name, expected in on_cpu.run(feed).items():
            np.testing.assert_array_equal(outputs[name], expected)
    sessions = [engine for _, engine in runner._runs if hasattr(engine, "_sessions")]
    assert len(sessions) == runner.plan.count("standard") and all(len(s._sessions) == 1 for s in sessions)


def _ternary_projection(rng, name: str, rows: int, cols: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x -> MatMul(x, DequantizeLinear(uint2 codes, scales, zero point 1)): what the ternary kernel fuses."""
    stored = dequantize_arrays(ternarize(rng.standard_normal((rows, cols)).astype(np.float32), 32).quantized())
    names = {key: f"{name}.{key}" for key in stored.arrays}
    dequantize = helper.make_node("DequantizeLinear", list(names.values()), [f"{name}.w"], **stored.attributes)
    matmul = helper.make_node("MatMul", ["h", f"{name}.w"], [name])
    return [dequantize, matmul], [numpy_helper.from_array(a, names[key]) for key, a in stored.arrays.items()]


def _attention_like() -> onnx.ModelProto:
    """h = Relu(x); q, k, v = three ternary projections of h; o = ternary(q * k + v)."""
    rng = np.random.default_rng(3)
    nodes, weights = [helper.make_node("Relu", ["x"], ["h"])], []
    for name in ("q", "k", "v"):
        more, tensors = _ternary_projection(rng, name, 64, 64)
        nodes += more
        weights += tensors
    nodes += [helper.make_node("Mul", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["mixed"])]
    more, tensors = _ternary_projection(rng, "o", 64, 32)
    more[1].input[0] = "mixed"
    graph = helper.make_graph(nodes + more, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["b", 32])], weights + tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEQUANTIZE_OPSET)])


def test_parallel_projections_share_one_packed_segment(tmp_path):
    model = ir.from_proto(_attention_like())
    plan = plan_partitions(model, probe_capabilities("cpu"))
    shapes = [(s.kind, sorted(n.outputs[0].name for n in s.nodes)) for s in plan.segments]
    assert shapes == [("standard", ["h"]), ("packed", ["k", "q", "v"]), ("standard", ["mixed", "qk"]),
                      ("packed", ["o"])]
    assert plan.segments[1].inputs == ("h",) and plan.segments[1].outputs == ("k", "q", "v")
    assert len(plan.dropped) == 4  # the DequantizeLinear nodes
    assert plan.moves(HOST, DEVICE) == Moves(uploads=2, downloads=4)  # h and mixed up; q, k, v and o down
    assert plan.moves(DEVICE, DEVICE) == Moves(uploads=1, downloads=1)  # the feed up, the output down
    path = tmp_path / "attention.onnx"
    onnx.save(_attention_like(), path)
    feed = {"x": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)}
    runner = HybridRunner(ir.load(path), strict_backend())
    (output,) = runner.run(feed).values()
    assert runner.moves == Moves(2, 4)
    (expected,) = make_session(path, optimize=False).run(None, feed)  # unfused: float32 activations
    assert np.linalg.norm(output - expected) <= HYBRID_REL_L2 * np.linalg.norm(expected)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU (cupy.cuda.is_available() is False)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_hybrid_on_the_gpu(compressed, variant):
    """The packed nodes as CUDA kernels; the standard segments on onnxruntime's CUDA provider through IOBinding over
    CuPy memory where onnxruntime-gpu is installed, else on its CPU provider (values copied at each boundary): the
    CPU hybrid's outputs, and the plan's copies."""
    _, capabilities, kernels = VARIANTS[variant]
    provider = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    model = ir.load(compressed[variant])
    runner = HybridRunner(model, cuda_backend(), provider, capabilities=capabilities)
    on_cpu = HybridRunner(model, capabilities=capabilities)
    outputs = [runner.run(feed) for feed in _feeds()]
    assert runner.moves == runner.summary().moves
    if capabilities or not variant.startswith("grid"):  # (which MatMulNBits widths are packed: the provider's say)
        assert runner.summary().kernels == kernels
    if provider == "cuda":  # no copies between segments: only the feed up and the outputs down
        assert runner.moves == Moves(1, 1)
        sessions = [s for _, engine in runner._runs if hasattr(engine, "_sessions") for s in engine._sessions.values()]
        assert all(s.get_providers()[0] == "CUDAExecutionProvider" for s in sessions)
    int8_on_one_side = provider == "cuda" and variant.startswith("grid")  # the CPU's MatMulNBits quantises x
    assert _rel_l2([on_cpu.run(feed) for feed in _feeds()], outputs) <= (
        INT8_ACTIVATIONS_REL_L2 if int8_on_one_side else HYBRID_REL_L2)


def _edge_model(case: str) -> onnx.ModelProto:
    """x -> ternary projection q, then: "constant-nodes": its codes and scales from Constant nodes (the decode and
    they are dropped); "dead": a node nothing reads after it; "if": an If whose branches read q from the outer scope;
    "empty": the graph's second input, of 0 rows, concatenated to q."""
    rng = np.random.default_rng(5)
    nodes, weights = _ternary_projection(rng, "q", 64, 64)
    nodes[1].input[0] = "x"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])]
    output = "q"
    if case == "constant-nodes":
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in weights] + nodes
        weights = []
    elif case == "dead":
        nodes.append(helper.make_node("Relu", ["q"], ["unread"]))
    elif case == "if":
        branch = {name: helper.make_graph([helper.make_node(op, ["q"], [name])], name, [],
                                          [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)])
                  for name, op in (("then", "Relu"), ("else", "Neg"))}
        nodes += [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                  helper.make_node("Greater", ["total", "zero"], ["positive"]),
                  helper.make_node("If", ["positive"], ["y"], then_branch=branch["then"], else_branch=branch["else"])]
        weights.append(numpy_helper.from_array(np.array(0, np.float32), "zero"))
        output = "y"
    elif case == "empty":
        inputs.append(helper.make_tensor_value_info("more", TensorProto.FLOAT, ["n", 64]))
        nodes.append(helper.make_node("Concat", ["q", "more"], ["y"], axis=0))
        output = "y"
    graph = helper.make_graph(nodes, case, inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEQUANTIZE_OPSET)])


@pytest.mark.parametrize("case", ["constant-nodes", "dead", "if", "empty"])
def test_edge_graphs_run_as_planned(tmp_path, case):
    path = tmp_path / f"{case}.onnx"
    onnx.save(_edge_model(case), path)
    feed = {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    if case == "empty":
        feed["more"] = np.zeros((0, 64), np.float32)
    runner = HybridRunner(ir.load(path), strict_backend())
    assert runner.summary().kernels == {"ternary_matmul": 1}
    (output,) = runner.run(feed).values()
    assert runner.moves == runner.summary().moves
    (expected,) = make_session(path, optimize=False).run(None, feed)
    assert output.shape == expected.shape
    assert np.linalg.norm(output - expected) <= HYBRID_REL_L2 * np.linalg.norm(expected)


def test_open_runtime_picks_the_engine(compressed):
    model = ir.load(compressed["hyper"])
    assert isinstance(open_runtime(model, cpu_backend()), HybridRunner)
    assert isinstance(open_runtime(model, cpu_backend(), "executor"), Executor)
    with pytest.raises(BadInput, match="unknown engine"):
        open_runtime(model, cpu_backend(), "tensorrt")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BadInput, match="CUDA provider is not installed"):
            HybridRunner(model, provider="cuda")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "tables"), [(["--method", "hyper", "--index-bits", "10"], 1),
                                               (["--method", "ternary"], 0),  # the tables stay float
                                               (["--method", "quant", "--bits", "4"], 1)],
                         ids=["hyper", "ternary", "grid-4bit"])
def test_minilm_l3_hybrid(tmp_path, method, tables):
    """A real transformer (3 layers) compressed on Lee sentences: a layer's Q, K and V projections share a packed
    segment, so each layer adds 4 packed segments (QKV, output, FFN in, FFN out), and the token and position tables
    one more where they are coded; the outputs are the executor's and onnxruntime's."""
    path = tmp_path / "l3.onnx"
    assert main(["compress", "minilm-l3", "-o", str(path), "-q", "--calib", "lee", "--calib-samples", "16",
                 "--min-cosine", "0", *method]) == 0
    model = ir.load(path)
    capabilities = NARROW_PROVIDER if "quant" in method else None
    runner = HybridRunner(model, capabilities=capabilities)
    assert runner.plan.count("packed") == tables + 4 * 3 and runner.plan.count("standard") == 1 + tables + 4 * 3
    feeds = load_feeds("lee", input_specs(make_session(path)), "eval", 3)
    outputs = [runner.run(feed) for feed in feeds]
    assert _rel_l2([Executor(model).run(feed) for feed in feeds], outputs) <= HYBRID_REL_L2
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if "quant" not in method:  # MatMulNBits in onnxruntime quantises activations, the runtime's op does not
        assert _rel_l2(run_all(session, feeds), outputs) <= HYBRID_REL_L2
