"""Ternary pass: each planned weight W [K, N] of a MatMul/Gemm becomes 2-bit codes behind DequantizeLinear.

Per output unit j and block b of input rows, W_kj ~ a_j alpha_bj t_kj with t in {-1, 0, 1} and alpha
the optimal ternary fit (`formats.ternarize`); a_j and a shift c_j of the unit's bias (`moment_correction`)
keep its pre-activation mean and variance, or its least-squares fit, on calibration data. A layer's
error is ||x (W - W') - c|| / ||x W|| on the calibration moments; over budget the layer falls back to
8 bits, then stays fp32, and the plan says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache, partial

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from symshrink.calibration.stats import UnitStats
from symshrink.passes.analysis.products import Product
from symshrink.passes.analysis.weights import WeightSite, weight_matrix
from symshrink.passes.protocol import Candidate, Offer, Site, known
from symshrink.passes.quant.feedback import ternarize_with_feedback
from symshrink.passes.quant.grid import CodesPass, Encoded, encode_grid, output_error
from symshrink.passes.quant.qdq import ensure_opset
from symshrink.passes.ternary.correction import Correction, least_squares, match_moments
from symshrink.passes.ternary.function import add_function, function_product
from symshrink.runtime.formats import FORMATS, ternarize

__all__ = ["CORRECTIONS", "STORAGES", "STORAGE_FORMATS", "Encoded", "LayerPlan", "TernaryPlan", "TernaryPass", "encode_ternary",
           "encode_uint8", "output_error", "ternary_offer"]

CORRECTIONS: dict[str, Callable[..., Correction] | None] = {"none": None, "moments": match_moments, "lstsq": least_squares}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # the block sizes onnxruntime's MatMulNBits runs fast
# how codes are written: 2-bit DequantizeLinear (opset 25, fused by onnxruntime into MatMulNBits), or the
# TernaryMatMul function with 2-bit or base-3 bytes (opset 10; onnxruntime folds it to dense fp32)
STORAGES = {"dequantize": None, "function": 4, "function-base3": 3}


def encode_ternary(weight: np.ndarray, stats: UnitStats | None, block: int | None, correction: str,
                   rounding: str = "nearest") -> Encoded:
    """Optimal ternary codes (or, with rounding "feedback" and statistics, second-moment rounding onto ternary
    blocks), with the per-unit correction fitted on the calibration moments."""
    use_feedback = rounding == "feedback" and stats is not None
    ternary = ternarize_with_feedback(weight, stats.second_moment, block) if use_feedback else ternarize(weight, block)
    scales = ternary.scales.astype(np.float64)
    approx = ternary.dequantize().astype(np.float64)
    shift = None
    fit = CORRECTIONS[correction]
    if fit is not None and stats is not None:
        corrected = fit(weight, approx, stats.mean, stats.covariance)
        scales, approx, shift = scales * corrected.scale, approx * corrected.scale, corrected.bias
    quantized = ternary.quantized(scales.astype(weight.dtype))
    return Encoded(quantized, None if shift is None else shift.astype(weight.dtype), output_error(weight, approx, stats, shift))


def encode_uint8(weight: np.ndarray, stats: UnitStats | None, block: int | None) -> Encoded:
    """The 8-bit fallback: the grid of 8 bits."""
    return encode_grid(weight, stats, block, 8)


@dataclass
class LayerPlan:
    node: str
    weight: str
    rows: int
    cols: int
    codec: str  # "ternary", "uint8" or "fp32"
    relative_error: float | None = None  # of the chosen codec; fp32: None
    ternary_error: float | None = None
    reason: str = ""


@dataclass
class TernaryPlan:
    block: int | None
    correction: str
    storage: str  # a key of STORAGES
    layer_error: float | None  # the per-layer budget on the relative output error
    layers: list[LayerPlan] = field(default_factory=list)
    passed_over: dict[str, str] = field(default_factory=dict)  # MatMul/Gemm nodes that are not weight sites, and why
    activations: dict[str, str] = field(default_factory=dict)  # --activations two-level: what became of each ReLU

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def counts(self) -> dict[str, int]:
        counts = {"ternary": 0, "uint8": 0, "fp32": 0}
        for layer in self.layers:
            counts[layer.codec] += layer.rows * layer.cols
        return counts

    def __str__(self) -> str:
        block = "channel" if self.block is None else self.block
        budget = "none" if self.layer_error is None else f"{self.layer_error:g}"
        lines = [f"plan: method=ternary block={block} correction={self.correction} storage={self.storage} "
                 f"layer error budget={budget}",
                 f"  {'node':<40} {'shape':>11} {'codec':<8} {'rel.err':>8} {'ternary':>8}  reason"]
        for layer in self.layers:
            err = "-" if layer.relative_error is None else f"{layer.relative_error:.2e}"
            ternary = "-" if layer.ternary_error is None else f"{layer.ternary_error:.2e}"
            shape = f"{layer.rows}x{layer.cols}"
            lines.append(f"  {layer.node[-40:]:<40} {shape:>11} {layer.codec:<8} {err:>8} {ternary:>8}  {layer.reason}")
        total = sum(self.counts().values()) or 1
        lines.append("  weights: " + ", ".join(f"{name} {count / total:.1%}" for name, count in self.counts().items()))
        lines += [f"  activation {name}: {what}" for name, what in self.activations.items()]
        if self.passed_over:
            lines.append(f"  {len(self.passed_over)} MatMul/Gemm nodes are not weight sites (--plan-out says why)")
        lines.append("  rel.err: the layer's relative output error on the calibration moments")
        return "\n".join(lines)


STORAGE_FORMATS = {"dequantize": "ternary-dequantize", "function": "ternary-function",
                   "function-base3": "ternary-function-base3"}  # rows of runtime.formats.FORMATS


def ternary_offer(sites: list[WeightSite], stats: dict[str, UnitStats], nodes: dict[str, ir.Node], block: int | None,
                  correction: str, storage: str, passed_over: dict[str, str], progress: bool = False,
                  rounding: str = "nearest") -> Offer:
    """Per weight site, in this order: ternary codes (encoded now, with their calibrated output error), 8-bit
    codes (with the dequantize storage; encoded when first asked for, blocks of 32 under a per-column plan)
    and fp32. Bytes from the format table."""
    offered, candidates = [], {}
    ternary_format, uint8_format = FORMATS[STORAGE_FORMATS[storage]], FORMATS["uint8-dequantize"]
    for site in tqdm(sites, desc="ternary codes", unit="layer", disable=not progress, leave=False):
        weight, site_stats = weight_matrix(site, nodes), stats.get(site.statistic)
        shape, dense = (site.rows, site.cols), 4 * site.elements
        ternary = encode_ternary(weight, site_stats, block, correction, rounding)
        options = [Candidate(site.node, "ternary", f"ternary b{block or 'channel'}",
                             ternary_format.predict_bytes(shape, block=block), known(ternary.relative_error), known(ternary))]
        if STORAGES[storage] is None:  # 8 bits is DequantizeLinear: the function storage stays at opset 10
            uint8 = cache(partial(encode_uint8, weight, site_stats, block or 32))
            options.append(Candidate(site.node, "uint8", f"uint8 b{block or 32}",
                                     uint8_format.predict_bytes(shape, block=block or 32),
                                     lambda uint8=uint8: uint8().relative_error, uint8))
        options.append(Candidate(site.node, "fp32", "fp32", dense, known(0.0), known(None)))
        offered.append(Site(site.node, "weight", shape, dense))
        candidates[site.node] = options

    def rewrite(chosen: Mapping[str, Candidate]) -> TernaryPass:
        plan = TernaryPlan(block, correction, storage, None, passed_over=passed_over)
        encodings = {}
        for site in sites:
            ternary_error = candidates[site.node][0].predicted_error()
            pick = chosen.get(site.node)
            codec = "fp32" if pick is None else pick.method
            error = None if codec == "fp32" else pick.predicted_error()
            plan.layers.append(LayerPlan(site.node, site.weight, site.rows, site.cols, codec, error, ternary_error))
            if codec != "fp32":
                encodings[site.node] = pick.payload()
        return TernaryPass(plan, sites, encodings, progress)

    return Offer("ternary", offered, candidates, rewrite)


class TernaryPass(CodesPass):
    """Write each planned layer's encoding (`encodings[node]`): DequantizeLinear codes (opset 25), or with the
    function storage the TernaryMatMul function over packed digits for the ternary layers."""

    def prepare(self, model: ir.Model) -> None:
        radix = STORAGES[self.plan.storage]
        if radix is None:
            ensure_opset(model)
        else:
            add_function(model, radix)

    def product(self, model: ir.Model, site: WeightSite, codec: str, encoded: Encoded) -> Callable[[str], Product]:
        radix = STORAGES[self.plan.storage]
        if radix is None or codec != "ternary":
            return super().product(model, site, codec, encoded)
        return partial(function_product, model.graph, encoded.weight, radix)
