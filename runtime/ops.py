"""The standard ONNX ops of the executor, written once over an array namespace `xp` (numpy or CuPy).

`OPS` maps an op type to a handler `(ctx, *inputs) -> output | tuple of outputs`; `ctx` carries the node's
attributes, the model's opset (some ops changed meaning between opsets) and the backend. An op missing here
is named in the executor's error before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symshrink.runtime.backend import Backend

__all__ = ["OPS", "OpContext", "register", "supported_ops"]


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


OpHandler = Callable[..., Any]
OPS: dict[str, OpHandler] = {}


def register(*op_types: str) -> Callable[[OpHandler], OpHandler]:
    def add(handler: OpHandler) -> OpHandler:
        for op_type in op_types:
            OPS[op_type] = handler
        return handler

    return add


def supported_ops() -> list[str]:
    return sorted(OPS)


# -- elementwise --------------------------------------------------------------------------------------------

_BINARY = {"Add": "add", "Sub": "subtract", "Mul": "multiply", "Pow": "power", "Equal": "equal",
           "Greater": "greater", "Less": "less", "GreaterOrEqual": "greater_equal", "LessOrEqual": "less_equal",
           "And": "logical_and", "Or": "logical_or", "Max": "maximum", "Min": "minimum"}
_UNARY = {"Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Abs": "abs", "Neg": "negative", "Tanh": "tanh",
          "IsNaN": "isnan", "Not": "logical_not", "Reciprocal": "reciprocal", "Floor": "floor", "Ceil": "ceil"}


def _binary(name: str) -> OpHandler:
    def handler(ctx: OpContext, a, b):
        result = getattr(ctx.xp, name)(a, b)
        return result.astype(a.dtype) if name == "power" else result  # Pow keeps the base's type
    return handler


def _unary(name: str) -> OpHandler:
    return lambda ctx, a: getattr(ctx.xp, name)(a)


for _op, _fn in _BINARY.items():
    register(_op)(_binary(_fn))
for _op, _fn in _UNARY.items():
    register(_op)(_unary(_fn))


@register("Div")
def _div(ctx: OpContext, a, b):
    if a.dtype.kind in "iu":  # integer division truncates toward zero in ONNX
        return (ctx.xp.trunc(a / b)).astype(a.dtype)
    return a / b


@register("Mod")
def _mod(ctx: OpContext, a, b):
    return ctx.xp.fmod(a, b) if ctx.attrs.get("fmod", 0) else ctx.xp.mod(a, b)


@register("Relu")
def _relu(ctx: OpContext, x):
    return ctx.xp.maximum(x, x.dtype.type(0))


@register("Identity")
def _identity(ctx: OpContext, x):
    return x


@register("Constant")
def _constant(ctx: OpContext):
    return ctx.xp.asarray(ctx.attrs["value"])


@register("MatMul")
def _matmul(ctx: OpContext, a, b):
    return ctx.xp.matmul(a, b)
