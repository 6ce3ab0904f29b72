"""Hyperfunction pass: every large constant weight the graph reads becomes `ai.symshrink.HyperDecode(codes)`.

A weight is a float32 initializer whose every reader reads it as a weight (MatMul/Gemm B, Conv and
ConvTranspose W, Gather data, through a Transpose): tied weights, such as an embedding that is also the
LM head, are coded once. Per tensor the setting (n, K, side) is the fewest bits per weight whose relative
error ||W - W'|| / ||W|| is within the target (`hyper_codec.choose_setting`). Tensors under the size
threshold, biases and norms stay float, and the plan says why. Given the calibration moments of a MatMul weight's
input, its codes are rounded with error feedback row by row (`feedback.hyperize_with_feedback`) and its setting
chosen by the layer's relative output error on those moments (`grid.output_error`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, partial

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from tqdm import tqdm

from symshrink.calibration.stats import UnitStats
from symshrink.passes.hyper.function import check_opset, decode_node
from symshrink.passes.hyper.search import evaluate_settings
from symshrink.passes.protocol import Candidate, Offer, Site, known
from symshrink.passes.quant.feedback import hyper_feeds_back, hyperize_with_feedback
from symshrink.passes.quant.grid import output_error
from symshrink.runtime.formats import FORMATS, HyperCode, HyperSetting, decode_values, encode_hyper, relative_error

__all__ = ["MIN_ELEMENTS", "WEIGHT_INPUTS", "TensorPlan", "HyperPlan", "find_weight_tensors", "hyper_offer",
           "pick_setting", "plan_tensors", "HyperPass"]

MIN_ELEMENTS = 4096  # smaller tensors stay float (as in the ternary pass): little to gain, and all of it side information
# op -> the input slots that read a weight
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,),
                                             "Gather": (0,)}
# ops whose output is still the weight (rearranged): a weight is read through them
PASS_THROUGH = ("Transpose",)


def _weight_reader(node: ir.Node, index: int) -> str | None:
    """None when the node reads its input `index` as a weight, else why not."""
    if node.domain not in ("", "ai.onnx"):
        return f"read by {node.op_type} ({node.domain})"
    if index in WEIGHT_INPUTS.get(node.op_type, ()):
        return None
    if node.op_type in PASS_THROUGH and index == 0:
        return next((why for use in node.outputs[0].uses() if (why := _weight_reader(use.node, use.idx))), None)
    return f"read by {node.op_type} as input {index}"


@dataclass
class TensorPlan:
    name: str
    shape: list[int]
    readers: list[str]  # op types
    codec: str = "fp32"  # "hyper" or "fp32"
    setting: str = ""  # HyperSetting.label()
    bits_per_weight: float | None = None  # side information included
    relative_error: float | None = None
    reason: str = ""
    fed_back: bool = False  # rounded with error feedback on the input's second moment


@dataclass
class HyperPlan:
    codebook: str
    target: float | None  # relative error per tensor
    tensors: list[TensorPlan] = field(default_factory=list)
    table_bytes: int = 0  # the codebook tables, one per codebook size, shared by the tensors that use it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def coded(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.codec == "hyper"]

    def __str__(self) -> str:
        target = "none" if self.target is None else f"{self.target:g}"
        lines = [f"plan: method=hyper codebook={self.codebook} tensor error target={target}",
                 f"  {'tensor':<40} {'shape':>16} {'codec':<6} {'bits/w':>6} {'rel.err':>8}  setting / reason"]
        vectors = [t for t in self.tensors if t.codec == "fp32" and len(t.shape) <= 1]
        for t in (t for t in self.tensors if t not in vectors):
            bits = "-" if t.bits_per_weight is None else f"{t.bits_per_weight:.2f}"
            err = "-" if t.relative_error is None else f"{t.relative_error:.2e}"
            shape = "x".join(map(str, t.shape)) or "scalar"
            what = f"{t.setting}{', fed back' if t.fed_back else ''}" if t.setting else t.reason
            lines.append(f"  {t.name[-40:]:<40} {shape:>16} {t.codec:<6} {bits:>6} {err:>8}  {what}")
        coded = sum(int(np.prod(t.shape)) for t in self.coded())
        total = sum(int(np.prod(t.shape)) for t in self.tensors) or 1
        bits = sum(int(np.prod(t.shape)) * t.bits_per_weight for t in self.coded()) / max(coded, 1)
        lines.append(f"  {len(self.coded())} of {len(self.tensors)} float tensors coded ({coded / total:.1%} of the "
                     f"float weights), {bits:.2f} bits per coded weight, plus {self.table_bytes / 1e3:.1f} kB of "
                     "shared codebook tables")
        if vectors:
            lines.append(f"  {len(vectors)} vectors (biases, norms, scales) stay float: --plan-out lists them with the reason")
        lines.append("  rel.err: ||W - W'|| / ||W|| of the whole tensor; bits/w: indices, band scales, centres, spans")
        return "\n".join(lines)


def find_weight_tensors(model: ir.Model, min_elements: int = MIN_ELEMENTS) -> tuple[list[ir.Value], list[TensorPlan]]:
    """The float initializers to code, and a plan row (fp32, with the reason) for every other float one."""
    chosen, kept = [], []
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        shape = [int(d) for d in tensor.shape]
        readers = [use.node.op_type for use in value.uses()]
        row = TensorPlan(value.name, shape, readers)
        reasons = [why for use in value.uses() if (why := _weight_reader(use.node, use.idx))]
        if value.is_graph_input() or value.is_graph_output():
            row.reason = "a graph input or output"
        elif tensor.dtype != ir.DataType.FLOAT:
            row.reason = f"{tensor.dtype.name.lower()}, not float32"
        elif not readers:
            row.reason = "not read"
        elif reasons:
            row.reason = reasons[0] + (" (bias or norm)" if len(shape) <= 1 else "")
        elif int(np.prod(shape)) < min_elements:
            row.reason = f"{int(np.prod(shape))} elements, below {min_elements}"
        else:
            chosen.append(value)
            continue
        kept.append(row)
    return chosen, kept


def hyper_offer(model: ir.Model, settings: Sequence[HyperSetting], stop_within: float | None,
                min_elements: int = MIN_ELEMENTS, progress: bool = False,
                moments: Mapping[str, UnitStats] | None = None) -> tuple[Offer, list[TensorPlan]]:
    """Per weight tensor, each setting as a candidate: bytes from the format table, predicted error measured on a
    fixed sample of the tensor (`hyper_codec.evaluate_settings`; settings wider than the first within
    `stop_within` are not offered); with a single setting, the whole tensor's error, once encoded. Tensors in
    `moments` (name -> the calibration moments of the input that multiplies them, stored [K, N]) are encoded with
    error feedback on E[x x^T] where the setting allows (`feedback.hyper_feeds_back`), each setting's error then the
    relative output error on those moments (every setting encoded whole): the setting is chosen by what the codes do
    to the layer's output. The float tensors that are not sites come back as plan rows with the reason."""
    moments = moments or {}
    values, kept = find_weight_tensors(model, min_elements)
    sites, candidates, weights = [], {}, {}
    for value in tqdm(values, desc="hyperfunction codes", unit="tensor", disable=not progress, leave=False):
        weight = weights[value.name] = value.const_value.numpy()
        sites.append(Site(value.name, "tensor", tuple(weight.shape), weight.nbytes))
        if len(settings) == 1:
            results = [(settings[0], None, None)]
        else:
            results = evaluate_settings(weight, settings, stop_within=stop_within)
        options = []
        stats = moments.get(value.name)
        hessian = stats.second_moment if stats is not None else None  # one copy for every setting's encoding
        for setting, error, bits in results:
            row = FORMATS["hyper-grouped" if setting.group is not None else "hyper"]
            if stats is not None and hyper_feeds_back(weight.shape, setting):
                encoded = cache(partial(hyperize_with_feedback, weight, hessian, setting))
                measured = partial(_output_error, weight, stats, encoded)
            else:
                encoded = cache(partial(encode_hyper, weight, setting))  # one encoding for the error and the payload
                measured = partial(_whole_tensor_error, weight, encoded) if error is None else known(error)
            # the sample's bits (exact when the bands are used, as the table's bytes are) where they were measured
            nbytes = row.predict_bytes(weight.shape, **asdict(setting)) if bits is None else round(bits * weight.size / 8)
            options.append(Candidate(value.name, "hyper", setting.label(), nbytes, measured, encoded))
        candidates[value.name] = options

    def rewrite(chosen: Mapping[str, Candidate]) -> HyperPass:
        plan = HyperPlan(settings[0].codebook, stop_within)
        codes: dict[str, HyperCode] = {}
        for site in sites:
            if site.name not in chosen:
                continue
            code = codes[site.name] = chosen[site.name].payload()
            value = model.graph.initializers[site.name]
            fed = site.name in moments and hyper_feeds_back(site.shape, code.setting)
            plan.tensors.append(TensorPlan(site.name, list(site.shape), [use.node.op_type for use in value.uses()], "hyper",
                                           code.label(), code.bits_per_weight(),
                                           relative_error(weights[site.name], decode_values(code)), fed_back=fed))
        plan.tensors += kept
        tables = {code.setting.table_key(): code.table_bits() for code in codes.values()}
        plan.table_bytes = sum(tables.values()) // 8
        return HyperPass(plan, codes, progress)

    return Offer("hyper", sites, candidates, rewrite), kept


def _whole_tensor_error(weight: np.ndarray, encoded: Callable[[], HyperCode]) -> float:
    return relative_error(weight, decode_values(encoded()))


def _output_error(weight: np.ndarray, stats: UnitStats, encoded: Callable[[], HyperCode]) -> float:
    """The relative output error on the calibration moments of the codes fed back against them: the error by which a
    fed-back tensor's setting is chosen."""
    return output_error(weight, decode_values(encoded()), stats, None)


def pick_setting(options: list[Candidate], target: float | None) -> Candidate:
    """The fewest bytes within the relative error `target` (without one, or when none is within it: the smallest
    error), as `hyper_codec.choose_setting` picks among settings. Pure: swappable."""
    if len(options) == 1:
        return options[0]
    within = [c for c in options if target is not None and c.predicted_error() <= target]
    return min(within, key=lambda c: (c.bytes_after, c.predicted_error())) if within else \
        min(options, key=lambda c: (c.predicted_error(), c.bytes_after))


def plan_tensors(model: ir.Model, settings: Sequence[HyperSetting], target: float | None,
                 min_elements: int = MIN_ELEMENTS, progress: bool = False) -> tuple[HyperPlan, dict[str, HyperCode]]:
    """The per-tensor rule of the hyper method on its own: each tensor's setting with `pick_setting`, encoded."""
    offer, _ = hyper_offer(model, settings, target, min_elements, progress)
    rewrite = offer.rewrite({site: pick_setting(options, target) for site, options in offer.candidates.items()})
    return rewrite.plan, rewrite.codes


class HyperPass(InPlacePass):
    """Replace each coded initializer by a HyperDecode node over its codes; every reader reads the node."""

    def __init__(self, plan: HyperPlan, codes: dict[str, HyperCode], progress: bool = False):
        super().__init__()
        self.plan = plan
        self.codes = codes
        self.progress = progress

    def call(self, model: ir.Model) -> PassResult:
        coded = self.plan.coded()
        if not coded:
            return PassResult(model, False)
        check_opset(model)
        graph = model.graph
        first = next(iter(graph), None)
        tables: dict[tuple, ir.Value] = {}
        for row in tqdm(coded, desc="writing codes", unit="tensor", disable=not self.progress, leave=False):
            value = graph.initializers[row.name]
            node = decode_node(model, self.codes[row.name], row.name, tables)
            if first is None:
                graph.append(node)
            else:
                graph.insert_before(first, node)
            ir.convenience.replace_all_uses_with(value, node.outputs[0])
            graph.initializers.pop(row.name)
        return PassResult(model, True)

