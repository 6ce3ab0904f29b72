"""Quantized activations: a ReLU after a weight site becomes the two-level s(z) = b 1{z < s1 or z > s2}
whose scalars alpha1^2, alpha2^2, alpha3 equal ReLU's at the ReLU input's scale tau (its RMS on calibration data),
the NTK-LC paper's construction (`activation_match`). It keeps kernel spectra of random-feature networks;
for trained ones the pipeline keeps it only where the held-out error stays within budget.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from symshrink.passes.analysis.graph import add_initializer
from symshrink.passes.ternary.activation_match import TwoLevel

__all__ = ["quantizable_relus", "TwoLevelActivationPass"]

_PRODUCTS = {"MatMul", "Gemm", "TernaryMatMul"}
_BIASES = {"Add", "Sum"}


def quantizable_relus(model: ir.Model) -> list[str]:
    """ReLU nodes whose input is a weight product, directly or through its bias node."""
    names = []
    for node in model.graph:
        if node.op_type != "Relu":
            continue
        producer = node.inputs[0].producer()
        if producer is not None and producer.op_type in _BIASES:
            producer = next((p for p in (v.producer() for v in producer.inputs) if p is not None), None)
        if producer is not None and producer.op_type in _PRODUCTS:
            names.append(node.name)
    return names


class TwoLevelActivationPass(InPlacePass):
    """Replace each named ReLU by Where(Or(z < s1, z > s2), b, 0)."""

    def __init__(self, fits: dict[str, TwoLevel]):
        super().__init__()
        self.fits = fits

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        for node in [n for n in graph if n.name in self.fits]:
            fit, z, name = self.fits[node.name], node.inputs[0], node.name
            constants = {key: add_initializer(graph, f"{name}.{key}", np.array(value, np.float32))
                         for key, value in (("low", fit.s1), ("high", fit.s2), ("level", fit.b), ("zero", 0.0))}
            below, above, outside, out = (ir.Value(name=f"{name}.{key}") for key in ("below", "above", "outside", "two_level"))
            new_nodes = [ir.node("Less", [z, constants["low"]], outputs=[below], name=f"{name}.below"),
                         ir.node("Greater", [z, constants["high"]], outputs=[above], name=f"{name}.above"),
                         ir.node("Or", [below, above], outputs=[outside], name=f"{name}.outside"),
                         ir.node("Where", [outside, constants["level"], constants["zero"]], outputs=[out], name=name)]
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [out])
        return PassResult(model, bool(self.fits))
