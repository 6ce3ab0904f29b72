"""Compressed graphs on the symshrink runtime: which nodes become kernels, and outputs against onnxruntime.

fmnist-mlp (shipped in the package) is compressed by the CLI in each storage form (random calibration); the
executor's output is compared with onnxruntime running the same file with graph optimisations off (the ONNX
semantics: with them on, onnxruntime's fused 2-bit MatMulNBits differs from its own unfused
DequantizeLinear + MatMul by 4e-3 relative on this model), and the fused kernels with the executor running
the function bodies unfused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.calibration.feeds import load_feeds
from symshrink.cli import main
from symshrink.models.registry import cache_dir, get_model
from symshrink.passes.hyper.codes import HyperPass, plan_tensors
from symshrink.passes.hyper.search import HyperSetting
from symshrink.runtime.backend import cuda_backend, gpu_available
from symshrink.runtime.diff import compare_outputs, format_diffs
from symshrink.runtime.executor import Executor
from symshrink.runtime.ort import input_specs, run_all
from tests.runtime.compressed_models import compressed_fmnist
from tests.runtime.strict_device import strict_backend

# float32 sums in another order than onnxruntime's over a depth of 784: rel L2 of the difference
FUSED_REL_L2 = 1e-5
VARIANTS = {  # name: (compress flags, kernel the MatMuls run as, function bodies left)
    "ternary-dequantize": (["--method", "ternary"], {"ternary_matmul": 2}, {}),
    "ternary-function": (["--method", "ternary", "--storage", "function"], {"ternary_matmul": 2}, {}),
    "ternary-base3": (["--method", "ternary", "--storage", "function-base3"], {"ternary_matmul": 2}, {}),
    "hyper": (["--method", "hyper", "--index-bits", "10", "--tensor-error", "0.1"], {"hyper_matmul": 2}, {}),
    # per-group centres and spans: groups of 128 pairs fill whole rows of 8 indices, and fuse
    "hyper-grouped": (["--method", "hyper", "--index-bits", "10", "--group-size", "256"], {"hyper_matmul": 2}, {}),
    # groups of 100 pairs split rows of 8 indices: the HyperDecodeGrouped body runs on the device at each call
    "hyper-grouped-100": (["--method", "hyper", "--index-bits", "10", "--group-size", "200"], {},
                          {"HyperDecodeGrouped": 2}),
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> dict[str, str]:
    return compressed_fmnist(tmp_path_factory.mktemp("compressed"),
                             {name: flags for name, (flags, _, _) in VARIANTS.items()})


def _feed() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((16, 784)).astype(np.float32)}


def _onnxruntime(path: str, feed: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernels_replace_the_weight_nodes(compressed, variant):
    onnx.checker.check_model(compressed[variant], full_check=True)
    summary = Executor(ir.load(compressed[variant])).summary()
    _, kernels, bodies = VARIANTS[variant]
    assert summary.kernels == kernels and summary.function_calls == bodies


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fuse", [True, False])
def test_outputs_match_onnxruntime(compressed, variant, fuse):
    feed = _feed()
    (output,) = Executor(ir.load(compressed[variant]), fuse=fuse).run(feed).values()
    assert output.dtype == np.float32
    assert _rel_l2(output, _onnxruntime(compressed[variant], feed)) <= FUSED_REL_L2


def test_fused_weights_stay_compressed_in_memory(compressed):
    """The executor holds the codes, not float weights: its constants are those of the file, within 10%; unfused
    too, where DequantizeLinear's 2-bit codes stay packed (`PackedConstant`) and are unpacked at each call."""
    original = get_model("fmnist-mlp").materialise(cache_dir())
    dense = Executor(ir.load(original)).summary().constant_bytes
    for variant, fuse in (("ternary-dequantize", True), ("hyper", True), ("ternary-dequantize", False)):
        held = Executor(ir.load(compressed[variant]), fuse=fuse).summary().constant_bytes
        coded = sum(v.const_value.nbytes for v in ir.load(compressed[variant]).graph.initializers.values())
        assert held < 0.2 * dense and abs(held - coded) <= 0.1 * coded


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU (cupy.cuda.is_available() is False)")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_runtime_matches_the_numpy_runtime(compressed, variant):
    feed = _feed()
    (on_gpu,) = Executor(ir.load(compressed[variant]), cuda_backend()).run(feed).values()
    (on_cpu,) = Executor(ir.load(compressed[variant])).run(feed).values()
    assert _rel_l2(on_gpu, on_cpu) <= FUSED_REL_L2


def _embedding_model(readers: str) -> onnx.ModelProto:
    """ids -> Gather(E [100, 64]) -> emb -> MatMul W [64, 32] -> y; "tied": a head reads E transposed too;
    "other-reader": E's columns are gathered too (axis 1: a reader no kernel takes); "as-activation": E is also
    the x of a fused MatMul(E, W), a slot no kernel takes."""
    rng = np.random.default_rng(3)
    arrays = {"E": rng.standard_normal((100, 64)).astype(np.float32),
              "W": rng.standard_normal((64, 32)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"]), helper.make_node("MatMul", ["emb", "W"], ["y"])]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if readers == "tied":
        nodes += [helper.make_node("Transpose", ["E"], ["Et"]), helper.make_node("MatMul", ["emb", "Et"], ["logits"])]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    if readers == "other-reader":
        arrays["columns"] = np.array([0, 63, 7], np.int64)
        nodes.append(helper.make_node("Gather", ["E", "columns"], ["picked"], axis=1))
        outputs.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan, codes = plan_tensors(model, [HyperSetting("lattice", 1023, 0, 4.0)], None, min_elements=2048)
    HyperPass(plan, codes)(model)
    if readers == "as-activation":  # (the pass would have left E float; the graph is edited after it)
        gather, matmul = list(model.graph)[-2:]
        product = ir.Value(name="EW")
        model.graph.append(ir.node("MatMul", [gather.inputs[0], matmul.inputs[1]], outputs=[product]))
        model.graph.outputs.append(product)
    return ir.to_proto(model)


READERS = {  # E's readers: (function bodies run, kernels)
    "gather": ({}, {"hyper_gather": 1, "hyper_matmul": 1}),
    "tied": ({}, {"hyper_gather": 1, "hyper_matmul": 1, "hyper_matmul_t": 1}),
    "other-reader": ({"HyperDecode": 1}, {"hyper_gather": 1, "hyper_matmul": 1}),
    "as-activation": ({"HyperDecode": 1}, {"hyper_gather": 1, "hyper_matmul": 2}),
}


@pytest.mark.parametrize("readers", READERS)
def test_coded_tables_fuse_into_every_reader(tmp_path, readers):
    """Gather from a coded table decodes only the rows read, bit-identical to onnxruntime's decode; a tied head
    reads the same codes transposed (one device copy); a reader no kernel takes makes the decode run."""
    path = tmp_path / "embedding.onnx"
    onnx.save(_embedding_model(readers), path)
    executor = Executor(ir.load(path))
    summary = executor.summary()
    assert (summary.function_calls, summary.kernels) == READERS[readers]
    coded = sum(v.const_value.nbytes for v in ir.load(path).graph.initializers.values())
    if not summary.function_calls:  # (where the decode runs too, it holds the file's own inputs as well)
        assert summary.constant_bytes <= coded  # the table's codes once, however many readers
    feed = {"ids": np.array([[0, 5, 99, -1], [-100, 7, 7, 42]], np.int64)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)
    outputs = list(executor.run(feed).values())
    np.testing.assert_array_equal(outputs[0], reference[0])
    for output, expected_output in zip(outputs[1:], reference[1:]):
        assert _rel_l2(output, expected_output) <= FUSED_REL_L2


# 3 transformer layers over real text: measured 2.8e-7 (ternary), 4.7e-7 (hyper) against onnxruntime unoptimised
ZOO_REL_L2 = 1e-5


@pytest.mark.parametrize(("method", "kernels"), [
    (["--method", "ternary"], {"ternary_matmul": 18}),
    (["--method", "hyper", "--index-bits", "10"], {"hyper_gather": 2, "hyper_matmul": 18}),
])
@pytest.mark.slow
def test_compressed_minilm_l3_on_lee_sentences(tmp_path, method, kernels):
    """A real transformer compressed by the CLI runs on the runtime with every weight in its kernel and
    reproduces onnxruntime (ONNX semantics, optimisations off) on real sentences."""
    path = tmp_path / "small.onnx"
    assert main(["compress", "minilm-l3", "-o", str(path), "-q", "--min-cosine", "0.5", *method]) == 0
    executor = Executor(ir.load(path))
    assert executor.summary().kernels == kernels and not executor.summary().function_calls
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = load_feeds("lee", input_specs(session), "eval", 3)
    reference = run_all(session, feeds)
    diffs = compare_outputs(reference, [executor.run(feed) for feed in feeds])
    assert max(d.rel_l2 for d in diffs) <= ZOO_REL_L2, format_diffs(diffs)


@pytest.mark.parametrize(("trans_b", "kernel"), [(1, "hyper_matmul_t"), (0, "hyper_matmul")])
def test_gemm_with_a_coded_weight_runs_its_kernel_and_bias(tmp_path, trans_b, kernel):
    """Gemm(x, W, C) as MobileNet's classifier has it (transB = 1), and without the transposition."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((48, 64) if trans_b else (64, 48)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=trans_b)], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])],
                              [numpy_helper.from_array(weight, "W"),
                               numpy_helper.from_array(rng.standard_normal(48).astype(np.float32), "C")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    plan, codes = plan_tensors(model, [HyperSetting("lattice", 1023, 0, 4.0)], None, min_elements=2048)
    HyperPass(plan, codes)(model)
    path = tmp_path / "gemm.onnx"
    ir.save(model, path)
    executor = Executor(ir.load(path))
    assert executor.summary().kernels == {kernel: 1} and not executor.summary().function_calls
    feed = {"x": rng.standard_normal((5, 64)).astype(np.float32)}
    (output,) = executor.run(feed).values()
    assert _rel_l2(output, _onnxruntime(str(path), feed)) <= FUSED_REL_L2


@pytest.mark.parametrize("variant", VARIANTS)
def test_placement_on_a_strict_stand_in_device(compressed, variant):
    """As in test_executor_zoo: no host array reaches a device op (the function bodies of the unfused codes
    included), and the outputs are the CPU backend's."""
    backend = strict_backend()
    feed = _feed()
    before = backend.xp.downloads
    (on_device,) = Executor(ir.load(compressed[variant]), backend).run(feed).values()
    assert backend.xp.downloads - before == 1
    (on_cpu,) = Executor(ir.load(compressed[variant])).run(feed).values()
    np.testing.assert_array_equal(on_device, on_cpu)
