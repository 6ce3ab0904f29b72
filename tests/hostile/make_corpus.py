"""A corpus of small hostile inputs for `symshrink compress` (issue 18, part 4).

`make_corpus(folder)` writes one sub-folder per case (models built with onnx.helper, a few KB to a few tens of
KB each) and returns the cases: the files written, the command line (paths relative to the case's folder), the
outcome the contract promises and, where one exists, the same request through the Python API. As a script:
`python tests/hostile/make_corpus.py FOLDER` writes the corpus and prints one line a case.

Outcomes:
- "exit 2": bad input; exit code 2 and one line on stderr that contains `phrase`.
- "skip-with-reason": the run leaves something alone and says why: exit `code` (0 or 2); with exit 0 the
  report printed by --json contains `phrase`, with exit 2 the one line on stderr does.
- "ok": exit 0, a valid output that runs in onnxruntime (the case is hostile, the model is still fine).
"""

from __future__ import annotations

import io
import math
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["Case", "ApiCall", "make_corpus", "CALIB", "MODEL", "OUT"]

MODEL, CALIB, OUT = "m.onnx", "calib.npz", "out.onnx"
WIDTH, HIDDEN, CLASSES, ROWS = 64, 64, 8, 32  # W1 is 64x64 = 4096 elements: a weight site; W2 stays below
OPSET = 17


@dataclass(frozen=True)
class ApiCall:
    """The same request through the Python API: `symshrink.api.compress(model, calibration, **kwargs)` or
    `symshrink.api.save(onnx.load(source), path, force=..., inputs=[...])`; paths relative to the case folder."""

    call: str  # "compress" or "save"
    model: str = MODEL  # compress: the model path; save: the model loaded and saved
    calibration: str | None = CALIB
    kwargs: dict = field(default_factory=dict)
    path: str = ""  # save: where to
    inputs: tuple[str, ...] = ()  # save: the paths that must never be written
    phrase: str = ""  # what BadInput's message contains (when it differs from the CLI's)


@dataclass(frozen=True)
class Case:
    name: str
    files: tuple[str, ...]  # what the case wrote into its folder (inputs: never modified)
    argv: tuple[str, ...]  # `symshrink` arguments, relative to the case folder
    expect: str  # "exit 2", "skip-with-reason" or "ok"
    phrase: str  # in the one line on stderr (exit 2) or the --json report (exit 0)
    code: int = 2  # the exit code
    about: str = ""  # the input, in words (docs/reliability.md)
    output: str | None = None  # the file a successful run writes (relative), if any
    keeps: tuple[str, ...] = ()  # op types the output must still hold (subgraphs included)
    api: ApiCall | None = None
    subprocess: bool = False  # run the CLI in a child process (the input could block a reader)
    outside: tuple[str, ...] = ()  # files outside the folder the case touches (their digests must not change)


# ------------------------------------------------------------------------------------------------ models


def _tensor(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _weights(seed: int = 0, width: int = WIDTH, hidden: int = HIDDEN, classes: int = CLASSES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W1": (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32),
            "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
            "W2": (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
            "b2": (rng.standard_normal(classes) * 0.1).astype(np.float32)}


def _mlp_nodes(x: str = "x", y: str = "y") -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [x, "W1"], ["h0"], name="fc1"),
            helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
            helper.make_node("Relu", ["h1"], ["h2"], name="act"),
            helper.make_node("MatMul", ["h2", "W2"], ["y0"], name="fc2"),
            helper.make_node("Add", ["y0", "b2"], [y], name="fc2_bias")]


def _model(nodes, inputs, outputs, initializers, opsets: dict[str, int] | None = None, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "hostile", inputs, outputs, initializers)
    opsets = opsets or {"": OPSET}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], **kwargs)


def _io(name: str, shape, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def mlp(batch: object = "batch", seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """x[batch, 64] -> MatMul W1 (64x64) -> Add -> Relu -> MatMul W2 (64x8) -> Add -> y."""
    return _model(_mlp_nodes(), [_io("x", [batch, WIDTH])], [_io("y", [batch, CLASSES])],
                  [_tensor(k, v) for k, v in _weights(seed).items()], {"": opset})


def _half_mlp(dtype: int) -> onnx.ModelProto:
    """The MLP with 16-bit float weights, input and output."""
    kind = {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}[dtype]
    tensors = []
    for name, array in _weights().items():
        tensors.append(helper.make_tensor(name, dtype, array.shape, array.astype(kind).tobytes(), raw=True))
    return _model(_mlp_nodes(), [_io("x", ["batch", WIDTH], dtype)], [_io("y", ["batch", CLASSES], dtype)], tensors)


def _calib(rows: int = ROWS, dtype: type = np.float32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(dtype)


def _inner_weight(name: str, seed: int) -> onnx.TensorProto:
    """A 64x64 weight of a subgraph (an If branch, a Loop or Scan body)."""
    return _tensor(name, (np.random.default_rng(seed).standard_normal((HIDDEN, HIDDEN)) / 8).astype(np.float32))


def _branch(name: str, weight: str, seed: int) -> onnx.GraphProto:
    """A subgraph x2 [batch, 64] (outer scope) -> MatMul with its own 64x64 weight -> Tanh."""
    return helper.make_graph([helper.make_node("MatMul", ["h2", weight], [f"{name}_m"], name=f"{name}_fc"),
                              helper.make_node("Tanh", [f"{name}_m"], [f"{name}_out"], name=f"{name}_tanh")],
                             name, [], [_io(f"{name}_out", ["batch", HIDDEN])], [_inner_weight(weight, seed)])


def _head(source: str) -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [source, "W2"], ["y0"], name="fc2"),
            helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]


def _outer_weights() -> list[TensorProto]:
    return [_tensor(k, v) for k, v in _weights().items()]


def if_model() -> onnx.ModelProto:
    """fc1 -> Relu -> If (sum > 0) with a 64x64 weight inside each branch -> fc2."""
    nodes = _mlp_nodes()[:3] + [
        helper.make_node("ReduceSum", ["h2"], ["total"], keepdims=0, name="total"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node("If", ["positive"], ["z"], name="branch",
                         then_branch=_branch("then", "W_then", 2), else_branch=_branch("else", "W_else", 3)),
        *_head("z")]
    return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", CLASSES])],
                  [*_outer_weights(), _tensor("zero", np.array(0, np.float32))])


def loop_model() -> onnx.ModelProto:
    """fc1 -> Relu -> Loop (2 trips of MatMul with a 64x64 weight inside the body, Tanh) -> fc2."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v", "W_loop"], ["m"], name="loop_fc"),
         helper.make_node("Tanh", ["m"], ["v_out"], name="loop_tanh"),
         helper.make_node("Identity", ["cond"], ["cond_out"], name="loop_cond")],
        "body", [_io("i", [], TensorProto.INT64), _io("cond", [], TensorProto.BOOL), _io("v", ["batch", HIDDEN])],
        [_io("cond_out", [], TensorProto.BOOL), _io("v_out", ["batch", HIDDEN])], [_inner_weight("W_loop", 4)])
    nodes = _mlp_nodes()[:3] + [helper.make_node("Loop", ["trips", "", "h2"], ["z"], name="loop", body=body),
                                *_head("z")]
    return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", CLASSES])],
                  [*_outer_weights(), _tensor("trips", np.array(2, np.int64))])


def scan_model() -> onnx.ModelProto:
    """fc1 -> Relu -> Scan over the rows (state += row @ W_scan, a 64x64 weight inside the body) -> fc2."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "W_scan"], ["m"], name="scan_fc"),
         helper.make_node("Add", ["state", "m"], ["a"], name="scan_add"),
         helper.make_node("Tanh", ["a"], ["state_out"], name="scan_tanh"),
         helper.make_node("Identity", ["state_out"], ["row_out"], name="scan_copy")],
        "body", [_io("state", [HIDDEN]), _io("row", [HIDDEN])], [_io("state_out", [HIDDEN]), _io("row_out", [HIDDEN])],
        [_inner_weight("W_scan", 5)])
    nodes = _mlp_nodes()[:3] + [helper.make_node("Scan", ["start", "h2"], ["final", "z"], name="scan", body=body,
                                                 num_scan_inputs=1),
                                *_head("z")]
    return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", CLASSES])],
                  [*_outer_weights(), _tensor("start", np.zeros(HIDDEN, np.float32))])


def if_outer_model() -> onnx.ModelProto:
    """As if_model, but both branches read W_out, a weight of the main graph (outer scope)."""
    model = if_model()
    for attribute in model.graph.node[5].attribute:
        attribute.g.node[0].input[1] = "W_out"
        attribute.g.ClearField("initializer")
    model.graph.initializer.append(_inner_weight("W_out", 3))
    return model


def bf16_input_model() -> onnx.ModelProto:
    """x is bfloat16, cast to float before the MLP."""
    model = mlp()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.BFLOAT16
    model.graph.node[0].input[0] = "x32"
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT, name="cast"))
    return model


def ml_model(op: str) -> onnx.ModelProto:
    """The MLP followed by an ai.onnx.ml op: Normalizer (L2) or LinearClassifier (8 -> 3 classes)."""
    nodes = _mlp_nodes(y="logits")
    if op == "Normalizer":
        nodes.append(helper.make_node("Normalizer", ["logits"], ["y"], domain="ai.onnx.ml", norm="L2", name="norm"))
        outputs = [_io("y", ["batch", CLASSES])]
    else:
        rng = np.random.default_rng(6)
        nodes.append(helper.make_node("LinearClassifier", ["logits"], ["label", "y"], domain="ai.onnx.ml", name="clf",
                                      coefficients=rng.standard_normal(3 * CLASSES).tolist(), intercepts=[0.1, 0.0, -0.1],
                                      classlabels_ints=[0, 1, 2], post_transform="SOFTMAX"))
        outputs = [_io("label", ["batch"], TensorProto.INT64), _io("y", ["batch", 3])]
    return _model(nodes, [_io("x", ["batch", WIDTH])], outputs, _outer_weights(), {"": OPSET, "ai.onnx.ml": 3})


def qdq_model(with_float: bool) -> onnx.ModelProto:
    """x -> DequantizeLinear(int8 64x64 weight) -> MatMul (already quantized); with `with_float`, the fp32 MLP after."""
    rng = np.random.default_rng(7)
    quantized = [_tensor("Wq", rng.integers(-127, 128, (WIDTH, HIDDEN)).astype(np.int8)),
                 _tensor("Wq_scale", np.array(0.01, np.float32)), _tensor("Wq_zero", np.array(0, np.int8))]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Wq_scale", "Wq_zero"], ["Wd"], name="dq"),
             helper.make_node("MatMul", ["x", "Wd"], ["q" if with_float else "y"], name="qmatmul")]
    if not with_float:
        return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", HIDDEN])], quantized)
    return _model(nodes + _mlp_nodes(x="q"), [_io("x", ["batch", WIDTH])], [_io("y", ["batch", CLASSES])],
                  quantized + _outer_weights())


def matmulnbits_model() -> onnx.ModelProto:
    """com.microsoft MatMulNBits (4 bits, blocks of 32): a model symshrink or onnxruntime already quantized."""
    rng = np.random.default_rng(8)
    blocks = WIDTH // 32
    node = helper.make_node("MatMulNBits", ["x", "Wp", "Ws"], ["y"], domain="com.microsoft", name="nbits",
                            K=WIDTH, N=HIDDEN, bits=4, block_size=32)
    return _model([node], [_io("x", ["batch", WIDTH])], [_io("y", ["batch", HIDDEN])],
                  [_tensor("Wp", rng.integers(0, 256, (HIDDEN, blocks, 16)).astype(np.uint8)),
                   _tensor("Ws", np.full(HIDDEN * blocks, 0.01, np.float32))], {"": OPSET, "com.microsoft": 1})


def int8_model() -> onnx.ModelProto:
    """int8 initializer -> Cast to float -> MatMul: integer weights, nothing float to code."""
    weight = _tensor("Wi", np.random.default_rng(9).integers(-127, 128, (WIDTH, HIDDEN)).astype(np.int8))
    nodes = [helper.make_node("Cast", ["Wi"], ["W"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="imatmul")]
    return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", HIDDEN])], [weight])


def scalar_model() -> onnx.ModelProto:
    """The only input is a scalar s: s * ones[1, 64] -> the MLP."""
    nodes = [helper.make_node("Mul", ["s", "ones"], ["xs"], name="spread"), *_mlp_nodes(x="xs")]
    return _model(nodes, [_io("s", [])], [_io("y", [1, CLASSES])],
                  [*_outer_weights(), _tensor("ones", np.ones((1, WIDTH), np.float32))])


def zero_size_initializer_model() -> onnx.ModelProto:
    """Concat(x, an initializer of shape [0, 64]) -> the MLP: a zero-size tensor in the graph."""
    nodes = [helper.make_node("Concat", ["x", "nothing"], ["xc"], axis=0, name="concat"), *_mlp_nodes(x="xc")]
    return _model(nodes, [_io("x", ["batch", WIDTH])], [_io("y", ["batch", CLASSES])],
                  [*_outer_weights(), _tensor("nothing", np.zeros((0, WIDTH), np.float32))])


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    def varint(value: int) -> bytes:
        out = b""
        while True:
            out += bytes([(value & 0x7F) | (0x80 if value > 0x7F else 0)])
            value >>= 7
            if not value:
                return out
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def deep_model_bytes(depth: int) -> bytes:
    """Identity nested in `depth` If branches: a small file whose parse recurses past protobuf's limit. Written
    field by field (the Python protobuf refuses to build it): a GraphProto holds the If NodeProto (field 1), whose
    AttributeProto then_branch (node field 5) holds the next GraphProto (attribute field 6)."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["o0"])], "g0", [],
                              [_io("o0", ["batch", WIDTH])]).SerializeToString()
    for level in range(1, depth + 1):
        then = helper.make_attribute("then_branch", helper.make_graph([], "t", [], []))
        then.ClearField("g")
        else_leaf = helper.make_graph([helper.make_node("Identity", ["x"], [f"e{level}"])], f"e{level}", [],
                                      [_io(f"e{level}", ["batch", WIDTH])])
        node = helper.make_node("If", ["c"], [f"o{level}"], else_branch=else_leaf)
        node_bytes = node.SerializeToString() + _field(5, then.SerializeToString() + _field(6, graph))
        shell = helper.make_graph([], f"g{level}", [], [_io(f"o{level}", ["batch", WIDTH])])
        if level == depth:
            shell = helper.make_graph([], "hostile", [_io("x", ["batch", WIDTH]), _io("c", [], TensorProto.BOOL)],
                                      [_io(f"o{level}", ["batch", WIDTH])])
        graph = shell.SerializeToString() + _field(1, node_bytes)
    model = helper.make_model(helper.make_graph([], "placeholder", [], []), opset_imports=[helper.make_opsetid("", OPSET)])
    model.ClearField("graph")
    return model.SerializeToString() + _field(7, graph)


def _with_weight(model: onnx.ModelProto, name: str, change: Callable[[TensorProto], None]) -> onnx.ModelProto:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    change(tensor)
    return model


def _declare(dims: list[int], raw: bytes) -> Callable[[TensorProto], None]:
    def change(tensor: TensorProto) -> None:
        del tensor.dims[:]
        tensor.dims.extend(dims)
        tensor.raw_data = raw
    return change


def _external(model: onnx.ModelProto, name: str, location: str, offset: int = 0, length: int | None = None,
              dims: list[int] | None = None, with_length: bool = True) -> onnx.ModelProto:
    """Point initializer `name` at external data (`location`, `offset`, `length`: its raw bytes' by default, or no
    length field) instead of its raw bytes."""
    def change(tensor: TensorProto) -> None:
        size = len(tensor.raw_data)
        tensor.ClearField("raw_data")
        if dims is not None:
            del tensor.dims[:]
            tensor.dims.extend(dims)
        tensor.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset)}
        if with_length:
            entries["length"] = str(size if length is None else length)
        for key, value in entries.items():
            tensor.external_data.add(key=key, value=value)
    return _with_weight(model, name, change)


# ------------------------------------------------------------------------------------------------ the corpus


def _argv(*extra: str, model: str = MODEL, out: str = OUT, calib: str | None = CALIB,
          method: tuple[str, ...] = ("--method", "quant", "--bits", "4")) -> tuple[str, ...]:
    data = ("--calib", calib) if calib is not None else ()
    return ("compress", model, "-o", out, *method, *data, "--min-cosine", "0", "-q", *extra)


def _compress_api(phrase: str = "", calibration: str | None = CALIB, model: str = MODEL, **kwargs) -> ApiCall:
    return ApiCall("compress", model, calibration, {"method": "quant", "bits": 4, "min_cosine": 0.0, **kwargs},
                   phrase=phrase)


class _Writer:
    """Writes one case's files and collects the cases."""

    def __init__(self, root: Path | None) -> None:
        self.root, self.cases = root, []

    def case(self, name: str, files: dict[str, object], argv: tuple[str, ...], expect: str, phrase: str, **kwargs) -> None:
        """`files`: relative name -> ModelProto, bytes, an array dict (.npz), a str (text), or ("symlink", target)
        or ("folder",) or ("fifo",). Nothing is written without a root (the cases alone)."""
        if self.root is not None:
            (self.root / name).mkdir(parents=True)
        for rel, content in files.items() if self.root is not None else ():
            path = self.root / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, onnx.ModelProto):
                path.write_bytes(content.SerializeToString())
            elif isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(content)
            elif isinstance(content, dict):
                with open(path, "wb") as handle:
                    np.savez(handle, **content)
            elif content[0] == "symlink":
                path.symlink_to(content[1])
            elif content[0] == "folder":
                path.mkdir()
            elif content[0] == "fifo":
                os.mkfifo(path)
        code = kwargs.pop("code", 0 if expect == "ok" else 2)
        output = kwargs.pop("output", OUT if code == 0 else None)
        self.cases.append(Case(name, tuple(files), argv, expect, phrase, code=code, output=output, **kwargs))


def make_corpus(folder: str | os.PathLike | None) -> list[Case]:
    """Write every case into its own sub-folder of `folder` (created; must not hold the cases already) and
    return them; with None, the cases alone (nothing written)."""
    root = None if folder is None else Path(folder)
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        (root / "secret.bin").write_bytes(np.random.default_rng(2).bytes(WIDTH * HIDDEN * 4))  # outside every case
    w = _Writer(root)
    calib = {"x": _calib()}
    good = mlp()
    data = good.SerializeToString()
    bad = "exit 2"

    # --- not an ONNX model -----------------------------------------------------------------------------
    w.case("empty_file", {MODEL: b"", CALIB: calib}, _argv(), bad, "not an ONNX model", about="an empty file",
           api=_compress_api())
    w.case("random_bytes", {MODEL: np.random.default_rng(0).bytes(4096), CALIB: calib}, _argv(), bad,
           "not an ONNX model", about="4 KB of random bytes", api=_compress_api())
    for label, cut in (("head", 24), ("third", len(data) // 3), ("half", len(data) // 2), ("tail", len(data) - 3)):
        w.case(f"truncated_{label}", {MODEL: data[:cut], CALIB: calib}, _argv(), bad, "truncated",
               about=f"the model's first {cut} of {len(data)} bytes", api=_compress_api())
    png = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(1024)
    w.case("png_named_onnx", {MODEL: png, CALIB: calib}, _argv(), bad, "not an ONNX model",
           about="a PNG header and bytes, named .onnx", api=_compress_api())
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr(MODEL, data)
    w.case("zip_named_onnx", {MODEL: archive.getvalue(), CALIB: calib}, _argv(), bad, "not an ONNX model",
           about="a zip archive holding the model, named .onnx", api=_compress_api())
    for suffix in ("json", "textproto", "onnxtxt"):  # onnx.load picks its parser by the suffix
        w.case(f"garbage_named_{suffix}", {f"m.{suffix}": "{not a model\n", CALIB: calib}, _argv(model=f"m.{suffix}"),
               bad, "not an ONNX model", about=f"a few bytes of garbage named m.{suffix} (onnx's {suffix} parser)",
               api=_compress_api(model=f"m.{suffix}"))
    no_outputs = mlp()
    no_outputs.graph.ClearField("output")
    w.case("no_graph_outputs", {MODEL: no_outputs, CALIB: calib}, _argv(), bad, "declares no outputs",
           about="the MLP with its graph outputs removed", api=_compress_api())
    w.case("deep_nesting", {MODEL: deep_model_bytes(60), CALIB: calib}, _argv(), bad, "not an ONNX model",
           about="Identity nested in 60 If branches (protobuf's recursion limit)", api=_compress_api())
    w.case("model_is_a_device", {CALIB: calib}, _argv(model="/dev/zero"), bad, "not a file",
           about="/dev/zero as the model", api=_compress_api(model="/dev/zero"))
    w.case("model_is_a_fifo", {MODEL: ("fifo",), CALIB: calib}, _argv(), bad, "not a file",
           about="a named pipe called m.onnx (no writer: a read would block)", subprocess=True,
           api=_compress_api())

    # --- tensors that do not hold what they declare (refused before any allocation) ---------------------
    huge = [10**6, 10**6]
    w.case("huge_initializer_dims", {MODEL: _with_weight(mlp(), "W1", _declare(huge, b"\0" * 16)), CALIB: calib},
           _argv(), bad, "declares", about="W1 declares 10^12 elements and stores 16 bytes", api=_compress_api())
    w.case("negative_initializer_dim", {MODEL: _with_weight(mlp(), "W1", _declare([-1, 64], b"\0" * 256)),
                                        CALIB: calib},
           _argv(), bad, "declares", about="W1 declares dims [-1, 64]", api=_compress_api())
    w.case("short_raw_data", {MODEL: _with_weight(mlp(), "W1", _declare([64, 64], b"\0" * 100)), CALIB: calib},
           _argv(), bad, "declares", about="W1 declares 64x64 floats and stores 100 bytes", api=_compress_api())
    w.case("huge_external_dims", {MODEL: _external(mlp(), "W1", "w.data", dims=huge),
                                  "w.data": _weights()["W1"].tobytes(), CALIB: calib},
           _argv(), bad, "declares", about="an external W1 declaring 10^12 elements, 16 KB of data",
           api=_compress_api())
    w.case("huge_input_dim_random", {MODEL: mlp(batch=10**12)}, _argv("--random-calib", calib=None), bad,
           "too large", about="input x declares [10^12, 64]; random calibration asked for",
           api=_compress_api(calibration=None, random_calibration=True))
    w.case("zero_input_dim_random", {MODEL: mlp(batch=0)}, _argv("--random-calib", calib=None), bad,
           "size 0", about="input x declares [0, 64]; random calibration asked for",
           api=_compress_api(calibration=None, random_calibration=True))

    # --- external data -----------------------------------------------------------------------------------
    w1 = _weights()["W1"].tobytes()
    w.case("missing_external_data", {MODEL: _external(mlp(), "W1", "w.data"), CALIB: calib}, _argv(), bad,
           "missing external data", about="W1 in w.data, which is absent", api=_compress_api())
    w.case("truncated_external_data", {MODEL: _external(mlp(), "W1", "w.data"), "w.data": w1[:1000], CALIB: calib},
           _argv(), bad, "truncated", about="W1 in w.data, cut to 1000 of 16384 bytes", api=_compress_api())
    w.case("external_no_length_truncated", {MODEL: _external(mlp(), "W1", "w.data", with_length=False), "w.data": w1[:1000],
                                           CALIB: calib},
           _argv(), bad, "truncated", about="W1 in w.data without a length field, the file cut to 1000 bytes",
           api=_compress_api())
    escape = "../" * 24 + "etc/passwd"
    w.case("external_dotdot_escape", {MODEL: _external(mlp(), "W1", escape), CALIB: calib}, _argv(), bad,
           "outside the model's folder", about="W1's location is ../../…/etc/passwd (24 levels up)", api=_compress_api())
    w.case("external_absolute_path", {MODEL: _external(mlp(), "W1", "/etc/passwd"), CALIB: calib},
           _argv(), bad, "outside the model's folder", about="W1's location is /etc/passwd", api=_compress_api())
    w.case("external_dotdot_escape_stream", {MODEL: _external(mlp(), "W1", escape), CALIB: calib},
           _argv("--stream"), bad, "outside the model's folder", about="as external_dotdot_escape, with --stream "
           "(weights read lazily)", api=_compress_api(stream=True))
    w.case("external_symlink_escape", {MODEL: _external(mlp(), "W1", "w.data"), "w.data": ("symlink", "../secret.bin"),
                                       CALIB: calib},
           _argv(), bad, "outside the model's folder", outside=("secret.bin",),
           about="W1 in w.data, a symlink to a file outside the model's folder", api=_compress_api())
    hub = {"blobs/aaa": _external(mlp(), "W1", "m.onnx.data"), "blobs/bbb": w1, CALIB: calib,
           "snapshot/m.onnx": ("symlink", "../blobs/aaa"), "snapshot/m.onnx.data": ("symlink", "../blobs/bbb")}
    w.case("hub_cache_layout", hub, _argv(model="snapshot/m.onnx"), bad, "outside the model's folder",
           about="a Hugging Face cache: snapshot/m.onnx and its m.onnx.data are links into ../blobs (onnx-ir refuses "
                 "such links as path traversal)", api=_compress_api(model="snapshot/m.onnx"))
    linked = {"blobs/ccc": mlp(), CALIB: calib, "snapshot/m.onnx": ("symlink", "../blobs/ccc")}
    w.case("model_is_a_link", linked, _argv(model="snapshot/m.onnx"), "ok", "",
           about="snapshot/m.onnx, weights inside, is a link to ../blobs/ccc", api=_compress_api(model="snapshot/m.onnx"))
    w.case("model_is_a_link_stream", linked, _argv("--stream", model="snapshot/m.onnx"), bad, "is a link to",
           about="as model_is_a_link, with --stream (the weights are read lazily from the file itself)")
    # (no API equivalent: the API loads whole models, it does not stream)
    w.case("external_location_is_folder", {MODEL: _external(mlp(), "W1", "sub"), "sub": ("folder",), CALIB: calib},
           _argv(), bad, "missing external data", about="W1's location is a folder", api=_compress_api())

    # --- opsets, domains, graph structure -----------------------------------------------------------------
    w.case("opset_too_new", {MODEL: mlp(opset=99), CALIB: calib}, _argv(), bad, "unsupported opset 99",
           about="default-domain opset 99", api=_compress_api())
    w.case("opset_too_old", {MODEL: mlp(opset=1), CALIB: calib}, _argv(), bad, "unsupported opset 1",
           about="default-domain opset 1", api=_compress_api())
    no_default = mlp()
    no_default.opset_import[0].domain = "ai.onnx.ml"
    w.case("opset_missing_default", {MODEL: no_default, CALIB: calib}, _argv(), bad, "imports no ONNX opset",
           about="opset_import names only ai.onnx.ml", api=_compress_api())
    custom = mlp()
    custom.graph.node.append(helper.make_node("Mystery", ["y"], ["z"], domain="com.example", name="mystery"))
    custom.graph.output[0].name = "z"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    w.case("unknown_custom_op", {MODEL: custom, CALIB: calib}, _argv(), bad, "onnxruntime cannot load",
           about="the MLP then com.example.Mystery, which no runtime implements", api=_compress_api())
    future_ir = mlp()
    future_ir.ir_version = 99
    w.case("ir_version_too_new", {MODEL: future_ir, CALIB: calib}, _argv(), bad, "IR version",
           about="ir_version 99", api=_compress_api())
    cyclic = mlp()
    cyclic.graph.node[0].input[0] = "y"  # fc1 reads the model's own output
    w.case("cyclic_graph", {MODEL: cyclic, CALIB: calib}, _argv(), bad, "onnxruntime cannot load",
           about="fc1 reads y, the output of fc2_bias: a cycle", api=_compress_api())
    ghost = mlp()
    ghost.graph.node[2].input[0] = "ghost"
    w.case("undefined_input", {MODEL: ghost, CALIB: calib}, _argv(), bad, "onnxruntime cannot load",
           about="Relu reads a value nothing produces", api=_compress_api())
    twice = mlp()
    twice.graph.node[1].output[0] = "h0"  # fc1 and fc1_bias both write h0
    w.case("duplicate_output_name", {MODEL: twice, CALIB: calib}, _argv(), bad, "h0",
           about="two nodes write the value h0", api=_compress_api())

    # --- control flow and other domains: compressed around, kept as they are -------------------------------
    skip = "skip-with-reason"
    for name, build, op in (("if", if_model, "If"), ("loop", loop_model, "Loop"), ("scan", scan_model, "Scan")):
        w.case(f"{name}_subgraph_weights", {MODEL: build(), CALIB: calib}, _argv("--json"), skip, "subgraph",
               code=0, keeps=(op,), about=f"{op} with a 64x64 weight inside its subgraph(s), an fp32 MLP around it",
               api=_compress_api())
    w.case("if_outer_weight_hyper", {MODEL: if_outer_model(), CALIB: calib},
           _argv(method=("--method", "hyper")), "ok", "", keeps=("If",),
           about="If branches reading a 64x64 weight of the main graph; --method hyper",
           api=_compress_api(method="hyper", bits=None))
    for op in ("Normalizer", "LinearClassifier"):
        w.case(f"ml_{op.lower()}", {MODEL: ml_model(op), CALIB: calib}, _argv(), "ok", "", keeps=(op,),
               about=f"the MLP then ai.onnx.ml {op}", api=_compress_api())

    # --- already quantized ----------------------------------------------------------------------------------
    w.case("qdq_matmul_only", {MODEL: qdq_model(False), CALIB: calib}, _argv(), skip, "not a constant matrix",
           about="DequantizeLinear(int8 weight) -> MatMul, nothing else", api=_compress_api())
    w.case("qdq_matmul_and_fp32", {MODEL: qdq_model(True), CALIB: calib}, _argv("--json"), skip,
           "not a constant matrix", code=0, keeps=("DequantizeLinear",),
           about="a QDQ MatMul then the fp32 MLP", api=_compress_api())
    w.case("matmulnbits_only", {MODEL: matmulnbits_model(), CALIB: calib}, _argv(), skip, "nothing to compress",
           about="com.microsoft MatMulNBits (4-bit)", api=_compress_api())
    w.case("int8_initializer", {MODEL: int8_model(), CALIB: calib}, _argv(), skip, "not a constant matrix",
           about="an int8 initializer cast to float before MatMul", api=_compress_api())

    # --- shapes and types -------------------------------------------------------------------------------------
    open_rank = mlp()
    open_rank.graph.input[0].type.tensor_type.ClearField("shape")
    w.case("dynamic_rank_random", {MODEL: open_rank}, _argv("--random-calib", calib=None), bad, "no fixed rank",
           about="input x without a shape; random calibration", api=_compress_api(calibration=None,
                                                                                    random_calibration=True))
    w.case("dynamic_rank_with_data", {MODEL: open_rank, CALIB: calib}, _argv(), "ok", "",
           about="input x without a shape; calibration data", api=_compress_api())
    w.case("zero_size_initializer", {MODEL: zero_size_initializer_model(), CALIB: calib}, _argv(), "ok", "",
           about="an initializer of shape [0, 64] concatenated to x", api=_compress_api())
    w.case("scalar_input", {MODEL: scalar_model()}, _argv("--random-calib", calib=None), "ok", "",
           about="the only input is a scalar", api=_compress_api(calibration=None, random_calibration=True))
    w.case("batch_fixed_at_1", {MODEL: mlp(batch=1)}, _argv("--random-calib", calib=None), "ok", "",
           about="input x is [1, 64]; random calibration", api=_compress_api(calibration=None, random_calibration=True))
    w.case("batch_fixed_at_1_rows", {MODEL: mlp(batch=1), CALIB: calib}, _argv(), "ok", "",
           about="input x is [1, 64]; calibration of 32 rows (32 feeds of one row)", api=_compress_api())
    w.case("zero_input_dim_with_data", {MODEL: mlp(batch=0), CALIB: calib}, _argv(), bad, "size 0",
           about="input x declares [0, 64]; calibration data of 32 rows", api=_compress_api())
    w.case("fp16_model", {MODEL: _half_mlp(TensorProto.FLOAT16), CALIB: {"x": _calib(dtype=np.float16)}}, _argv(),
           "ok", "", about="float16 weights, input and output", api=_compress_api())
    w.case("bf16_model", {MODEL: _half_mlp(TensorProto.BFLOAT16)}, _argv("--random-calib", calib=None), bad,
           "onnxruntime cannot load", about="bfloat16 weights, input and output (onnxruntime's CPU Relu has none)",
           api=_compress_api(calibration=None, random_calibration=True))
    w.case("bf16_input_cast", {MODEL: bf16_input_model()}, _argv("--random-calib", calib=None), bad,
           "bfloat16", about="a bfloat16 input cast to float before the MLP; random calibration",
           api=_compress_api(calibration=None, random_calibration=True))

    # --- calibration that does not fit ---------------------------------------------------------------------
    model = {MODEL: good}
    for name, arrays, phrase, about in (
            ("calib_wrong_names", {"not_x": _calib()}, "missing inputs ['x']", "the .npz names not_x"),
            ("calib_wrong_rank", {"x": _calib()[:, None, :]}, "rank 3", "x of shape [32, 1, 64]"),
            ("calib_wrong_width", {"x": _calib()[:, :60]}, "model expects", "x of shape [32, 60]"),
            ("calib_wrong_dtype", {"x": _calib(dtype=np.float64)}, "dtype float64", "x as float64"),
            ("calib_nan", {"x": np.where(np.arange(ROWS)[:, None] == 5, np.nan, _calib())}, "NaN", "a row of NaN"),
            ("calib_inf", {"x": np.where(np.arange(ROWS)[:, None] == 30, np.inf, _calib())}, "infinite",
             "a row of +inf in the held-out part"),
            ("calib_empty_npz", {}, "holds no arrays", "an .npz with no arrays"),
            ("calib_zero_rows", {"x": _calib(0)}, "no rows", "x of shape [0, 64]"),
            ("calib_one_row", {"x": _calib(1)}, "at least 2", "x of shape [1, 64]"),
            ("calib_object_array", {"x": np.array([{"a": 1}] * 4, dtype=object)}, "not a readable .npz",
             "a pickled object array")):
        if name in ("calib_nan", "calib_inf"):
            arrays = {"x": arrays["x"].astype(np.float32)}
        w.case(name, {**model, CALIB: arrays}, _argv(), bad, phrase, about=f"calibration: {about}", api=_compress_api())
    w.case("calib_is_text", {**model, CALIB: "x,y\n1,2\n"}, _argv(), bad, "not a readable .npz",
           about="calibration: a CSV named .npz", api=_compress_api())
    w.case("calib_is_a_fifo", {**model, CALIB: ("fifo",)}, _argv(), bad, "not a regular file",
           about="calibration: a named pipe called calib.npz (no writer: a read would block)", subprocess=True,
           api=_compress_api())
    w.case("calib_is_dev_zero", {**model}, _argv(calib="/dev/zero"), bad, "not a regular file",
           about="calibration: /dev/zero (endless bytes)", api=_compress_api(calibration="/dev/zero"))
    w.case("calib_missing", {**model}, _argv(), bad, "no such file", about="calibration: no such file",
           api=_compress_api())

    # --- -o at every kind of existing path -------------------------------------------------------------------
    both = {MODEL: good, CALIB: calib}
    save = {"model": MODEL, "calibration": None, "inputs": (MODEL, CALIB)}
    w.case("out_is_the_input", both, _argv(out=MODEL, calib=CALIB), bad, "is an input of this run",
           about="-o m.onnx, the input", api=ApiCall("save", path=MODEL, **save))
    w.case("out_is_the_input_forced", both, _argv("--force", out=MODEL), bad, "is an input of this run",
           about="-o m.onnx --force", api=ApiCall("save", path=MODEL, kwargs={"force": True}, **save))
    w.case("out_is_the_calibration", both, _argv("--force", out=CALIB), bad, "is an input of this run",
           about="-o calib.npz --force", api=ApiCall("save", path=CALIB, kwargs={"force": True}, **save))
    w.case("out_symlink_to_input", {**both, "link.onnx": ("symlink", MODEL)}, _argv("--force", out="link.onnx"), bad,
           "is an input of this run", about="-o link.onnx --force, a symlink to the input",
           api=ApiCall("save", path="link.onnx", kwargs={"force": True}, **save))
    w.case("out_existing_text", {**both, "notes.txt": "mine\n"}, _argv(out="notes.txt"), bad, "give --force",
           about="-o notes.txt, an existing text file, without --force", api=ApiCall("save", path="notes.txt", **save))
    w.case("out_is_a_folder", {**both, "sub": ("folder",)}, _argv("--force", out="sub"), bad,
           "not a regular file", about="-o sub --force, a folder", api=ApiCall("save", path="sub", kwargs={"force": True},
                                                                               **save))
    for device in ("/dev/null", "/dev/zero"):
        w.case(f"out_{device[5:]}", both, _argv("--force", out=device), bad, "not a regular file",
               about=f"-o {device} --force", api=ApiCall("save", path=device, kwargs={"force": True}, **save))
    w.case("out_dangling_symlink", {**both, "dangling.onnx": ("symlink", "nowhere/x.onnx")},
           _argv("--force", out="dangling.onnx"), bad, "not a regular file",
           about="-o dangling.onnx --force, a symlink to nothing",
           api=ApiCall("save", path="dangling.onnx", kwargs={"force": True}, **save))
    w.case("out_parent_is_a_file", {**both, "notes.txt": "mine\n"}, _argv(out="notes.txt/out.onnx"), bad,
           "folder does not exist", about="-o notes.txt/out.onnx", api=ApiCall("save", path="notes.txt/out.onnx", **save))
    w.case("out_name_too_long", both, _argv(out="o" * 250 + ".onnx"), bad, "too long",
           about="-o a 255-byte file name", api=ApiCall("save", path="o" * 250 + ".onnx", **save))
    w.case("out_sibling_data_theirs", {**both, "out.onnx.data": "someone else's\n"}, _argv(), "ok", "",
           about="out.onnx.data exists and is not ours: kept, the weights stay in out.onnx", api=_compress_api())

    # --- absurd option values ------------------------------------------------------------------------------------
    api_phrases = {"threads_zero": "threads must be positive", "threads_negative": "threads must be positive",
                   "bits_3": "bits must be one of"}
    for name, flags, phrase, kwargs in (
            ("calib_samples_1e9_text", ("--calib-samples", "1e9"), "invalid int value", None),
            ("calib_samples_huge_random", ("--calib-samples", "1000000000", "--random-calib"), "between 1 and",
             {"calib_samples": 10**9, "random_calibration": True, "calibration": None}),
            ("calib_samples_negative", ("--calib-samples", "-1"), "calib_samples must be positive",
             {"calib_samples": -1}),
            ("ridge_negative", ("--ridge", "-1"), "ridge must be non-negative", {"ridge": -1.0}),
            ("ridge_nan", ("--ridge", "nan"), "ridge must be", {"ridge": math.nan}),
            ("ridge_inf", ("--ridge", "inf"), "ridge must be non-negative and finite", {"ridge": math.inf}),
            ("threads_zero", ("--threads", "0"), "--threads: must be positive", {"threads": 0}),
            ("threads_negative", ("--threads", "-3"), "--threads: must be positive", {"threads": -3}),
            ("bits_3", ("--bits", "3"), "invalid choice", {"bits": 3}),
            ("block_size_7", ("--block-size", "7"), "block", {"block": 7}),
            ("block_size_text", ("--block-size", "big"), "--block-size takes a number", None),
            ("min_cosine_2", ("--min-cosine", "2"), "min_cosine must be in [-1, 1]", {"min_cosine": 2.0}),
            ("min_cosine_nan", ("--min-cosine", "nan"), "min_cosine must be in [-1, 1]", {"min_cosine": math.nan}),
            ("max_error_negative", ("--max-error", "-1"), "max_error must be positive", {"max_error": -1.0}),
            ("max_error_nan", ("--max-error", "nan"), "max_error must be positive", {"max_error": math.nan}),
            ("keep_nan", ("--method", "moment", "--keep", "nan"), "keep must be in (0, 1]",
             {"method": "moment", "keep": math.nan}),
            ("width_zero", ("--method", "moment", "--width", "0"), "width must be positive",
             {"method": "moment", "width": 0}),
            ("plan_missing", ("--plan", "nowhere.json"), "cannot read plan", {"plan": "nowhere.json"}),
            ("plan_not_json", ("--plan", CALIB), "not a symshrink plan", {"plan": CALIB}),
            ("unknown_method", ("--method", "zip"), "unknown method", {"method": "zip"})):
        api = None if kwargs is None else _compress_api(phrase=api_phrases.get(name, ""), **kwargs)
        argv = _argv(*flags, calib=None if "--random-calib" in flags else CALIB)
        w.case(name, {MODEL: good, CALIB: calib}, argv, bad, phrase, about=" ".join(flags), api=api)
    w.case("plan_without_grids", {MODEL: good, CALIB: calib, "plan.json": '{"groups": 5}\n'},
           _argv("--plan", "plan.json"), bad, "plan", about="--plan plan.json, a JSON file that records no plan",
           api=_compress_api(plan="plan.json"))
    return w.cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_corpus.py FOLDER")
    for case in make_corpus(sys.argv[1]):
        print(f"{case.name:<32} {case.expect:<17} exit {case.code}  symshrink {' '.join(case.argv)}")
