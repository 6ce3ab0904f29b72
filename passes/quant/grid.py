"""Integer grids: each weight W [K, N] of a MatMul/Gemm becomes codes of b bits (8, 4 or 2) behind DequantizeLinear,
each embedding table E [V, D] read by Gather (W = E^T) codes of b bits read by GatherBlockQuantized, and each
Conv weight (W [kh kw Cin, Cout] over the patches of its input) codes behind DequantizeLinear -> Conv, or, 1x1,
MatMulNBits over the channels.

Per output column and block of input rows, w ~ s (q - z) with q on 2^b levels over the block's range (or
symmetric: z = 2^(b-1), no zero points stored), rounded with error feedback on the input's second moment
(`feedback`, GPTQ-class) or to nearest (`formats.quantize_grid`; tables always: their input has no moments).
onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits and keeps both kinds of codes narrow. A layer's
error is ||x (W - W') - c|| / ||x W|| on the calibration moments of its input (the same measure as every weight
code: `output_error`; a table's: ||E - E'|| / ||E||). The writer here also writes the ternary method's codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass
from tqdm import tqdm

from symshrink.calibration.stats import UnitStats
from symshrink.passes.analysis.graph import constant_tensor
from symshrink.passes.analysis.products import Product, replace_product
from symshrink.passes.analysis.weights import WeightSite, weight_matrix
from symshrink.passes.protocol import Candidate, Offer, Site, known
from symshrink.passes.quant.feedback import FEEDBACK_COLUMNS, quantize_many_with_feedback, quantize_with_feedback
from symshrink.passes.quant.qdq import CONV_PRODUCTS, PRODUCTS, ensure_gather_domain, ensure_opset, tied_product
from symshrink.runtime.formats import (
    FORMATS,
    GRID_BITS,
    TIED_EXTRA_BYTES,
    QuantizedWeight,
    gather_block,
    matmul_nbits_accepts,
    quantize_grid,
    tied_accepts,
)

__all__ = ["Encoded", "ROUNDINGS", "output_error", "encode_grid", "write_codes", "GridLayer", "GridPlan", "CodesPass",
           "grid_offer", "trial_line", "site_format", "site_block", "packed_sites", "format_settings", "CONV_FP32", "GRID_BITS"]


@dataclass(frozen=True)
class Encoded:
    """A weight in a codec, the shift to add to its output, and its relative output error."""

    weight: QuantizedWeight
    shift: np.ndarray | None
    relative_error: float


def output_error(weight: np.ndarray, approx: np.ndarray, stats: UnitStats | None, shift: np.ndarray | None) -> float:
    """||x (W - W') - shift|| / ||x W|| in expectation over the calibration moments (without them: the
    relative Frobenius error of the weight). A mean-matching shift leaves only the centred part."""
    error = signal = 0.0
    mean, covariance = (stats.mean, stats.covariance) if stats is not None else (None, None)
    for start in range(0, weight.shape[1], FEEDBACK_COLUMNS):  # float64 copies of K x FEEDBACK_COLUMNS at most
        columns = slice(start, start + FEEDBACK_COLUMNS)
        part, diff = weight[:, columns], weight[:, columns].astype(np.float64) - approx[:, columns].astype(np.float64)
        if stats is None:
            error, signal = error + np.sum(diff**2), signal + np.sum(part.astype(np.float64) ** 2)
            continue
        residual_mean = mean @ diff - (0.0 if shift is None else shift[columns])
        error += np.einsum("kn,kn->", diff, covariance @ diff) + residual_mean @ residual_mean
        signal += np.einsum("kn,kn->", part, covariance @ part) + np.sum((mean @ part) ** 2)
    return float(np.sqrt(max(error, 0.0) / max(signal, 1e-60)))


ROUNDINGS = ("feedback", "nearest")  # second-moment rounding on the calibration statistics, or round to nearest


def encode_grid(weight: np.ndarray, stats: UnitStats | None, block: int | None, bits: int,
                rounding: str = "nearest", symmetric: bool = False, act_order: bool = False) -> Encoded:
    """The grid codes of `weight`, rounded with error feedback on the input's second moment where asked and
    known (in act-order if asked), else to nearest; with their relative output error on the calibration moments."""
    if rounding == "feedback" and stats is not None:
        quantized = quantize_with_feedback(weight, stats, block, bits, symmetric, act_order=act_order)
    else:
        quantized = quantize_grid(weight, block, bits, symmetric)
    return Encoded(quantized, None, output_error(weight, quantized.dequantize(), stats, None))


def _encode_site(weight: Callable[[], np.ndarray], stats: UnitStats | None, block: int | None, bits: int,
                 rounding: str, symmetric: bool, act_order: bool,
                 together: Callable[[], dict] | None = None) -> Encoded:
    """One grid's encoding of a site; with `together`, taken from the encodings of all the site's grids at once."""
    if together is None:
        return encode_grid(weight(), stats, block, bits, rounding, symmetric, act_order)
    quantized = together()[block, bits]
    return Encoded(quantized, None, output_error(weight(), quantized.dequantize(), stats, None))


class RemoteEncoding:
    """`encode_grid` of a site run by `submit` (a cluster's: submit(fn, *args) -> a future with .result()): started by
    `start()` (the weight read here and shipped with its statistics), its result fetched once when first asked for."""

    def __init__(self, submit: Callable, weight: Callable[[], np.ndarray], *settings: object):
        self.submit, self.weight, self.settings = submit, weight, settings
        self.future, self.result = None, None

    def start(self) -> None:
        if self.future is None and self.result is None:
            self.future = self.submit(encode_grid, self.weight(), *self.settings)
            self.weight = self.settings = None  # the shipped copies are the cluster's now

    def __call__(self) -> Encoded:
        if self.result is None:
            self.start()
            self.result, self.future = self.future.result(), None
        return self.result


def write_codes(model: ir.Model, writes: Sequence[tuple[WeightSite, Encoded, str, Callable[[str], Product]]],
                progress: bool) -> None:
    """Replace each site's product by its codes': (site, encoding, codec label, the product's maker, given the
    prefix of the initializers it adds), in order; the fp32 weights go."""
    nodes = {node.name: node for node in model.graph}
    for site, encoded, codec, make in tqdm(writes, desc="writing codes", unit="layer", disable=not progress, leave=False):
        product = make(f"{site.weight}.{codec}")
        replace_product(model.graph, nodes[site.node], site, product, encoded.shift, encoded.weight.scales.dtype, codec)
    RemoveUnusedNodesPass()(model)  # the fp32 weights are now unread


@dataclass
class GridLayer:
    node: str
    weight: str
    rows: int
    cols: int
    codec: str  # "uint8", "uint4", "uint2" or "fp32"
    relative_error: float | None = None  # fp32: None
    reason: str = ""
    op: str = "MatMul"  # the site's op: MatMul, Gemm or Gather (a table, read by GatherBlockQuantized)
    setting: str = ""  # the candidate's: "4-bit fed back act-order b64 sym"
    bytes: int = 0  # the weight's bytes in its stored form (codes and side data; fp32: as stored now)
    block: int | None = None  # rows per scale (None: one scale per column, or fp32)

    def bits_per_weight(self) -> float:
        return 8 * self.bytes / (self.rows * self.cols)

    def block_text(self) -> str:
        return "-" if self.codec == "fp32" else "channel" if self.block is None else str(self.block)


@dataclass
class GridPlan:
    block: int | None
    rounding: str  # a ROUNDINGS entry
    layer_error: float | None  # the per-layer budget on the relative output error
    symmetric: bool = False  # zero points 2^(bits-1), not stored
    act_order: bool = False  # fed-back rows rounded in order of decreasing E[x_i^2]
    layers: list[GridLayer] = field(default_factory=list)
    passed_over: dict[str, str] = field(default_factory=dict)  # MatMul/Gemm nodes that are not weight sites, and why
    # the allocator's verified trials: bytes of the weights, predicted sqrt(sum of squared layer errors), measured
    # held-out relative error, within the gates
    trials: list[dict] = field(default_factory=list)
    # per kind of site (product, conv, table): predicted and measured error of its sites coded alone, and the scale
    calibration: list[dict] = field(default_factory=list)
    one_pass: bool = False  # every grid of a site encoded in one pass (`quantize_many_with_feedback`): replays do too
    unmet: str = ""  # the allocator found no coded plan within the budget: why (a gate failure)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def site_rows(self) -> list[dict]:
        """One row a site, for the report's table: node, op, shape, codec, rows per scale, bits per weight with the
        scales, bytes, the predicted relative output error, why."""
        return [{"node": layer.node, "op": layer.op, "shape": f"{layer.rows}x{layer.cols}", "codec": layer.codec,
                 "block": layer.block_text(), "bpw": round(layer.bits_per_weight(), 3), "bytes": layer.bytes,
                 "predicted": layer.relative_error, "reason": layer.reason} for layer in self.layers]

    @staticmethod
    def recorded_settings(text: str) -> tuple[dict[str, str], bool] | None:
        """Each layer's setting in a plan written by --plan-out (alone, or under "quant" beside other methods'), by
        node ("fp32" for a layer left as it is), and whether it was encoded in one pass; None when the file holds no
        grid plan; ValueError when it is malformed."""
        data = json.loads(text)
        data = data.get("quant", data) if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or "rounding" not in data:
            return None
        layers = data["layers"]
        if not all(isinstance(layer, dict) and isinstance(layer.get("node"), str) and isinstance(layer.get("setting"), str)
                   for layer in layers):
            raise ValueError("each layer needs its node and setting (plans from before settings were recorded: "
                             "compress again)")
        return {layer["node"]: layer["setting"] for layer in layers}, bool(data.get("one_pass"))

    def __str__(self) -> str:
        block = "channel" if self.block is None else self.block
        budget = "none" if self.layer_error is None else f"{self.layer_error:g}"
        grid = "symmetric" if self.symmetric else "zero points"
        rounding = self.rounding + (" act-order" if self.act_order else "")
        lines = [f"plan: method=quant rounding={rounding} block={block} grid={grid} layer error budget={budget}",
                 f"  {'node':<40} {'op':<6} {'shape':>11} {'codec':<6} {'block':>7} {'bpw':>5} {'rel.err':>8}  reason"]
        for layer in self.layers:
            err = "-" if layer.relative_error is None else f"{layer.relative_error:.2e}"
            lines.append(f"  {layer.node[-40:]:<40} {layer.op:<6} {f'{layer.rows}x{layer.cols}':>11} {layer.codec:<6} "
                         f"{layer.block_text():>7} {layer.bits_per_weight():>5.2f} {err:>8}  {layer.reason}")
        lines.append("  bpw: bits per weight with the scales; rel.err: the layer's relative output error on the calibration "
                     "moments (a Gather table's: ||E - E'|| / ||E||)")
        lines += [f"  calibration, {c['kind']}s ({c['sites']} sites at {c['bits']} bits): predicted {c['predicted']:.4f}, "
                  f"measured {c['measured']:.4f}, scale {c['scale']:.2f}" for c in self.calibration]
        lines += [f"  allocation trial: {trial_line(t)}" for t in self.trials]
        return "\n".join(lines)


def trial_line(trial: dict) -> str:
    """One verified allocation trial (`GridPlan.trials`), as the plan and the progress print it."""
    return (f"{trial['bytes'] / 1e6:.3f} MB of weights, predicted {trial['predicted']:.4f}, measured "
            f"{trial['measured']:.4f}, {'within' if trial['within'] else 'outside'}")


def site_format(site: WeightSite, block: int | None, packed: bool) -> str:
    """The stored form of a site's grid codes: "gather" (tables and tied heads), "matmulnbits" (products in whole
    blocks, when `packed`; a 1x1 conv, stride 1, no pads, one group, its short last block padded), "conv"
    (DequantizeLinear -> Conv: the other convs) or "dequantize" (DequantizeLinear -> MatMul: per-column scales and a
    product's short last block, held unpadded in the file; onnxruntime pads it when it fuses them into MatMulNBits)."""
    if site.table or site.tied:
        return "gather"
    nbits = packed and matmul_nbits_accepts((site.rows, site.cols), block)
    if site.patch is not None:
        return "matmulnbits" if nbits and site.patch.pointwise and site.groups == 1 else "conv"
    return "matmulnbits" if nbits and site.rows % block == 0 else "dequantize"


def format_settings(site: WeightSite, form: str, block: int | None, symmetric: bool) -> dict:
    """The settings a format row takes for a site in stored form `form` (a Conv's kernel where it is laid out 4-D)."""
    settings = {"block": block, "symmetric": symmetric}
    return {**settings, "kernel": site.patch.kernel} if form == "conv" else settings


class CodesPass(InPlacePass):
    """Write each planned layer's codes (`encodings[node]`): as DequantizeLinear -> MatMul (upgrading the opset to
    25), or with `packed` as MatMulNBits where blocks allow, tables as GatherBlockQuantized. `plan.layers` name
    each layer's codec ("fp32": left alone). Subclasses write other products (`product`)."""

    def __init__(self, plan, sites: list[WeightSite], encodings: dict[str, Encoded], progress: bool = False,
                 packed: bool = False):
        super().__init__()
        self.plan = plan
        self.sites = {s.node: s for s in sites}
        self.encodings = encodings
        self.progress = progress
        self.packed = packed

    def _formats(self) -> set[str]:
        return {site_format(self.sites[layer.node], self.encodings[layer.node].weight.block, self.packed)
                for layer in self.plan.layers if layer.codec != "fp32"}

    def prepare(self, model: ir.Model) -> None:
        formats = self._formats()
        if formats & {"dequantize", "conv"}:
            ensure_opset(model)
        if formats - {"dequantize", "conv"}:
            ensure_gather_domain(model)

    def product(self, model: ir.Model, site: WeightSite, codec: str, encoded: Encoded) -> Callable[[str], Product]:
        form = site_format(site, encoded.weight.block, self.packed)
        if site.tied:
            return partial(tied_product, model.graph, encoded.weight, gather=self.nodes[site.tied])
        if site.patch is not None:
            extra = {"conv": self.nodes[site.node], "kernel": site.patch.kernel} if form == "conv" else {}
            return partial(CONV_PRODUCTS[form], model.graph, encoded.weight, **extra)
        return partial(PRODUCTS[form], model.graph, encoded.weight)

    def call(self, model: ir.Model) -> PassResult:
        planned = [layer for layer in self.plan.layers if layer.codec != "fp32"]
        if not planned:
            return PassResult(model, False)
        self.prepare(model)
        self.nodes = {node.name: node for node in model.graph}
        writes = [(self.sites[layer.node], self.encodings[layer.node], layer.codec,
                   self.product(model, self.sites[layer.node], layer.codec, self.encodings[layer.node]))
                  for layer in planned]
        write_codes(model, writes, self.progress)
        return PassResult(model, True)


CONV_FP32 = ("onnxruntime's CPU Conv over a DequantizeLinear'd weight loses its prepacked kernels and dequantizes on "
             "every run (MobileNetV2, docs/methods.md#convolutions: 1.7-2.0 ms a run with its depthwise convs so coded, "
             "1.1-1.2 ms without) for no memory saving: kept fp32 (--dequantize-convs codes it, for disk)")


def site_block(site: WeightSite, block: int | None) -> int | None:
    """The rows per scale a site takes for `block`: a product or table `block`; a grouped conv one scale per output
    column; another conv the largest power of two from `block` down to 16 that divides its input channels (so that
    blocks stay within a tap and none is padded: about the bytes of the padded block, less error), failing that
    `block` for a 1x1 conv (its short last block padded) and one scale per output column for a kxk one."""
    if site.patch is None or block is None:
        return block
    if site.groups != 1:
        return None
    taps = site.patch.kernel[0] * site.patch.kernel[1]
    size = block
    while size >= 16 and site.rows // taps % size:
        size //= 2
    return size if size >= 16 else block if taps == 1 else None


def packed_sites(sites: list[WeightSite], passed_over: dict[str, str], block: int | None) -> list[WeightSite]:
    """The sites whose codes onnxruntime keeps packed and runs fast: all but the convs that only DequantizeLinear ->
    Conv can hold (`CONV_FP32`), which go to `passed_over` with the reason."""
    kept = []
    for site in sites:
        if site.patch is not None and site_format(site, site_block(site, block), True) == "conv":
            passed_over[site.node] = f"conv {site.patch}, group {site.groups}: {CONV_FP32}"
        else:
            kept.append(site)
    return kept


def _itemsize(site: WeightSite, nodes: dict[str, ir.Node]) -> int:
    """Bytes a weight of the site takes now (a tied head's: its table's)."""
    value = nodes[site.tied].inputs[0] if site.tied else nodes[site.node].inputs[site.weight_input]
    tensor = constant_tensor(value)
    return tensor.dtype.itemsize if tensor is not None else 4


def grid_offer(sites: list[WeightSite], stats: dict[str, UnitStats], nodes: dict[str, ir.Node], block: int | None,
               passed_over: dict[str, str], bits: Sequence[int] = GRID_BITS, rounding: str = "feedback",
               progress: bool = False, symmetric: bool = False, act_order: bool = False,
               more_blocks: Sequence[int] = (), one_pass: bool | None = None,
               table_blocks: Sequence[int] = (), submit: Callable | None = None) -> Offer:
    """Per weight site, each grid its format can hold (widest first; encoded when first asked for, by `rounding`,
    with its calibrated output error), at `block` rows per scale and at each of `more_blocks` (for the allocator:
    wider blocks, fewer scales), then fp32; rows per scale by `site_block`. Bytes from the format table
    (GatherBlockQuantized for tables; `table_blocks`: more rows per scale for them alone); fp32's as the weight is
    stored now. `one_pass` (default: with `more_blocks`,
    fed back in act-order): every grid of a site encoded in one pass over its rows. With `submit` (a cluster's), each
    grid is encoded there (`RemoteEncoding`), started by the offer's `prefetch` of a choice."""
    one_pass = bool(more_blocks) if one_pass is None else one_pass
    offered, candidates, remote = [], {}, {}
    for site in sites:
        shape = (site.rows, site.cols)
        dense = site.elements * _itemsize(site, nodes)
        weight: Callable[[], np.ndarray] = cache(partial(weight_matrix, site, nodes))
        fed = rounding == "feedback" and site.statistic in stats
        options = []
        readable = not site.tied or tied_accepts(shape, block)
        if not readable:
            passed_over[site.tied] = (f"tied to {site.node}, whose MatMulNBits needs the table's {site.rows} columns "
                                      f"in whole blocks of {gather_block(site.rows, block)}: both stay fp32")
        blocks = (block, *more_blocks, *(table_blocks if site.table and not site.tied else ()))
        sizes = dict.fromkeys(site_block(site, b) for b in blocks
                              if not site.tied or tied_accepts(shape, b))  # in order, once each
        grids = {}  # (rows per scale, bits) -> its format row and settings, where the format holds the shape
        for b in bits:
            for size in sizes if readable else ():
                form = site_format(site, size, packed=True)
                settings = format_settings(site, form, size, symmetric)
                if FORMATS[f"uint{b}-{form}"].accepts(shape, **settings):
                    grids[size, b] = FORMATS[f"uint{b}-{form}"], settings
        together = None
        if fed and act_order and one_pass:  # the allocator weighs them all: every grid in one pass over the rows
            together = cache(lambda weight=weight, moments=stats[site.statistic], grids=list(grids):
                             quantize_many_with_feedback(weight(), moments.second_moment, grids, symmetric))
        for (size, b), (row, settings) in grids.items():
            if submit is not None and together is None:
                encoded = RemoteEncoding(submit, weight, stats.get(site.statistic), size, b, rounding, symmetric,
                                         act_order)
            else:
                encoded = cache(partial(_encode_site, weight, stats.get(site.statistic), size, b, rounding, symmetric,
                                        act_order, together))
            options.append(Candidate(site.node, f"uint{b}", f"{b}-bit {'fed back' if fed else 'nearest'}"
                                     f"{' act-order' if fed and act_order else ''} "
                                     f"b{size or 'channel'}{' sym' if symmetric else ''}",
                                     row.predict_bytes(shape, **settings) + (TIED_EXTRA_BYTES if site.tied else 0),
                                     lambda encoded=encoded: encoded().relative_error, encoded))
            if isinstance(encoded, RemoteEncoding):
                remote[options[-1]] = encoded
        options.append(Candidate(site.node, "fp32", "fp32", dense, known(0.0), known(None)))
        offered.append(Site(site.node, "table" if site.table else "weight", shape, dense))
        candidates[site.node] = options

    dense_bytes = {site.name: site.bytes for site in offered}

    def rewrite(chosen: Mapping[str, Candidate]) -> CodesPass:
        plan = GridPlan(block, rounding, None, symmetric, act_order, passed_over=passed_over, one_pass=one_pass)
        encodings = {}
        for site in tqdm(sites, desc="grid codes", unit="layer", disable=not progress, leave=False):
            pick = chosen.get(site.node)
            codec = "fp32" if pick is None else pick.method
            plan.layers.append(GridLayer(site.node, site.weight, site.rows, site.cols, codec,
                                         None if codec == "fp32" else pick.predicted_error(), op=site.op,
                                         setting="fp32" if pick is None else pick.setting,
                                         bytes=dense_bytes[site.node] if pick is None else pick.bytes_after,
                                         block=None if codec == "fp32" else pick.payload().weight.block))
            if codec != "fp32":
                encodings[site.node] = pick.payload()
        return CodesPass(plan, sites, encodings, progress, packed=True)

    def prefetch(chosen: Mapping[str, Candidate]) -> None:
        for pick in chosen.values():
            if pick in remote:
                remote[pick].start()

    return Offer("quant", offered, candidates, rewrite, prefetch if remote else None)
