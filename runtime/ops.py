"""The standard ONNX ops of the executor, written once over an array namespace `xp` (numpy or CuPy).

`OPS` maps an op type to a handler `(ctx, *inputs) -> output | tuple of outputs`; `ctx` carries the node's
attributes, the model's opset (some ops changed meaning between opsets) and the backend. Missing optional
inputs arrive as None. An op missing here is named in the executor's error before anything runs.

Handlers use only functions that numpy and CuPy share, and keep the ONNX output type (float32 stays
float32, integer division truncates). Metadata (Shape, Size) is always a numpy int64 array, so shape
arithmetic stays on the host; small integer inputs (shapes, axes, starts) are read with `ctx.ints`.
Convolution and pooling loop over the kernel offsets (kh * kw strided slices), never over output pixels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import onnx_ir as ir

from symshrink.errors import BadInput
from symshrink.runtime.backend import Backend

__all__ = ["OPS", "HOST_INPUTS", "PACKED_INPUTS", "OpContext", "register", "supported_ops", "op_key", "unpack_low_bits"]


@dataclass
class OpContext:
    backend: Backend
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def xp(self):
        return self.backend.xp

    def ints(self, array) -> list[int]:
        """A small integer tensor (a shape, axes, starts) as Python ints on the host."""
        return [int(v) for v in np.asarray(self.backend.to_host(array)).reshape(-1)]

    def floats(self, array) -> list[float]:
        """A small float tensor (Resize scales) as Python floats on the host."""
        return [float(v) for v in np.asarray(self.backend.to_host(array)).reshape(-1)]

    def string(self, name: str, default: str) -> str:
        """A STRING attribute as str (onnx_ir gives str; protobuf-built attributes may be bytes)."""
        value = self.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value


OpHandler = Callable[..., Any]
OPS: dict[str, OpHandler] = {}
HOST_INPUTS: dict[str, tuple[int, ...]] = {}  # op -> inputs its handler reads as host ints (shapes, axes)


def _as_array(value):
    """numpy turns 0-d results of ufuncs and reductions into scalars (np.float32...); the executor tells host
    values by `isinstance(value, np.ndarray)`, so they go back to 0-d arrays. CuPy always returns arrays."""
    return np.asarray(value) if isinstance(value, np.generic) else value


def op_key(domain: str, op_type: str) -> str:
    """The key of an op in `OPS`: its type for the standard domain, else "domain::type"."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def register(*op_types: str, host_inputs: tuple[int, ...] = ()) -> Callable[[OpHandler], OpHandler]:
    """Register `handler` for `op_types` (`op_key`s); `host_inputs` are the input positions it reads with
    `ctx.ints` / `ctx.floats`, which the executor leaves on the host when they are there (no copy to the device
    and back)."""
    def add(handler: OpHandler) -> OpHandler:
        def run(ctx: OpContext, *inputs):
            result = handler(ctx, *inputs)
            return tuple(map(_as_array, result)) if isinstance(result, tuple) else _as_array(result)

        for op_type in op_types:
            OPS[op_type] = run
            HOST_INPUTS[op_type] = host_inputs
        return handler

    return add


def supported_ops() -> list[str]:
    return sorted(OPS)


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise BadInput(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def _axes_argument(ctx: OpContext, axes, since: int) -> list[int] | None:
    """Axes as an attribute before opset `since`, as an optional input from it on (None: not given)."""
    if ctx.opset >= since:
        return ctx.ints(axes) if axes is not None else None
    return ctx.attrs.get("axes")


# -- elementwise --------------------------------------------------------------------------------------------

_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Pow": "power", "Equal": "equal",
           "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal", "LessOrEqual": "less_equal",
           "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor"}
_VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add"}  # one or more inputs, broadcast together
_UNARY = {"Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Abs": "abs", "Neg": "negative", "Tanh": "tanh",
          "IsNaN": "isnan", "Not": "logical_not", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil"}


def _binary(name: str) -> OpHandler:
    def handler(ctx: OpContext, a, b):
        result = getattr(ctx.xp, name)(a, b)
        return result.astype(a.dtype, copy=False) if name == "power" else result  # Pow keeps the base's type
    return handler


def _variadic(name: str) -> OpHandler:
    return lambda ctx, *inputs: reduce(getattr(ctx.xp, name), inputs)


def _unary(name: str) -> OpHandler:
    return lambda ctx, a: getattr(ctx.xp, name)(a)


for _op, _fn in _BINARY.items():
    register(_op)(_binary(_fn))
for _op, _fn in _VARIADIC.items():
    register(_op)(_variadic(_fn))
for _op, _fn in _UNARY.items():
    register(_op)(_unary(_fn))


@register("Div")
def _div(ctx: OpContext, a, b):
    if a.dtype.kind in "iu":  # integer division truncates toward zero (floor division rounds down)
        q = ctx.xp.floor_divide(a, b)
        return q + ((q * b != a) & ((a < 0) != (b < 0))).astype(a.dtype)
    return a / b


@register("Mod")
def _mod(ctx: OpContext, a, b):
    """fmod=0 (integers only): the sign of the divisor, as Python's %; fmod=1: the sign of the dividend, as C."""
    return ctx.xp.fmod(a, b) if ctx.attrs.get("fmod", 0) else ctx.xp.mod(a, b)


@register("Erf")
def _erf(ctx: OpContext, x):
    return ctx.backend.erf(x)


@register("Where")
def _where(ctx: OpContext, condition, a, b):
    return ctx.xp.where(condition, a, b)


@register("Clip")
def _clip(ctx: OpContext, x, low=None, high=None):
    """Bounds are attributes min/max before opset 11, optional scalar inputs from it on."""
    if ctx.opset < 11:
        low, high = ctx.attrs.get("min"), ctx.attrs.get("max")
    if low is not None:
        x = ctx.xp.maximum(x, ctx.xp.asarray(low, dtype=x.dtype))
    if high is not None:
        x = ctx.xp.minimum(x, ctx.xp.asarray(high, dtype=x.dtype))
    return x


# -- activations --------------------------------------------------------------------------------------------


@register("Relu")
def _relu(ctx: OpContext, x):
    return ctx.xp.maximum(x, x.dtype.type(0))


@register("Sigmoid")
def _sigmoid(ctx: OpContext, x):
    e = ctx.xp.exp(-ctx.xp.abs(x))  # exp of a non-positive number: no overflow
    return ctx.xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


@register("HardSigmoid")
def _hard_sigmoid(ctx: OpContext, x):
    alpha, beta = x.dtype.type(ctx.attrs.get("alpha", 0.2)), x.dtype.type(ctx.attrs.get("beta", 0.5))
    return ctx.xp.clip(alpha * x + beta, x.dtype.type(0), x.dtype.type(1))


@register("Softmax")
def _softmax(ctx: OpContext, x):
    """Opset < 13 flattens to 2-D at `axis` (default 1) and normalises each row; opset >= 13 normalises along
    `axis` alone (default -1)."""
    axis = _axis(ctx.attrs.get("axis", 1 if ctx.opset < 13 else -1), x.ndim)
    if ctx.opset < 13:
        rows = x.reshape(math.prod(x.shape[:axis]), -1)
        return _softmax_along(ctx.xp, rows, 1).reshape(x.shape)
    return _softmax_along(ctx.xp, x, axis)


def _softmax_along(xp, x, axis: int):
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# -- constants, shapes and types ----------------------------------------------------------------------------


@register("Identity")
def _identity(ctx: OpContext, x):
    return x


@register("Constant")
def _constant(ctx: OpContext):
    attrs, xp = ctx.attrs, ctx.xp
    if "value" in attrs:
        return xp.asarray(attrs["value"])
    for name, dtype in (("value_float", xp.float32), ("value_floats", xp.float32),
                        ("value_int", xp.int64), ("value_ints", xp.int64)):
        if name in attrs:
            return xp.asarray(attrs[name], dtype=dtype)
    raise BadInput(f"Constant with attribute(s) {', '.join(attrs)}: the executor takes value, value_float(s) "
                   "and value_int(s)")


@register("ConstantOfShape", host_inputs=(0,))
def _constant_of_shape(ctx: OpContext, shape):
    value = ctx.attrs.get("value")
    value = np.zeros(1, np.float32) if value is None else np.asarray(value)
    return ctx.xp.full(tuple(ctx.ints(shape)), value.reshape(-1)[0], dtype=value.dtype)


@register("Shape")
def _shape(ctx: OpContext, x):
    """A host int64 array whatever the backend. start/end (opset 15) clamp as Python slices do."""
    start, end = ctx.attrs.get("start", 0), ctx.attrs.get("end")
    return np.array(x.shape[start:end], np.int64)


@register("Size")
def _size(ctx: OpContext, x):
    return np.array(math.prod(x.shape), np.int64)


@register("Cast")
def _cast(ctx: OpContext, x):
    dtype = ir.DataType(ctx.attrs["to"])
    if dtype == ir.DataType.STRING:
        raise BadInput("Cast to STRING: the executor has no string tensors")
    return x.astype(dtype.numpy())


@register("Range", host_inputs=(0, 1, 2))
def _range(ctx: OpContext, start, limit, delta):
    start, limit, delta = (ctx.backend.to_host(v) for v in (start, limit, delta))
    return ctx.xp.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


# -- layout: reshape, index, join -----------------------------------------------------------------------------


@register("Reshape", host_inputs=(1,))
def _reshape(ctx: OpContext, x, shape):
    """0 copies the input's dimension (unless allowzero=1, where 0 is a zero-sized dimension); -1 is inferred."""
    dims = ctx.ints(shape)
    if not ctx.attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@register("Flatten")
def _flatten(ctx: OpContext, x):
    axis = ctx.attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("Squeeze", host_inputs=(1,))
def _squeeze(ctx: OpContext, x, axes=None):
    """Axes: attribute before opset 13, optional input from it on; none given squeezes every 1."""
    axes = _axes_argument(ctx, axes, 13)
    return ctx.xp.squeeze(x) if not axes else ctx.xp.squeeze(x, axis=tuple(_axis(a, x.ndim) for a in axes))


@register("Unsqueeze", host_inputs=(1,))
def _unsqueeze(ctx: OpContext, x, axes=None):
    """Axes (attribute before opset 13, input from it on) index the output, whose rank is rank + len(axes)."""
    axes = _axes_argument(ctx, axes, 13) or []
    rank = x.ndim + len(axes)
    shape = list(x.shape)
    for axis in sorted(_axis(a, rank) for a in axes):
        shape.insert(axis, 1)
    return x.reshape(shape)


@register("Transpose")
def _transpose(ctx: OpContext, x):
    return ctx.xp.transpose(x, ctx.attrs.get("perm"))  # no perm: reverse the axes


@register("Concat")
def _concat(ctx: OpContext, *inputs):
    return ctx.xp.concatenate(inputs, axis=ctx.attrs["axis"])


@register("Split", host_inputs=(1,))
def _split(ctx: OpContext, x, split=None):
    """Sizes are an attribute before opset 13 and an optional input from it on; without sizes, opset 18's
    `num_outputs` gives equal chunks (the last one smaller)."""
    axis = _axis(ctx.attrs.get("axis", 0), x.ndim)
    sizes = ctx.ints(split) if split is not None else ctx.attrs.get("split")
    if not sizes:
        parts = ctx.attrs.get("num_outputs")
        if parts is None:
            raise BadInput("Split into equal parts without num_outputs: the op handler is not told how many "
                           "outputs the node has")
        chunk = -(-x.shape[axis] // parts)
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return tuple(ctx.xp.split(x, list(itertools.accumulate(sizes[:-1])), axis=axis))


def _slice_of(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX Slice bounds for one axis: negative values count from the end, then clamp to [0, dim] (positive
    step) or [-1, dim - 1] (negative step), where -1 means 'before the first element'."""
    if step == 0:
        raise BadInput("Slice step 0")
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


@register("Slice", host_inputs=(1, 2, 3, 4))
def _slice(ctx: OpContext, x, starts=None, ends=None, axes=None, steps=None):
    """Bounds are attributes before opset 10 (no steps) and inputs from it on."""
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attrs["starts"], ctx.attrs["ends"], ctx.attrs.get("axes"), None
    else:
        starts, ends = ctx.ints(starts), ctx.ints(ends)
        axes, steps = (ctx.ints(v) if v is not None else None for v in (axes, steps))
    axes = axes or range(len(starts))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(axis, x.ndim)
        index[axis] = _slice_of(start, end, step, x.shape[axis])
    return x[tuple(index)]


@register("Gather")
def _gather(ctx: OpContext, data, indices):
    """Negative indices count from the end of `axis`."""
    axis = _axis(ctx.attrs.get("axis", 0), data.ndim)
    indices = ctx.xp.where(indices < 0, indices + data.shape[axis], indices)
    return ctx.xp.take(data, indices, axis=axis)


@register("Expand", host_inputs=(1,))
def _expand(ctx: OpContext, x, shape):
    """Broadcast both ways: a 1 in `shape` keeps the input's dimension."""
    shape = np.broadcast_shapes(x.shape, tuple(ctx.ints(shape)))
    return ctx.xp.broadcast_to(x, shape).copy()


@register("Tile", host_inputs=(1,))
def _tile(ctx: OpContext, x, repeats):
    return ctx.xp.tile(x, ctx.ints(repeats))


# -- reductions and normalisation -----------------------------------------------------------------------------

# op -> (xp reduction, first opset that takes axes as an input rather than an attribute)
_REDUCE = {"ReduceSum": ("sum", 13), "ReduceMean": ("mean", 18), "ReduceMax": ("max", 18),
           "ReduceMin": ("min", 18), "ReduceProd": ("prod", 18)}


def _reduction(name: str, since: int) -> OpHandler:
    def handler(ctx: OpContext, x, axes=None):
        """No axes reduces all of them, unless noop_with_empty_axes=1 (input form), which returns the input."""
        axes = _axes_argument(ctx, axes, since)
        if not axes and ctx.opset >= since and ctx.attrs.get("noop_with_empty_axes", 0):
            return x
        axis = tuple(_axis(a, x.ndim) for a in axes) if axes else None
        result = getattr(ctx.xp, name)(x, axis=axis, keepdims=bool(ctx.attrs.get("keepdims", 1)))
        return result.astype(x.dtype, copy=False)  # numpy sums small integers as int64, means them as float64
    return handler


for _op, (_fn, _since) in _REDUCE.items():
    register(_op, host_inputs=(1,))(_reduction(_fn, _since))


@register("GlobalAveragePool")
def _global_average_pool(ctx: OpContext, x):
    return ctx.xp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@register("LayerNormalization")
def _layer_norm(ctx: OpContext, x, scale, bias=None):
    """Normalises over axes [axis, rank); returns Y, Mean and InvStdDev (the executor keeps the outputs the
    node declares). Statistics are computed in float32 at least (stash_type 1)."""
    xp = ctx.xp
    axes = tuple(range(_axis(ctx.attrs.get("axis", -1), x.ndim), x.ndim))
    xs = x.astype(xp.float32) if x.dtype.itemsize < 4 else x
    mean = xp.mean(xs, axis=axes, keepdims=True)
    centred = xs - mean
    inv_std = 1 / xp.sqrt(xp.mean(centred * centred, axis=axes, keepdims=True) + xs.dtype.type(ctx.attrs.get("epsilon", 1e-5)))
    y = centred * inv_std * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False), mean, inv_std


@register("BatchNormalization")
def _batch_norm(ctx: OpContext, x, scale, bias, mean, var):
    """Inference form: y = (x - mean) / sqrt(var + epsilon) * scale + bias, per channel (axis 1)."""
    if ctx.attrs.get("training_mode", 0):
        raise BadInput("BatchNormalization with training_mode=1: the executor runs inference only")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    factor = scale / ctx.xp.sqrt(var + var.dtype.type(ctx.attrs.get("epsilon", 1e-5)))
    return x * factor.reshape(shape) + (bias - mean * factor).reshape(shape)


# -- linear algebra -------------------------------------------------------------------------------------------


@register("MatMul")
def _matmul(ctx: OpContext, a, b):
    return ctx.xp.matmul(a, b)


@register("Gemm")
def _gemm(ctx: OpContext, a, b, c=None):
    """Y = alpha * A' B' + beta * C, A' = A.T when transA, B' = B.T when transB; C optional (opset 11+)."""
    attrs = ctx.attrs
    y = ctx.xp.matmul(a.T if attrs.get("transA", 0) else a, b.T if attrs.get("transB", 0) else b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * y.dtype.type(alpha)
    if c is not None:
        y = y + (c * c.dtype.type(beta) if beta != 1.0 else c)
    return y


# -- convolution and pooling ----------------------------------------------------------------------------------


@dataclass
class _Window:
    """Where a sliding window goes over the spatial axes: strides, dilations, padding and output size."""

    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]
    fit: list[int]  # cells past `end` that ceil_mode's last partial window reaches (never counted as padding)
    out: list[int]

    def pad(self, xp, x, value=0):
        """x with its spatial axes (all but the first two) padded by begin and end + fit."""
        return _pad(xp, x, self.begin, [e + f for e, f in zip(self.end, self.fit)], value)

    def offsets(self, kernel: Sequence[int]):
        """For each kernel offset, the index of the padded input it meets at every output position."""
        for offset in itertools.product(*map(range, kernel)):
            yield offset, (Ellipsis, *(slice(k * d, k * d + (o - 1) * s + 1, s)
                                       for k, d, o, s in zip(offset, self.dilations, self.out, self.strides)))


def _window(ctx: OpContext, spatial: Sequence[int], kernel: Sequence[int], ceil_mode: bool = False) -> _Window:
    """auto_pad NOTSET (explicit pads), VALID, SAME_UPPER / SAME_LOWER (the odd padding after / before).
    With ceil_mode a last partial window counts, unless it would start in the end padding."""
    n = len(spatial)
    strides = list(ctx.attrs.get("strides") or [1] * n)
    dilations = list(ctx.attrs.get("dilations") or [1] * n)
    pads = list(ctx.attrs.get("pads") or [0] * 2 * n)
    auto_pad = ctx.string("auto_pad", "NOTSET")
    window = _Window(strides, dilations, [], [], [], [])
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        span = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = -(-size // s)
            total = max(0, (out - 1) * s + span - size)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            end = total - begin
        elif auto_pad in ("NOTSET", "VALID"):
            begin, end = (pads[i], pads[i + n]) if auto_pad == "NOTSET" else (0, 0)
            room = size + begin + end - span
            out = (-(-room // s) if ceil_mode else room // s) + 1
            if ceil_mode and (out - 1) * s >= size + begin:
                out -= 1
        else:
            raise BadInput(f"auto_pad {auto_pad!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
        if out < 1:
            raise BadInput(f"a window {span} wide does not fit an input of size {size} padded by {begin} + {end}")
        window.begin.append(begin)
        window.end.append(end)
        window.fit.append(max(0, (out - 1) * s + span - size - begin - end))
        window.out.append(out)
    return window


def _pad(xp, x, begin: Sequence[int], end: Sequence[int], value=0):
    """Pad the last len(begin) axes."""
    if not any(begin) and not any(end):
        return x
    widths = [(0, 0)] * (x.ndim - len(begin)) + list(zip(begin, end))
    return xp.pad(x, widths, mode="constant", constant_values=value)


@register("Conv")
def _conv(ctx: OpContext, x, w, b=None):
    """Grouped N-d convolution: for each kernel offset, a strided slice of the padded input times the weights
    at that offset (a batched matmul over each group's channels; a broadcast product when a group has one)."""
    xp = ctx.xp
    groups = ctx.attrs.get("group", 1)
    n, channels, *spatial = x.shape
    m, per_group, *kernel = w.shape
    if per_group * groups != channels:
        raise BadInput(f"Conv: {channels} input channels do not fit {groups} groups of weights with {per_group}")
    window = _window(ctx, spatial, kernel)
    xpad = window.pad(xp, x)
    weights = w.reshape(groups, m // groups, per_group, *kernel)
    y = xp.zeros((n, groups, m // groups, math.prod(window.out)), dtype=x.dtype)
    for offset, index in window.offsets(kernel):
        taps = xpad[index].reshape(n, groups, per_group, -1)  # [N, G, C/G, P]
        wk = weights[(Ellipsis, *offset)]  # [G, M/G, C/G]
        y += wk[None] * taps if per_group == 1 else xp.matmul(wk, taps)
    y = y.reshape(n, m, *window.out)
    return y if b is None else y + b.reshape(1, m, *[1] * len(kernel))


@register("ConvTranspose")
def _conv_transpose(ctx: OpContext, x, w, b=None):
    """Each input pixel scatters weight * value into a `stride`-spaced output grid: one matmul gives every
    kernel offset's contribution, then each is added into its strided slice. The full output
    stride * (in - 1) + output_padding + (k - 1) * dilation + 1 is cropped by the pads; output_shape or
    auto_pad SAME set the pads instead (total padding split as the ONNX spec says)."""
    xp, attrs = ctx.xp, ctx.attrs
    groups = attrs.get("group", 1)
    n, _, *spatial = x.shape
    per_group, m_per_group, *kernel = w.shape[0] // groups, *w.shape[1:]
    nd = len(kernel)
    strides = list(attrs.get("strides") or [1] * nd)
    dilations = list(attrs.get("dilations") or [1] * nd)
    extra = list(attrs.get("output_padding") or [0] * nd)
    full = [s * (i - 1) + e + (k - 1) * d + 1 for s, i, e, k, d in zip(strides, spatial, extra, kernel, dilations)]
    auto_pad = ctx.string("auto_pad", "NOTSET")
    shape = attrs.get("output_shape") or ([i * s for i, s in zip(spatial, strides)] if auto_pad.startswith("SAME") else None)
    if shape:
        shape = list(shape)[-nd:]
        totals = [f - o for f, o in zip(full, shape)]
        if min(totals) < 0:
            raise BadInput(f"ConvTranspose output_shape {shape} is larger than the full output {full}")
        lower = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = lower + [t - lo for t, lo in zip(totals, lower)]
    else:
        pads = list(attrs.get("pads") or [0] * 2 * nd) if auto_pad != "VALID" else [0] * 2 * nd
    weights = w.reshape(groups, per_group, -1).transpose(0, 2, 1)  # [G, M/G * K, C/G]
    taps = xp.matmul(weights, x.reshape(n, groups, per_group, -1)).reshape(n, groups, m_per_group, *kernel, *spatial)
    y = xp.zeros((n, groups, m_per_group, *full), dtype=x.dtype)
    for offset in itertools.product(*map(range, kernel)):
        index = tuple(slice(k * d, k * d + s * (i - 1) + 1, s) for k, d, s, i in zip(offset, dilations, strides, spatial))
        y[(Ellipsis, *index)] += taps[(slice(None),) * 3 + offset]
    crop = tuple(slice(pads[i], f - pads[i + nd]) for i, f in enumerate(full))
    y = y.reshape(n, groups * m_per_group, *full)[(slice(None), slice(None), *crop)]
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


@register("MaxPool")
def _max_pool(ctx: OpContext, x):
    """Padding never wins (it is the type's lowest value). The Indices output is not computed."""
    kernel = ctx.attrs["kernel_shape"]
    window = _window(ctx, x.shape[2:], kernel, bool(ctx.attrs.get("ceil_mode", 0)))
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xpad = window.pad(ctx.xp, x, lowest)
    return reduce(ctx.xp.maximum, (xpad[index] for _, index in window.offsets(kernel)))


@register("AveragePool")
def _average_pool(ctx: OpContext, x):
    """The divisor counts the input elements under the window, plus the explicit pads when
    count_include_pad=1; the cells that ceil_mode adds past the pads never count."""
    xp = ctx.xp
    kernel = ctx.attrs["kernel_shape"]
    spatial = x.shape[2:]
    window = _window(ctx, spatial, kernel, bool(ctx.attrs.get("ceil_mode", 0)))
    xpad = window.pad(xp, x)
    total = reduce(xp.add, (xpad[index] for _, index in window.offsets(kernel)))
    counted = xp.ones(spatial, dtype=x.dtype)
    if ctx.attrs.get("count_include_pad", 0):
        counted = _pad(xp, counted, window.begin, window.end, 1)
        counted = _pad(xp, counted, [0] * len(spatial), window.fit)
    else:
        counted = window.pad(xp, counted)
    return total / reduce(xp.add, (counted[index] for _, index in window.offsets(kernel)))


# -- resize ---------------------------------------------------------------------------------------------------


def _source_coordinates(mode: str, out: int, size: int, scale: float) -> np.ndarray:
    """Input coordinate of each output index (float32 on the host, as onnxruntime computes it)."""
    x = np.arange(out, dtype=np.float32)
    scale = np.float32(scale)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out > 1 else np.zeros(out, np.float32)
    if mode == "align_corners":
        return x * np.float32((size - 1) / (out - 1)) if out > 1 else np.zeros(out, np.float32)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "half_pixel_symmetric":
        offset = np.float32(size / 2 * (1 - out / (scale * size)))
        return offset + (x + 0.5) / scale - 0.5
    raise BadInput(f"Resize coordinate_transformation_mode {mode!r} is not supported by the executor")


_NEAREST = {"round_prefer_floor": lambda c: np.ceil(c - 0.5), "round_prefer_ceil": lambda c: np.floor(c + 0.5),
            "floor": np.floor, "ceil": np.ceil}


@register("Resize", host_inputs=(1, 2, 3))
def _resize(ctx: OpContext, x, roi=None, scales=None, sizes=None):
    """Modes nearest (every nearest_mode) and linear (separable, one axis at a time), with the coordinate
    transformations above; `axes` (opset 18) picks the axes that scales/sizes describe. Opset 10 has only
    (X, scales), asymmetric coordinates and, for nearest, floor when upsampling and ceil when downsampling
    (onnxruntime's reading of Resize-10). cubic, antialias and tf_crop_and_resize raise BadInput."""
    xp, attrs = ctx.xp, ctx.attrs
    if ctx.opset < 11:
        scales, roi = roi, None
    mode = ctx.string("mode", "nearest")
    transform = ctx.string("coordinate_transformation_mode", "half_pixel" if ctx.opset >= 11 else "asymmetric")
    nearest = ctx.string("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise BadInput(f"Resize mode {mode!r} is not supported by the executor (nearest, linear)")
    if nearest not in _NEAREST:
        raise BadInput(f"Resize nearest_mode {nearest!r} is not supported by the executor")
    if attrs.get("antialias", 0) or ctx.string("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise BadInput("Resize with antialias or keep_aspect_ratio_policy is not supported by the executor")
    axes = [_axis(a, x.ndim) for a in attrs.get("axes") or range(x.ndim)]
    size_list = ctx.ints(sizes) if sizes is not None else []
    if size_list:
        outs = size_list
        factors = [o / x.shape[a] for o, a in zip(outs, axes)]
    else:
        factors = ctx.floats(scales)
        outs = [int(math.floor(x.shape[a] * f)) for a, f in zip(axes, factors)]
    for axis, out, factor in zip(axes, outs, factors):
        size = x.shape[axis]
        if out == size and factor == 1.0:
            continue
        coords = _source_coordinates(transform, out, size, factor)
        if mode == "nearest":
            rounding = _NEAREST[nearest if ctx.opset >= 11 else "floor" if factor >= 1 else "ceil"]
            index = np.clip(rounding(coords), 0, size - 1).astype(np.int64)
            x = xp.take(x, xp.asarray(index), axis=axis)
            continue
        coords = np.clip(coords, 0, size - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        shape = [1] * x.ndim
        shape[axis] = out
        weight = xp.asarray((coords - low).astype(x.dtype).reshape(shape))
        below, above = xp.take(x, xp.asarray(low), axis=axis), xp.take(x, xp.asarray(high), axis=axis)
        x = below + (above - below) * weight
    return x


# -- quantization ---------------------------------------------------------------------------------------------


def _widen(xp, a):
    """Quantized codes as int32 (integer types, the 2- and 4-bit ml_dtypes ones included) or float32
    (float8 types): ml_dtypes arrays take no arithmetic of their own."""
    return a.astype(xp.int32 if ir.DataType.from_numpy(a.dtype).is_integer() else xp.float32)


@register("DequantizeLinear")
def _dequantize_linear(ctx: OpContext, x, scale, zero_point=None):
    """y = (x - zero_point) * scale: per tensor (scalar scale), per axis (1-D scale along `axis`) or blocked
    (scale with x's rank, `block_size` consecutive elements along `axis` sharing one scale). Output: the
    scale's type, or `output_dtype` (opset 23)."""
    xp = ctx.xp
    axis = _axis(ctx.attrs.get("axis", 1), x.ndim) if x.ndim else 0
    block = ctx.attrs.get("block_size", 0)

    def spread(param):
        if block:
            return xp.repeat(param, block, axis=axis)[(slice(None),) * axis + (slice(0, x.shape[axis]),)]
        if param.size == 1:
            return param.reshape(())
        return param.reshape([-1 if i == axis else 1 for i in range(x.ndim)])

    codes = _widen(xp, x)
    if zero_point is not None:
        codes = codes - spread(_widen(xp, zero_point))
    y = codes.astype(xp.float32) * spread(scale.astype(xp.float32))
    to = ctx.attrs.get("output_dtype", 0)
    return y.astype(ir.DataType(to).numpy() if to else scale.dtype)


def unpack_low_bits(xp, packed, bits: int, count: int):
    """uint8 rows [R, bytes] of `bits`-bit codes, low bits first -> codes [R, count] (int32)."""
    shifts = xp.arange(0, 8, bits, dtype=xp.uint8)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :count].astype(xp.int32)


def _blocked_rows(xp, codes, scales, zero_points, bits: int, block: int):
    """Rows [R, C] of codes with per-block scales [R, blocks] and packed zero points (None: 2^(bits-1)) -> float32."""
    width = codes.shape[1]
    if zero_points is None:
        zeros = xp.full(scales.shape, 1 << (bits - 1), xp.int32)
    else:
        zeros = unpack_low_bits(xp, zero_points, bits, scales.shape[1])
    offsets = codes - xp.repeat(zeros, block, axis=1)[:, :width]
    return offsets.astype(xp.float32) * xp.repeat(scales.astype(xp.float32), block, axis=1)[:, :width]


# op -> the input holding packed bytes: the handlers unpack uint8 bytes only (onnxruntime's own quantizer may write
# uint4/int4 tables, which the executor widens to a byte each before any op sees them: refused when compiling)
PACKED_INPUTS = {"com.microsoft::GatherBlockQuantized": 0, "com.microsoft::MatMulNBits": 1}


@register("com.microsoft::GatherBlockQuantized")
def _gather_block_quantized(ctx: OpContext, data, indices, scales, zero_points=None):
    """onnxruntime's packed embedding lookup, in the layout `formats.gather_arrays` writes (gather_axis 0,
    quantize_axis 1, uint8 bytes of `bits`-bit codes, low bits first): only the gathered rows are unpacked."""
    xp = ctx.xp
    if ctx.attrs.get("gather_axis", 0) != 0 or ctx.attrs.get("quantize_axis", 1) not in (1, -1) or data.ndim != 2:
        raise BadInput("GatherBlockQuantized: only 2-D tables with gather_axis 0 and quantize_axis 1 are supported")
    bits, block = ctx.attrs.get("bits", 4), ctx.attrs["block_size"]
    rows = xp.where(indices < 0, indices + data.shape[0], indices).reshape(-1)
    picked_scales = scales[rows]
    width = min(data.shape[1] * 8 // bits, picked_scales.shape[1] * block)
    codes = unpack_low_bits(xp, data[rows], bits, width)
    picked_zeros = None if zero_points is None else zero_points[rows]
    values = _blocked_rows(xp, codes, picked_scales, picked_zeros, bits, block)
    return values.astype(scales.dtype).reshape(*indices.shape, width)


@register("com.microsoft::MatMulNBits")
def _matmul_nbits(ctx: OpContext, a, b, scales, zero_points=None, g_idx=None, bias=None):
    """y = a @ W^T (+ bias) for W [N, K] held as onnxruntime's MatMulNBits holds it: b [N, blocks, block bytes] of
    packed codes, scales and packed zero points per row and block (the layout a tied head shares with its table)."""
    xp = ctx.xp
    if g_idx is not None or (zero_points is not None and zero_points.dtype != xp.uint8):
        raise BadInput("MatMulNBits: g_idx and float zero points are not supported")
    k, n, bits, block = (ctx.attrs[key] for key in ("K", "N", "bits", "block_size"))
    codes = unpack_low_bits(xp, b.reshape(n, -1), bits, k)
    weight = _blocked_rows(xp, codes, scales.reshape(n, -1), zero_points, bits, block)
    product = a.astype(xp.float32) @ weight.T
    return (product if bias is None else product + bias.astype(xp.float32)).astype(a.dtype)
