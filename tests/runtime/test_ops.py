"""The executor's ops against onnxruntime on small inline models, one per tricky semantic: opset-dependent
forms (Softmax, Reduce*, Squeeze/Unsqueeze, Clip, Split, Slice), padding and window arithmetic of Conv,
ConvTranspose and the pools, Resize as PP-OCR det uses it, quantized weights and integer arithmetic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.errors import BadInput
from symshrink.runtime.executor import Executor
from symshrink.runtime.ops import supported_ops

ort = pytest.importorskip("onnxruntime")

# Float outputs: |executor - onnxruntime| <= FLOAT_ATOL * max(1, max |onnxruntime|). Both sum float32
# products, in different orders (onnxruntime uses blocked GEMMs, MLAS convolutions, fused kernels), so
# they agree to a few float32 ulps of the output's scale; 1e-5 leaves an order of magnitude of room.
FLOAT_ATOL = 1e-5
# Integer and boolean outputs (shapes, indices, integer arithmetic, comparisons) must match exactly.

RNG = np.random.default_rng(0)


def _f32(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


@dataclass
class Case:
    """One node (or a few) over graph inputs `feeds` and initializers `weights`. The outputs' types and
    shapes come from onnx shape inference."""

    id: str
    nodes: list[onnx.NodeProto]
    feeds: dict[str, np.ndarray]
    opset: int = 17
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: tuple[str, ...] = ("y",)

    def model(self) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                  for name, a in self.feeds.items()]
        initializers = [numpy_helper.from_array(a, name) for name, a in self.weights.items()]
        graph = helper.make_graph(self.nodes, self.id, inputs, [], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
        model.graph.output.extend(inferred[name] for name in self.outputs)
        onnx.checker.check_model(model)
        return model


def node(op: str, inputs: list[str], outputs: tuple[str, ...] = ("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, list(outputs), **attrs)


def _one(op: str, inputs: dict[str, np.ndarray], opset: int = 17, case_id: str = "", weights=None,
         **attrs) -> Case:
    """A single-node case; inputs named in `weights` become initializers (constant axes, shapes, scales), and
    those named `_...` are left out (an empty input name: a missing optional input before a present one)."""
    weights = weights or {}
    names = [*inputs, *weights]
    return Case(case_id or op, [node(op, [n if n[0] != "_" else "" for n in names], **attrs)],
                inputs, opset, {n: a for n, a in weights.items() if n[0] != "_"})


X3 = _f32(2, 3, 4, scale=3.0)
IMAGE = _f32(2, 4, 9, 11)

CASES = [
    # Softmax: opset 11 normalises the 2-D flattening at axis; opset 13 normalises along the axis alone
    _one("Softmax", {"x": X3}, 11, "softmax-11-axis1", axis=1),
    _one("Softmax", {"x": X3}, 11, "softmax-11-default"),
    _one("Softmax", {"x": X3}, 13, "softmax-13-axis1", axis=1),
    _one("Softmax", {"x": X3}, 13, "softmax-13-default"),
    # reductions: axes attribute (ReduceSum < 13, ReduceMean < 18) or input, keepdims, noop_with_empty_axes
    _one("ReduceMean", {"x": X3}, 11, "reducemean-11-attr", axes=[1, -1], keepdims=0),
    _one("ReduceMean", {"x": X3}, 17, "reducemean-17-all"),
    _one("ReduceMean", {"x": X3}, 18, "reducemean-18-input", weights={"axes": _i64(-2)}, keepdims=1),
    _one("ReduceMax", {"x": X3}, 18, "reducemax-18-input", weights={"axes": _i64(1)}),
    _one("ReduceProd", {"x": X3}, 13, "reduceprod-13-attr", axes=[1], keepdims=0),
    _one("ReduceSum", {"x": X3}, 11, "reducesum-11-attr", axes=[0, 2], keepdims=1),
    _one("ReduceSum", {"x": X3}, 13, "reducesum-13-input", weights={"axes": _i64(1)}, keepdims=0),
    _one("ReduceSum", {"x": X3}, 13, "reducesum-13-all", keepdims=0),
    _one("ReduceSum", {"x": X3}, 13, "reducesum-13-noop", weights={"axes": _i64()}, noop_with_empty_axes=1),
    _one("ReduceSum", {"x": np.arange(24, dtype=np.int32).reshape(2, 3, 4)}, 13, "reducesum-int32",
         weights={"axes": _i64(2)}),
    # Slice: negative steps, bounds past either end (clamped), INT64 extremes as "to the end"
    _one("Slice", {"x": X3}, 13, "slice-negative-steps",
         weights={"starts": _i64(-1, 10), "ends": _i64(np.iinfo(np.int64).min, 0), "axes": _i64(0, 2),
                  "steps": _i64(-1, -2)}),
    _one("Slice", {"x": X3}, 13, "slice-clamped",
         weights={"starts": _i64(-100, 1), "ends": _i64(100, np.iinfo(np.int64).max), "axes": _i64(-1, 1),
                  "steps": _i64(3, 1)}),
    _one("Slice", {"x": X3}, 13, "slice-reverse-all", weights={"starts": _i64(-1), "ends": _i64(-1000),
                                                               "axes": _i64(1), "steps": _i64(-1)}),
    _one("Slice", {"x": X3}, 9, "slice-9-attr", starts=[1, -3], ends=[2, 100], axes=[0, 2]),
    # Conv: groups with pads, strides and dilations; depthwise; SAME_UPPER (PP-OCR); 1-D
    _one("Conv", {"x": IMAGE}, 11, "conv-groups-pads-strides-dilations",
         weights={"w": _f32(6, 2, 3, 2), "b": _f32(6)}, group=2, pads=[1, 0, 2, 1], strides=[2, 1], dilations=[2, 3]),
    _one("Conv", {"x": IMAGE}, 11, "conv-depthwise", weights={"w": _f32(4, 1, 3, 3)}, group=4, pads=[1, 1, 1, 1],
         strides=[2, 2]),
    _one("Conv", {"x": IMAGE}, 11, "conv-depthwise-multiplier", weights={"w": _f32(8, 1, 5, 5), "b": _f32(8)},
         group=4, pads=[2, 2, 2, 2]),
    _one("Conv", {"x": IMAGE}, 11, "conv-same-upper", weights={"w": _f32(5, 4, 2, 2)}, auto_pad="SAME_UPPER",
         strides=[2, 2]),
    _one("Conv", {"x": IMAGE}, 11, "conv-same-lower", weights={"w": _f32(5, 4, 2, 3)}, auto_pad="SAME_LOWER"),
    _one("Conv", {"x": IMAGE}, 11, "conv-valid", weights={"w": _f32(3, 4, 3, 3)}, strides=[2, 2], auto_pad="VALID"),
    _one("Conv", {"x": _f32(2, 3, 17)}, 11, "conv-1d", weights={"w": _f32(4, 3, 3), "b": _f32(4)}, pads=[1, 2],
         strides=[2]),
    # ConvTranspose: stride 2 with pads and output_padding, groups; output_shape
    _one("ConvTranspose", {"x": IMAGE}, 11, "convtranspose-stride2-pads",
         weights={"w": _f32(4, 3, 3, 3), "b": _f32(6)}, group=2, strides=[2, 2], pads=[1, 0, 0, 1],
         output_padding=[1, 0]),
    _one("ConvTranspose", {"x": IMAGE}, 11, "convtranspose-ppocr", weights={"w": _f32(4, 2, 2, 2), "b": _f32(2)},
         strides=[2, 2], pads=[0, 0, 0, 0], kernel_shape=[2, 2]),
    *[_one("ConvTranspose", {"x": IMAGE}, 11, f"convtranspose-{pad.lower()}", weights={"w": _f32(4, 3, 3, 3)},
           strides=[2, 2], auto_pad=pad) for pad in ("SAME_UPPER", "SAME_LOWER")],
    _one("ConvTranspose", {"x": IMAGE}, 11, "convtranspose-output-shape", weights={"w": _f32(4, 3, 3, 3)},
         strides=[2, 3], output_shape=[18, 30], dilations=[1, 2]),
    # pools: ceil_mode, pads, SAME_UPPER (PP-OCR), dilations; the average's divisor with and without pads
    _one("MaxPool", {"x": IMAGE}, 11, "maxpool-ceil", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    _one("MaxPool", {"x": IMAGE}, 11, "maxpool-ceil-pads", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0],
         ceil_mode=1),
    # the last window would start in the end padding: dropped (onnx shape inference keeps it, so onnxruntime
    # logs a shape-mismatch warning for this case and avgpool-include-pad-ceil)
    _one("MaxPool", {"x": IMAGE}, 11, "maxpool-ceil-window-in-padding", kernel_shape=[3, 2], strides=[2, 3],
         pads=[1, 1, 1, 0], ceil_mode=1),
    _one("MaxPool", {"x": IMAGE}, 11, "maxpool-same-upper", kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_UPPER"),
    _one("AveragePool", {"x": IMAGE}, 19, "avgpool-19-dilations", kernel_shape=[2, 3], dilations=[2, 2],
         pads=[1, 1, 1, 1], count_include_pad=1),
    _one("MaxPool", {"x": IMAGE}, 12, "maxpool-dilations", kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 1, 1]),
    _one("AveragePool", {"x": IMAGE}, 11, "avgpool-exclude-pad", kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 1, 1, 1], count_include_pad=0),
    _one("AveragePool", {"x": IMAGE}, 11, "avgpool-include-pad", kernel_shape=[3, 3], strides=[2, 2],
         pads=[1, 1, 1, 1], count_include_pad=1),
    _one("AveragePool", {"x": IMAGE}, 11, "avgpool-include-pad-ceil", kernel_shape=[3, 2], strides=[2, 3],
         pads=[1, 0, 1, 1], count_include_pad=1, ceil_mode=1),
    _one("AveragePool", {"x": IMAGE}, 11, "avgpool-ppocr-rec", kernel_shape=[3, 2], strides=[3, 2],
         pads=[0, 0, 0, 0], count_include_pad=0),
    _one("GlobalAveragePool", {"x": IMAGE}, 11),
    # Resize as PP-OCR det (opset 11: X, empty roi, scales; nearest, asymmetric, floor), then other modes
    *[_one("Resize", {"x": IMAGE}, 11, f"resize-ppocr-x{s}", weights={"roi": np.zeros(0, np.float32),
                                                                      "scales": np.array([1, 1, s, s], np.float32)},
           mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor") for s in (2, 4, 8)],
    _one("Resize", {"x": IMAGE}, 13, "resize-nearest-half-pixel-down",
         weights={"_roi": None, "scales": np.array([1, 1, 0.5, 0.75], np.float32)}, mode="nearest"),
    _one("Resize", {"x": IMAGE}, 13, "resize-linear-half-pixel",
         weights={"_roi": None, "scales": np.array([1, 1, 2, 1.5], np.float32)}, mode="linear"),
    _one("Resize", {"x": IMAGE}, 13, "resize-linear-align-corners-sizes",
         weights={"_roi": None, "_scales": None, "sizes": _i64(2, 4, 5, 20)}, mode="linear",
         coordinate_transformation_mode="align_corners"),
    _one("Resize", {"x": IMAGE}, 13, "resize-nearest-pytorch-ceil-sizes",
         weights={"_roi": None, "_scales": None, "sizes": _i64(2, 4, 14, 7)}, mode="nearest",
         coordinate_transformation_mode="pytorch_half_pixel", nearest_mode="ceil"),
    _one("Resize", {"x": IMAGE}, 10, "resize-10-nearest", weights={"scales": np.array([1, 1, 3, 0.6], np.float32)}),
    _one("Resize", {"x": IMAGE}, 19, "resize-linear-half-pixel-symmetric-down",
         weights={"_roi": None, "scales": np.array([1, 1, 0.5, 0.6], np.float32)}, mode="linear",
         coordinate_transformation_mode="half_pixel_symmetric"),
    _one("Resize", {"x": IMAGE}, 18, "resize-18-axes", weights={"_roi": None, "scales": np.array([2, 3], np.float32)},
         axes=[3, 2]),
    # linear algebra
    _one("Gemm", {"a": _f32(5, 7)}, 11, "gemm-transB", weights={"b": _f32(3, 7), "c": _f32(3)}, transB=1),
    _one("Gemm", {"a": _f32(7, 5)}, 11, "gemm-transA-alpha-beta", weights={"b": _f32(7, 3), "c": _f32(5, 3)},
         transA=1, alpha=0.5, beta=2.0),
    _one("Gemm", {"a": _f32(5, 7)}, 11, "gemm-no-c", weights={"b": _f32(7, 3)}),
    _one("MatMul", {"a": RNG.integers(-50, 50, (2, 3, 5)).astype(np.int32)}, 13, "matmul-int32",
         weights={"b": RNG.integers(-50, 50, (5, 4)).astype(np.int32)}),
    _one("MatMul", {"a": _f32(2, 3, 5, 6)}, 13, "matmul-batched", weights={"b": _f32(3, 6, 4)}),
    # indexing and layout
    _one("Gather", {"x": X3}, 13, "gather-axis1-negative", weights={"i": np.array([[-1, 0], [2, -3]], np.int64)},
         axis=1),
    _one("Gather", {"x": X3}, 13, "gather-scalar-index", weights={"i": np.array(-2, np.int64)}, axis=-1),
    _one("Reshape", {"x": X3}, 13, "reshape-zero-and-minus-one", weights={"shape": _i64(0, -1)}),
    _one("Reshape", {"x": X3}, 14, "reshape-zero-copies-middle", weights={"shape": _i64(-1, 0, 2, 2)}),
    _one("Reshape", {"x": np.zeros((0, 3), np.float32)}, 14, "reshape-allowzero",
         weights={"shape": _i64(3, 0)}, allowzero=1),
    _one("Flatten", {"x": X3}, 13, "flatten-axis2", axis=2),
    _one("Flatten", {"x": X3}, 13, "flatten-axis-negative", axis=-3),
    _one("Squeeze", {"x": _f32(1, 3, 1, 2)}, 11, "squeeze-11-attr", axes=[-2]),
    _one("Squeeze", {"x": _f32(1, 3, 1, 2)}, 13, "squeeze-13-input", weights={"axes": _i64(0)}),
    _one("Squeeze", {"x": _f32(1, 3, 1, 2)}, 13, "squeeze-13-all"),
    _one("Unsqueeze", {"x": _f32(3, 2)}, 11, "unsqueeze-11-attr", axes=[0, -1]),
    _one("Unsqueeze", {"x": _f32(3, 2)}, 13, "unsqueeze-13-input", weights={"axes": _i64(3, 1)}),
    _one("Transpose", {"x": X3}, 13, "transpose-perm", perm=[2, 0, 1]),
    _one("Transpose", {"x": X3}, 13, "transpose-default"),
    _one("Expand", {"x": _f32(3, 1)}, 13, "expand-both-ways", weights={"shape": _i64(2, 1, 4)}),
    _one("Tile", {"x": X3}, 13, "tile", weights={"r": _i64(2, 1, 3)}),
    _one("Concat", {"a": X3, "b": X3[:, :1]}, 13, "concat-axis1", axis=1),
    _one("Shape", {"x": X3}, 15, "shape-start-end", start=1, end=-1),
    _one("Shape", {"x": X3}, 13, "shape"),
    _one("Size", {"x": X3}, 13, "size"),
    _one("Range", {"s": np.array(7, np.int64)}, 13, "range-int-negative",
         weights={"l": np.array(-4, np.int64), "d": np.array(-3, np.int64)}),
    _one("Range", {"s": np.array(0.5, np.float32)}, 13, "range-float",
         weights={"l": np.array(3.2, np.float32), "d": np.array(0.25, np.float32)}),
    _one("ConstantOfShape", {"s": _i64(2, 3)}, 13, "constantofshape-int",
         value=numpy_helper.from_array(np.array([7], np.int64))),
    _one("ConstantOfShape", {"s": _i64(2, 3)}, 13, "constantofshape-default"),
    # Clip: attributes before opset 11, optional inputs from it on
    _one("Clip", {"x": X3}, 10, "clip-10-attr", min=-1.0, max=0.5),
    _one("Clip", {"x": X3}, 13, "clip-13-max-only", weights={"_min": None, "max": np.array(0.5, np.float32)}),
    _one("Clip", {"x": X3}, 11, "clip-11-both", weights={"min": np.array(-0.5, np.float32),
                                                          "max": np.array(6, np.float32)}),
    _one("Clip", {"x": np.arange(-5, 5, dtype=np.int32)}, 13, "clip-int32",
         weights={"min": np.array(-2, np.int32), "max": np.array(3, np.int32)}),
    # integer arithmetic: Div truncates toward zero, Mod follows the divisor's sign (fmod=1: the dividend's)
    _one("Div", {"a": _i64(7, -7, 7, -7, 0, 6, -6)}, 13, "div-int64",
         weights={"b": _i64(2, 2, -2, -2, 3, 3, 4)}),
    _one("Div", {"a": np.array([7, -7, 9, -9], np.int32)}, 13, "div-int32",
         weights={"b": np.array([-3, 3, 4, -4], np.int32)}),
    _one("Mod", {"a": _i64(7, -7, 7, -7, 0)}, 13, "mod-int64", weights={"b": _i64(3, 3, -3, -3, 5)}),
    _one("Mod", {"a": np.array([7, -7, 7, -7], np.int32)}, 13, "mod-fmod-int32",
         weights={"b": np.array([3, 3, -3, -3], np.int32)}, fmod=1),
    _one("Mod", {"a": X3 * 3}, 13, "mod-fmod-float", weights={"b": np.full(4, 1.5, np.float32)}, fmod=1),
    _one("Pow", {"a": np.abs(X3)}, 13, "pow-float", weights={"b": np.array(0.5, np.float32)}),
    _one("Pow", {"a": X3}, 13, "pow-int-exponent", weights={"b": np.array(3, np.int64)}),
    # elementwise, activations and normalisation
    _one("Sigmoid", {"x": X3 * 40}, 13, "sigmoid-large"),
    _one("HardSigmoid", {"x": X3}, 13, "hardsigmoid", alpha=1 / 6, beta=0.5),
    *[_one(op, {"x": np.abs(X3) + 0.1}, 13) for op in ("Erf", "Sqrt", "Tanh", "Neg", "Relu", "Exp", "Log", "Abs",
                                                       "Reciprocal", "Floor", "Ceil")],
    _one("Max", {"a": X3, "b": X3[:1], "c": X3[..., :1]}, 13, "max-variadic"),
    _one("Min", {"a": X3}, 13, "min-single"),
    _one("Where", {"c": X3 > 0, "a": X3}, 13, "where", weights={"b": np.array(-9, np.float32)}),
    _one("LayerNormalization", {"x": X3 + 5}, 17, "layernorm-axis1", weights={"s": _f32(3, 4), "b": _f32(3, 4)},
         axis=1, epsilon=1e-3),
    Case("layernorm-three-outputs",
         [node("LayerNormalization", ["x", "s"], ("y", "mean", "inv_std"), axis=-1)], {"x": X3}, 17,
         {"s": _f32(4)}, ("y", "mean", "inv_std")),
    _one("BatchNormalization", {"x": IMAGE}, 11, "batchnorm",
         weights={"s": _f32(4), "b": _f32(4), "m": _f32(4), "v": np.abs(_f32(4)) + 0.1}, epsilon=1e-3),
    # types and comparisons (exact)
    *[_one("Cast", {"x": X3 * 5}, 13, f"cast-to-{name}", to=to)
      for name, to in (("int64", TensorProto.INT64), ("int32", TensorProto.INT32), ("bool", TensorProto.BOOL),
                       ("float16", TensorProto.FLOAT16), ("double", TensorProto.DOUBLE))],
    *[_one(op, {"a": np.round(X3), "b": np.round(X3[:1])}, 13, op.lower())
      for op in ("Equal", "Less", "Greater", "GreaterOrEqual", "LessOrEqual")],
    *[_one(op, {"a": X3 > 0, "b": X3 < 1}, 13, op.lower()) for op in ("And", "Or", "Xor")],
    _one("Not", {"x": X3 > 0}, 13, "not"),
    _one("IsNaN", {"x": np.where(X3 > 1, np.nan, X3).astype(np.float32)}, 13, "isnan"),
    # Split: sizes as an attribute (opset 11) or an input (13), num_outputs with a smaller last chunk (18)
    Case("split-11-attr", [node("Split", ["x"], ("y", "z"), axis=2, split=[1, 3])], {"x": X3}, 11,
         outputs=("y", "z")),
    Case("split-13-input", [node("Split", ["x", "s"], ("y", "z"), axis=-1)], {"x": X3}, 13,
         {"s": _i64(3, 1)}, ("y", "z")),
    Case("split-18-num-outputs", [node("Split", ["x"], ("y", "z"), axis=1, num_outputs=2)], {"x": X3}, 18,
         outputs=("y", "z")),
    # Constant forms, then shape arithmetic on the host ending in a float output
    Case("constant-forms", [
        node("Constant", [], ("f",), value_floats=[1.5, -2.0]),
        node("Constant", [], ("g",), value_float=0.25),
        node("Constant", [], ("i",), value_ints=[2, 1]),
        node("Constant", [], ("j",), value_int=3),
        node("Cast", ["i"], ("i_f",), to=TensorProto.FLOAT),
        node("Cast", ["j"], ("j_f",), to=TensorProto.FLOAT),
        node("Mul", ["f", "i_f"], ("fi",)),
        node("Add", ["fi", "g"], ("fig",)),
        node("Sum", ["fig", "j_f", "x"], ("y",)),
    ], {"x": _f32(2)}, 13),
    # DequantizeLinear: per tensor (opset 10), per axis (13), blocked int8 / int4 (21), 2-bit blocked (25)
    _one("DequantizeLinear", {}, 10, "dequantize-per-tensor",
         weights={"q": RNG.integers(-128, 127, (5, 6)).astype(np.int8), "s": np.array(0.05, np.float32),
                  "z": np.array(3, np.int8)}),
    _one("DequantizeLinear", {}, 13, "dequantize-per-axis-uint8",
         weights={"q": RNG.integers(0, 255, (5, 6)).astype(np.uint8), "s": np.abs(_f32(6)),
                  "z": RNG.integers(100, 150, 6).astype(np.uint8)}, axis=1),
    _one("DequantizeLinear", {}, 21, "dequantize-blocked-int8",
         weights={"q": RNG.integers(-128, 127, (10, 6)).astype(np.int8), "s": np.abs(_f32(3, 6)),
                  "z": RNG.integers(-5, 5, (3, 6)).astype(np.int8)}, axis=0, block_size=4),
    _one("DequantizeLinear", {}, 21, "dequantize-blocked-int4",
         weights={"q": RNG.integers(-8, 8, (4, 9)).astype(ml_dtypes.int4), "s": np.abs(_f32(4, 3)),
                  "z": RNG.integers(-2, 2, (4, 3)).astype(ml_dtypes.int4)}, axis=1, block_size=3),
    _one("DequantizeLinear", {}, 25, "dequantize-blocked-uint2",
         weights={"q": RNG.integers(0, 4, (64, 8)).astype(ml_dtypes.uint2), "s": np.abs(_f32(2, 8)),
                  "z": np.ones((2, 8), ml_dtypes.uint2)}, axis=0, block_size=32),
]


def _run_both(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(names, feeds)))
    got = Executor(ir.from_proto(model)).run(feeds)
    return want, got


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_onnxruntime(case: Case):
    want, got = _run_both(case.model(), case.feeds)
    for name, expected in want.items():
        actual = got[name]
        assert isinstance(actual, np.ndarray), f"{name}: {type(actual).__name__}, not an array"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
            f"{name}: {actual.dtype}{list(actual.shape)} != onnxruntime's {expected.dtype}{list(expected.shape)}")
        if expected.dtype.kind == "f":
            scale = max(1.0, float(np.abs(expected.astype(np.float64)).max(initial=0.0)))
            np.testing.assert_allclose(actual, expected, rtol=0, atol=FLOAT_ATOL * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_resize_rejects_cubic_by_name():
    case = _one("Resize", {"x": IMAGE}, 13, weights={"_roi": None, "scales": np.array([1, 1, 2, 2], np.float32)},
                mode="cubic")
    with pytest.raises(BadInput, match="cubic"):
        Executor(ir.from_proto(case.model())).run(case.feeds)


@pytest.mark.parametrize("op", ["Det", "Einsum"])
def test_unsupported_op_is_named(op):
    inputs = ["x"] if op == "Det" else ["x", "x"]
    attrs = {} if op == "Det" else {"equation": "ij,jk->ik"}
    case = Case(op, [node(op, inputs, **attrs)], {"x": _f32(3, 3)}, 13)
    with pytest.raises(BadInput, match=rf"\b{op}\b"):
        Executor(ir.from_proto(case.model()))


def test_runtime_doc_lists_every_supported_op():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "runtime.md").read_text()
    listed = doc.split("Standard ops:", 1)[1].split("\n\n")[1]
    assert listed.rstrip(".\n").replace("\n", " ").split(", ") == [op for op in supported_ops() if "::" not in op]
    others = doc.split("Ops of other domains:", 1)[1].split("\n\n")[0]
    assert [op for op in supported_ops() if "::" in op] == [op.strip(" .`") for op in others.replace("\n", " ").split(",")]


def test_gather_block_quantized_refuses_codes_it_does_not_unpack():
    """onnxruntime's own quantizer writes uint4 tables; the executor reads only the uint8 bytes symshrink writes."""
    table = numpy_helper.from_array(np.zeros((8, 32), ml_dtypes.uint4), "data")
    scales = numpy_helper.from_array(np.ones((8, 1), np.float32), "scales")
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["y"], domain="com.microsoft",
                          block_size=32, bits=4)],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(BadInput, match="GatherBlockQuantized over uint4 codes"):
        Executor(ir.from_proto(model))
