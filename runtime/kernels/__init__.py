"""Kernels for symshrink-domain weights: each runs y = x @ W with W still compressed on the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from symshrink.runtime.backend import Backend

__all__ = ["KernelStep", "plan_kernels"]


@dataclass
class KernelStep:
    """One fused kernel call standing for `nodes` (the last one is where it runs): y = kernel(x, weight)."""

    kernel: str
    nodes: list[ir.Node]
    inputs: list[str]
    outputs: list[str]
    weight: Any = None
    nbytes: int = 0
    call: Callable = field(default=None, repr=False)

    def run(self, backend: Backend, x):
        return self.call(x, self.weight)


def plan_kernels(model: ir.Model, graph, constants: dict[str, np.ndarray], backend: Backend) -> dict[int, KernelStep]:
    """Kernel steps by id of the node where each runs (none yet)."""
    return {}
