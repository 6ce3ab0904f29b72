"""The compress pipeline: load -> analyse -> calibrate -> plan -> rewrite -> verify -> save.

Each step calls the module that owns it; data flows one way. Calibration streams the activations of
every planned group through onnxruntime batch by batch and keeps only their moments. Nothing is
written unless the verify gate passes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from tqdm import tqdm

from symshrink.allocate import plan_bytes, scaled_error, squared_error
from symshrink.calibration.feeds import load_feeds, random_feeds, split_holdout
from symshrink.calibration.stats import UnitStats, sample_patches, subsample_rows
from symshrink.cluster import connect
from symshrink.errors import BadInput, NothingToCompress, OutsideTolerance
from symshrink.modelio import (
    TWO_GB,
    claim_outputs,
    input_files,
    load_model,
    model_bytes_on_disk,
    resolve_model,
    save_model,
    write_atomically,
)
from symshrink.options import CompressOptions, HyperOptions
from symshrink.passes.analysis.blocks import partition
from symshrink.passes.analysis.groups import Group, analyse
from symshrink.passes.analysis.weights import MIN_ELEMENTS, WeightSite, find_weight_sites
from symshrink.passes.hyper.codes import HyperPlan, hyper_offer
from symshrink.passes.hyper.search import HyperSetting, setting_grid
from symshrink.passes.moment import budget
from symshrink.passes.moment.plan import Plan, rewritable
from symshrink.passes.moment.reduce import (
    ConsumerLayout,
    MomentReductionPass,
    bytes_saved,
    consumer_layout,
    moment_offer,
    unit_problem,
)
from symshrink.passes.protocol import Candidate, Offer, known
from symshrink.passes.quant.grid import GridPlan, grid_offer, packed_sites, site_block, site_format, trial_line
from symshrink.passes.quant.qdq import ensure_gather_domain, ensure_opset
from symshrink.passes.ternary.activation_match import relu_scalars, solve_two_level
from symshrink.passes.ternary.activations import TwoLevelActivationPass, quantizable_relus
from symshrink.passes.ternary.codes import TernaryPlan, ternary_offer
from symshrink.report import CompressReport, check_report_path, write_report
from symshrink.rules import Choice, allocation_rule, hyper_rule, moment_rule, quant_rule, size_rule, ternary_rule
from symshrink.runtime.diff import OutputDiff, compare_outputs, gate_failures
from symshrink.runtime.ort import graph_input_specs, input_specs, make_session, run_all, session_for_model, stream_probes
from symshrink.stream import CodeSpill, graph_outputs, stream_blocks, stream_outputs

__all__ = ["CompressOptions", "CompressReport", "compress", "compress_model", "compress_file_streamed", "streams",
           "check_options", "default_calib",
           "calibration_feeds", "verify", "TaskBudget", "task_budget"]

logger = logging.getLogger(__name__)


@dataclass
class TaskBudget:
    """--max-loss L on a task metric: a session passes when the metric's relative loss against the original model's
    is at most L (the metric measured on the task's own data, a zoo task's evaluation split or the user's callable)."""

    name: str
    evaluate: Callable[[ort.InferenceSession], float]
    higher_is_better: bool
    reference: float
    max_loss: float

    def loss(self, value: float) -> float:
        change = (self.reference - value) if self.higher_is_better else (value - self.reference)
        return change / max(abs(self.reference), 1e-12)

    def measure(self, session: ort.InferenceSession) -> dict:
        value = float(self.evaluate(session))
        return {"task": self.name, "reference": self.reference, "value": value, "loss": self.loss(value),
                "max_loss": self.max_loss}


def task_budget(options: CompressOptions, model_spec: object, reference: ort.InferenceSession) -> TaskBudget | None:
    """The run's task budget (None without --max-loss): the task named, the callable given, or a zoo model's own."""
    if options.max_loss is None:
        return None
    task = options.task
    if task is None and isinstance(model_spec, str):
        from symshrink.models.registry import ZOO  # noqa: PLC0415

        task = ZOO[model_spec].task if model_spec in ZOO else None
    if task is None:
        raise BadInput("--max-loss needs a task metric: --task NAME (a zoo task), or task=callable in the API")
    if isinstance(task, str):
        from symshrink.models.registry import get_task  # noqa: PLC0415

        found = get_task(task)
        name, evaluate, higher = found.name, found.evaluate, found.higher_is_better
    else:
        name, evaluate, higher = getattr(task, "__name__", "task"), task, True
    try:
        value = float(evaluate(reference))
    except Exception as err:  # noqa: BLE001 (a task that does not fit the model is the user's input)
        raise BadInput(f"the task {name} does not run on this model: {str(err).strip().splitlines()[0][:160]}") from None
    return TaskBudget(name, evaluate, higher, value, options.max_loss)


def default_calib(model_spec: str) -> str | None:
    from symshrink.models.registry import ZOO  # noqa: PLC0415

    entry = ZOO.get(str(model_spec))
    return entry.calib if entry else None


def calibration_feeds(options: CompressOptions, model_spec: object, inputs) -> list:
    """The feeds `options.calib` names (a zoo model's own data set when it names none), or random feeds when asked
    for: an explicit request for random inputs wins over the zoo model's default (GPU machines lack the data)."""
    given = options.calib is not None and not (isinstance(options.calib, str) and not options.calib)
    spec = options.calib if given else None if options.random_calib else default_calib(model_spec)
    if spec is None:
        if not options.random_calib:
            raise BadInput("give calibration data (a zoo data set, .npz or folder of .npy, feed dicts or a "
                           "CalibrationDataReader), or ask for random inputs (--random-calib)")
        return random_feeds(inputs, options.calib_samples or 32, options.seed)
    return load_feeds(spec, inputs, "calib", options.calib_samples, options.calib_layout)


def _calibrate(model: ir.Model, groups: list[Group], layouts: dict[str, ConsumerLayout], feeds: list,
               options: CompressOptions) -> dict[str, UnitStats]:
    """Moments of each group's consumer input, streamed batch by batch (no batch is kept)."""
    stats = {g.name: UnitStats(g.width, layouts[g.name].taps) for g in groups}
    rng = np.random.default_rng(options.seed)
    probes = {g.probe for g in groups}
    batches = tqdm(stream_probes(model, sorted(probes), feeds, options.threads), total=len(feeds), desc="calibrating",
                   unit="batch", disable=not options.progress, leave=False)
    for arrays in batches:
        for g in groups:
            rows = layouts[g.name].rows(arrays[g.probe], g.width)
            stats[g.name].add(subsample_rows(rows, options.rows_per_batch, rng))
    return stats


def _moment_stage(model: ir.Model, options: CompressOptions, model_bytes: int, fit_feeds: list, holdout: list,
                  expected: list) -> tuple[Plan, list[Group]]:
    """Analyse, calibrate, offer widths, choose by the moment rule (or replay a plan) and rewrite the symmetric
    groups in place; the plan it wrote and the candidate groups analysis rejected."""
    groups = analyse(model)
    candidates = rewritable(groups, "moment", options.moment.selector)
    if options.moment.plan:
        plan = Plan.load(options.moment.plan)
        plan.check_against(groups)
        candidates = [g for g in candidates if g.name in {p.group for p in plan.groups}]
    nodes = {node.name: node for node in model.graph}
    layouts = {g.name: consumer_layout(g, nodes) for g in candidates}
    for g in candidates:
        if isinstance(layouts[g.name], str):
            logger.warning("%s is left as it is: %s", g.name, layouts[g.name])
    candidates = [g for g in candidates if not isinstance(layouts[g.name], str)]
    stats = _calibrate(model, candidates, layouts, fit_feeds, options)
    problems = {g.name: unit_problem(g, nodes, stats[g.name], options.moment.ridge, options.seed) for g in candidates}
    if options.moment.plan:  # the recorded widths and units, exactly
        MomentReductionPass(plan, groups, problems, options.progress)(model)
        return plan, [g for g in groups if not g.ok]
    offer = moment_offer(candidates, groups, problems, options.moment.selector, options.moment.ridge, options.progress)

    def error_of(chosen: Choice) -> float:
        error = _trial_error(model, offer.rewrite(chosen), holdout, expected, options.threads)
        if options.progress:
            tqdm.write(f"budget search: {sum(c.payload() for c in chosen.values())} units kept, "
                       f"held-out rel. error {error:.4f}")
        return error

    def saved_after(chosen: Choice) -> float:
        return bytes_saved(candidates, {site: c.payload() for site, c in chosen.items()}, nodes)

    chosen = moment_rule(offer, options.moment, options.max_error, model_bytes, saved_after, error_of, options.progress)
    rewrite = offer.rewrite(chosen)
    rewrite(model)
    return rewrite.plan, [g for g in groups if not g.ok]


def _weight_sites(model: ir.Model, options: CompressOptions, fit_feeds: list, tables: bool = False, convs: bool = False,
                  select: Callable[[list[WeightSite], dict[str, str]], list[WeightSite]] | None = None,
                  min_elements: int = MIN_ELEMENTS):
    """The MatMul/Gemm weight sites (with `tables`, the Gather tables too; with `convs`, the Conv weights; those
    `select` keeps, the others passed over by it) and the nodes passed over, with why, their inputs' calibration
    moments and the graph's nodes by name: what the weight codes offer on."""
    sites, passed = find_weight_sites(model, options.weights.exclude, min_elements, tables=tables, convs=convs)
    if select is not None:
        sites = select(sites, passed)
    products = [site for site in sites if site.moments]
    return sites, passed, _input_moments(model, products, fit_feeds, options), {node.name: node for node in model.graph}


def _write_choice(model: ir.Model, offer, chosen: Choice, reasons: dict[str, str], layer_error: float | None):
    """Write a weight-code choice in place; its plan, with the budget and each layer's reason."""
    rewrite = offer.rewrite(chosen)
    rewrite.plan.layer_error = layer_error
    for layer in rewrite.plan.layers:
        layer.reason = reasons.get(layer.node, "")
    rewrite(model)
    return rewrite.plan


def _ternary_stage(model: ir.Model, options: CompressOptions, fit_feeds: list, holdout: list,
                   expected: list) -> TernaryPlan:
    """Offer codes for every weight site, choose by the ternary rule (the per-layer budget --layer-error, or the
    held-out budget --max-error alone) and write them in place. The plan it wrote."""
    sites, passed, stats, nodes = _weight_sites(model, options, fit_feeds)
    ternary, layer_error = options.ternary, options.weights.layer_error
    offer = ternary_offer(sites, stats, nodes, options.weights.block, ternary.correction, ternary.storage, passed,
                          options.progress, options.weights.rounding_for("ternary"))
    searching = options.max_error is not None and layer_error is None
    if searching and ternary.storage == "dequantize":
        ensure_opset(model)  # every layer gets ternary or 8-bit codes: upgrade once, not in every trial copy

    def error_of(chosen: Choice) -> float:
        error = _trial_error(model, offer.rewrite(chosen), holdout, expected, options.threads)
        if options.progress:
            count = sum(c.method == "ternary" for c in chosen.values())
            tqdm.write(f"budget search: {count} of {len(chosen)} layers ternary, held-out rel. error {error:.4f}")
        return error

    chosen, reasons = ternary_rule(offer, layer_error, options.max_error, error_of)
    return _write_choice(model, offer, chosen, reasons, None if searching else layer_error)


# rows per scale the allocator may take besides --block-size; 256 for tables only: onnxruntime's MatMulNBits runs
# blocks of 256 3-6x slower than blocks of 64 (MobileNetV2: 6.3 ms a run against 1.3; fmnist-mlp 1.4 ms against 0.5)
ALLOCATION_BLOCKS = (32, 64, 128)
TABLE_BLOCKS = (256,)
CALIBRATION_BITS = (4, 2)  # one calibration trial per kind of site and width: the scale differs with the width
ALLOCATION_MIN_ELEMENTS = 1024  # the allocator weighs the scales and may code small products and tables too


def _quant_stage(model: ir.Model, options: CompressOptions, fit_feeds: list, holdout: list, expected: list,
                 model_bytes: int, task: TaskBudget | None = None) -> GridPlan:
    """Offer integer grids for every weight site, 1x1 conv and Gather table (rounded with error feedback on the
    calibration statistics, or to nearest; symmetric unless --zero-points), choose by the quant rule (--bits, or the
    fewest bits within --layer-error), under a budget by the allocator (`_allocate_grids`), or replay a --plan, and
    write them in place. The plan it wrote."""
    recorded = _recorded_grids(options.moment.plan) if options.moment.plan else None
    if options.moment.plan and recorded is None and "moment" not in options.method:
        raise BadInput(f"--plan {options.moment.plan} records no integer-grid plan (one is written by --method quant "
                       "--plan-out)")
    block, allocating = options.weights.block, options.allocating() or recorded is not None
    packed = _packed_select(options)
    select = partial(_large_convs, then=packed) if allocating else packed
    sites, passed, stats, nodes = _weight_sites(model, options, fit_feeds, tables=True, convs=True, select=select,
                                                min_elements=ALLOCATION_MIN_ELEMENTS if allocating else MIN_ELEMENTS)
    more = tuple(b for b in ALLOCATION_BLOCKS if b != block) if allocating and block is not None else ()
    tables = tuple(b for b in TABLE_BLOCKS if b != block) if more else ()
    offer = grid_offer(sites, stats, nodes, block, passed, rounding=options.weights.rounding_for("quant"),
                       progress=options.progress, symmetric=not options.quant.zero_points,
                       act_order=options.quant.act_order, more_blocks=more,
                       one_pass=None if recorded is None else recorded[1], table_blocks=tables)
    if recorded is not None:
        return _write_choice(model, offer, *_replay(offer, recorded[0]), None)
    if allocating:
        return _allocate_grids(model, offer, sites, options, holdout, expected, model_bytes, task)
    chosen, reasons = quant_rule(offer, options.quant.grid_bits(), options.weights.layer_error)
    return _write_choice(model, offer, chosen, reasons, options.weights.layer_error)


def _packed_select(options: CompressOptions):
    """The integer grids' site filter: the sites a packed format holds (all of them with --dequantize-convs)."""
    return None if options.quant.dequantize_convs else partial(packed_sites, block=options.weights.block)


def _large_convs(sites: list[WeightSite], passed: dict[str, str], then=None) -> list[WeightSite]:
    """The allocator's sites: small products and tables are worth their scales, small convs are not worth their two
    Transposes (MobileNetV2's first 1x1 convs, on the largest maps: 2.7 ms a run coded, 0.7 ms without)."""
    kept = []
    for site in sites:
        if site.patch is not None and site.elements < MIN_ELEMENTS:
            passed[site.node] = f"{site.rows}x{site.cols} conv weight is below {MIN_ELEMENTS} elements"
        else:
            kept.append(site)
    return kept if then is None else then(kept, passed)


def _recorded_grids(path: str | Path) -> tuple[dict[str, str], bool] | None:
    """The grid settings a --plan file records, by node, and its encoder (None: it records none)."""
    try:
        return GridPlan.recorded_settings(Path(path).read_text())
    except OSError as err:
        raise BadInput(f"cannot read plan {path}: {err.strerror}") from None
    except ValueError as err:
        raise BadInput(f"not a symshrink plan: {err}") from None


def _replay(offer, recorded: dict[str, str]) -> tuple[Choice, dict[str, str]]:
    """The recorded setting of every site, exactly; BadInput when the model's sites or offers differ from the plan's."""
    unknown = sorted(set(recorded) - set(offer.candidates))
    if unknown:
        raise BadInput(f"the plan's layer {unknown[0]} is not a weight site of this model")
    chosen = {}
    for site, offered in offer.candidates.items():
        setting = recorded.get(site, "fp32")
        chosen[site] = next((c for c in offered if c.setting == setting), None)
        if chosen[site] is None:
            raise BadInput(f"the plan's setting {setting!r} of {site} is not offered here: give the plan's "
                           "--zero-points, --rounding, --act-order and --block-size, on the model it was made for")
    return chosen, dict.fromkeys(chosen, "replayed from the plan")


def _site_kind(site: WeightSite) -> str:
    """The kinds of site whose predicted errors are calibrated apart: a table's is the weight's own error, a conv's
    is on sampled patches, a product's (a tied head's too) on its input rows."""
    return "table" if site.table and not site.tied else "conv" if site.patch is not None else "product"


def _allocate_grids(model: ir.Model, offer, sites: list[WeightSite], options: CompressOptions, holdout: list,
                    expected: list, model_bytes: int, task: TaskBudget | None) -> GridPlan:
    """The allocator's plan over every site's grids and fp32. First the predictions are calibrated: per kind of site
    and width (CALIBRATION_BITS), one trial codes those sites alone and the measured held-out error over the predicted
    sqrt(sum e^2) scales their distortions. Then the smallest plan within the held-out gates (bisection over the multiplier, each
    plan a verified trial), or the least distorted plan within --target-size (the gates then verify it)."""
    trials, calibration, scales = [], [], {}

    def measure(chosen: Choice, distortion=squared_error) -> dict:
        session = _trial_session(model, offer.rewrite(chosen), options.threads)
        diffs = compare_outputs(expected, run_all(session, holdout))
        trial = {"bytes": plan_bytes(chosen), "predicted": float(np.sqrt(sum(distortion(c) for c in chosen.values()))),
                 "measured": max(d.rel_l2 for d in diffs),
                 "within": not gate_failures(diffs, options.max_error, options.cosine_gate())}
        if task is not None:
            trial["task_loss"] = task.measure(session)["loss"]
            trial["within"] = trial["within"] and trial["task_loss"] <= task.max_loss
        if options.progress:
            tqdm.write(f"allocation: {trial_line(trial)}")
        return trial

    kinds = {site.node: _site_kind(site) for site in sites}
    for kind, bits in itertools.product(sorted(set(kinds.values())), CALIBRATION_BITS):
        probe = {node: c for node, k in kinds.items() if k == kind
                 for c in [_calibration_candidate(offer.candidates[node], bits)] if c is not None}
        if not probe:
            continue
        trial = measure(probe)
        scale = trial["measured"] / trial["predicted"] if trial["predicted"] > 0 and trial["measured"] > 0 else 1.0
        scales[kind, bits] = scale
        calibration.append({"kind": kind, "bits": bits, "sites": len(probe), "predicted": trial["predicted"],
                            "measured": trial["measured"], "scale": scale})

    def scale_of(candidate: Candidate) -> float:  # 8 bits take the 4-bit scale (their error is at the noise floor)
        bits = min(int(candidate.method.removeprefix("uint")), 4) if candidate.method != "fp32" else 4
        kind = kinds[candidate.site]
        return scales.get((kind, bits), scales.get((kind, 4), 1.0))

    distortion = scaled_error(scale_of)
    target = options.moment.target_size
    if target is not None:
        limit = budget.target_bytes(target, model_bytes)
        goal = limit - (model_bytes - sum(site.bytes for site in offer.sites))  # the weights' share of it
        for _ in range(5):  # the graph's own bytes grow with the coded sites (nodes, names): take them off and redo
            chosen, reasons = size_rule(offer, goal, distortion, f"target size {target:g}")
            trial = ir.from_proto(ir.to_proto(model))
            offer.rewrite(chosen)(trial)
            size = ir.to_proto(trial).ByteSize()  # the model this plan writes, as compress_model will verify it
            over = size - limit
            if over <= 0:
                break
            goal = plan_bytes(chosen) - over  # below this plan's weights by what the file is over
    else:
        def within(chosen: Choice) -> bool:
            trials.append(measure(chosen, distortion))
            return trials[-1]["within"]

        chosen, reasons = allocation_rule(offer, within, _budget_text(options), distortion)
    plan = _write_choice(model, offer, chosen, reasons, None)
    plan.trials, plan.calibration = trials, calibration
    if target is not None and over > 0:  # the plan's weights fit; the graph's own bytes (names, nodes) did not
        plan.unmet = f"the model takes {size} bytes, over the target size {limit}"
    elif target is None and all(c.method == "fp32" for c in chosen.values()):
        plan.unmet = f"no coded plan within the {_budget_text(options)}: every weight would stay fp32"
    return plan


def _calibration_candidate(offered: list[Candidate], bits: int) -> Candidate | None:
    """The candidate a site's calibration trial at `bits` takes: that grid at the asked block (None: not offered)."""
    return next((c for c in offered if c.method == f"uint{bits}"), None)


def _activation_stage(model: ir.Model, options: CompressOptions, fit_feeds: list, holdout: list,
                      expected: list) -> dict[str, str]:
    """--activations two-level: try the two-level activation on each ReLU after a weight site, one at a time in
    graph order, and keep it where the held-out error stays within --max-error. What happened to each ReLU."""
    relus = quantizable_relus(model)
    nodes = {node.name: node for node in model.graph}
    inputs = {name: nodes[name].inputs[0].name for name in relus}
    squares, counts = dict.fromkeys(relus, 0.0), dict.fromkeys(relus, 0)
    for arrays in stream_probes(model, sorted(set(inputs.values())), fit_feeds, options.threads):
        for name in relus:
            values = arrays[inputs[name]].astype(np.float64)
            squares[name] += float(np.sum(values**2))
            counts[name] += values.size
    outcome, kept = {}, {}
    for name in tqdm(relus, desc="two-level activations", unit="ReLU", disable=not options.progress, leave=False):
        tau = float(np.sqrt(squares[name] / counts[name]))
        fit = solve_two_level(relu_scalars(tau), tau, starts=24, seed=options.seed)
        error = _trial_error(model, TwoLevelActivationPass(kept | {name: fit}), holdout, expected, options.threads)
        described = f"tau {tau:.3g}: level {fit.b:.3g} outside [{fit.s1:.3g}, {fit.s2:.3g}]"
        if error <= options.max_error:
            kept[name] = fit
            outcome[name] = f"two-level ({described}), held-out error {error:.4f}"
        else:
            outcome[name] = f"ReLU kept: two-level ({described}) gives held-out error {error:.4f} > {options.max_error:g}"
    TwoLevelActivationPass(kept)(model)
    return outcome


def hyper_candidates(options: HyperOptions) -> list[HyperSetting]:
    """The settings the per-tensor choice picks from."""
    try:
        base = HyperSetting(options.codebook, 2, 0, options.side, options.side is not None, options.group_size,
                            options.code_dims)
        grid = setting_grid(base, bits=options.index_bits, bands=options.bands, codes=options.codes)
    except ValueError as err:
        raise BadInput(f"hyperfunction codes: {err}") from None
    if not grid:
        raise BadInput("hyperfunction codes: these index widths, bands and codes leave no codebook to choose from")
    return grid


def _hyper_stage(model: ir.Model, options: CompressOptions, candidates: list[HyperSetting], fit_feeds: list) -> HyperPlan:
    """Code every large weight tensor in place (the weights alone; with --rounding feedback, a MatMul weight's codes
    fed back on its input's second moment); the plan it wrote. Weights held in Constant nodes (PP-OCR's
    classifier) become initializers first."""
    LiftConstantsToInitializersPass(size_limit=MIN_ELEMENTS)(model)
    moments = {}
    if options.weights.rounding_for("hyper") == "feedback":  # MatMul weights only: stored [K, N], pairs along N
        sites, _, stats, _ = _weight_sites(model, options, fit_feeds,
                                           select=lambda sites, _: [site for site in sites if site.op == "MatMul"])
        moments = {site.weight: stats[site.statistic] for site in sites}
    offer, _ = hyper_offer(model, candidates, options.hyper.tensor_error, progress=options.progress, moments=moments)
    rewrite = offer.rewrite(hyper_rule(offer, options.hyper))
    rewrite(model)
    return rewrite.plan


def _trial_session(model: ir.Model, rewrite: Callable[[ir.Model], object], threads: int | None):
    """An onnxruntime session of a copy of the model after `rewrite` (an in-place pass): the budget searches try
    rewrites without touching the model itself."""
    trial = ir.from_proto(ir.to_proto(model))
    rewrite(trial)
    return session_for_model(trial, threads)


def _trial_diffs(model: ir.Model, rewrite: Callable[[ir.Model], object], holdout: list, expected: list,
                 threads: int | None) -> list[OutputDiff]:
    """The outputs' diffs on the held-out feeds after a trial `rewrite`."""
    return compare_outputs(expected, run_all(_trial_session(model, rewrite, threads), holdout))


def _trial_error(model: ir.Model, rewrite: Callable[[ir.Model], object], holdout: list, expected: list,
                 threads: int | None) -> float:
    """The largest relative L2 error over the outputs on the held-out feeds after a trial `rewrite`."""
    return max(d.rel_l2 for d in _trial_diffs(model, rewrite, holdout, expected, threads))


def _budget_text(options: CompressOptions) -> str:
    gates = [f"rel. error {options.max_error}" if options.max_error is not None else "",
             f"cosine {options.cosine_gate()}" if options.cosine_gate() is not None else "",
             f"task loss {options.max_loss:g}" if options.max_loss is not None else ""]
    return "held-out " + " and ".join(g for g in gates if g)


def _input_rows(site: WeightSite, values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most `limit` of the rows [m, K] a site's weight multiplies in one batch: its activation's rows, or the
    patches of a Conv's input maps."""
    if site.patch is None:
        return subsample_rows(values.reshape(-1, site.rows), limit, rng)
    patch = site.patch
    return sample_patches(values, patch.kernel, patch.strides, patch.pads, patch.dilations, limit, rng)


def _input_moments(model: ir.Model, sites: list[WeightSite], feeds: list, options: CompressOptions) -> dict[str, UnitStats]:
    """Mean and covariance of each site's input rows [.., K] (a Conv's: sampled patches), streamed batch by batch,
    by `WeightSite.statistic`."""
    probes = {site.statistic: site for site in sites}
    stats = {key: UnitStats(site.rows) for key, site in probes.items()}
    rng = np.random.default_rng(options.seed)
    batches = tqdm(stream_probes(model, sorted({site.activation for site in sites}), feeds, options.threads),
                   total=len(feeds), desc="calibrating weights", unit="batch", disable=not options.progress, leave=False)
    for arrays in batches:
        for key, site in probes.items():
            stats[key].add(_input_rows(site, arrays[site.activation], options.rows_per_batch, rng))
    return stats


def float_parameters(model: ir.Model) -> int:
    """The float weights a model stores (its float initializers' elements, external data left unread)."""
    return sum(math.prod(int(d) for d in value.const_value.shape) for value in model.graph.initializers.values()
               if value.const_value is not None and value.const_value.dtype.is_floating_point())


def _sites(report: CompressReport) -> int:
    """How many sites the methods found (groups planned, weight layers, float weight tensors), whatever they
    chose for them: zero means the model offers nothing to these methods."""
    return (len(report.plan.groups) if report.plan is not None else 0) \
        + (len(report.ternary.layers) if report.ternary is not None else 0) \
        + (len(report.quant.layers) if report.quant is not None else 0) \
        + (len(report.hyper.coded()) if report.hyper is not None else 0)  # every hyper site is coded


def _no_site_reasons(report: CompressReport) -> list[str]:
    reasons = [f"{g.name}: {g.reason}" for g in report.skipped]
    if report.plan is not None and not reasons:
        reasons.append("no permutation-symmetric group (`symshrink inspect --all` says why)")
    for plan in (report.ternary, report.quant):
        if plan is not None:
            reasons += [f"{node}: {why}" for node, why in plan.passed_over.items()] or ["no MatMul/Gemm node"]
    if report.hyper is not None:
        reasons += [f"{t.name}: {t.reason}" for t in report.hyper.tensors if len(t.shape) > 1] \
            or ["no float weight matrix"]
    return reasons


def verify(expected: list, outputs: list, options: CompressOptions) -> tuple[list[OutputDiff], list[str]]:
    """Held-out diffs and the gate's failures. Non-finite outputs fail whatever the gate: the reference was
    checked finite, so a NaN or infinity is the rewrite's."""
    diffs = compare_outputs(expected, outputs)
    failures = gate_failures(diffs, options.max_error, options.cosine_gate())
    for name in outputs[0] if outputs else []:
        bad = sum(int(np.size(o[name]) - np.count_nonzero(np.isfinite(o[name]))) for o in outputs
                  if np.asarray(o[name]).dtype.kind in "fc")
        if bad:
            failures.append(f"{name}: {bad} NaN or infinite values on the held-out feeds")
    return diffs, failures


def _reference_outputs(reference, holdout: list) -> list:
    return _finite_reference(run_all(reference, holdout))


def _finite_reference(expected: list) -> list:
    """The original model's held-out outputs, checked finite (else they cannot be compared)."""
    for i, outputs in enumerate(expected):
        for name, array in outputs.items():
            if np.asarray(array).dtype.kind in "fc" and not np.isfinite(array).all():
                raise BadInput(f"the original model outputs NaN or infinite values for {name!r} on held-out feed {i}: "
                               "its outputs cannot be compared")
    return expected


def streams(options: CompressOptions, input_bytes: int) -> bool:
    """Whether a run goes block by block: --stream, or by default a streamable run on an input past 2 GB."""
    streaming = options.stream if options.stream is not None else options.streamable() and input_bytes >= TWO_GB
    if options.cluster is not None and not streaming:
        raise BadInput("--cluster runs the encodings of --stream: give --stream (--method quant with --bits B)")
    return streaming


def compress_file_streamed(model_spec: str | Path, options: CompressOptions, input_bytes: int,
                           spill: CodeSpill | None = None) -> tuple[ir.Model, CompressReport]:
    """--stream's job on a model file: loaded with its weights left on disk, fed the inputs its graph declares (no
    whole-model session), coded block by block (on the --cluster when one is given; the codes in `spill`'s file until
    the save). The coded model and report."""
    model, path = load_model(model_spec, lazy=True)
    feeds = calibration_feeds(options, model_spec, graph_input_specs(model))
    with connect(options.cluster) as submit:
        return model, compress_streamed(model, str(path), feeds, options, input_bytes, submit, spill)


def _settled(candidate: Candidate) -> Candidate:
    """The candidate with its error and payload computed and nothing else kept (its statistics, fp32 weight)."""
    return Candidate(candidate.site, candidate.method, candidate.setting, candidate.bytes_after,
                     known(candidate.predicted_error()), known(candidate.payload()))


def _prepare_formats(model: ir.Model, sites: list[WeightSite], block: int | None) -> None:
    """What the sites' formats need of the model (an opset upgrade, a domain), done once up front, as the codes'
    writes would (`CodesPass.prepare`)."""
    formats = {site_format(site, site_block(site, block), packed=True) for site in sites}
    if formats & {"dequantize", "conv"}:
        ensure_opset(model)
    if formats - {"dequantize", "conv"}:
        ensure_gather_domain(model)


def compress_streamed(model: ir.Model, source: str, feeds: list, options: CompressOptions,
                      bytes_before: int, submit: Callable | None = None, spill: CodeSpill | None = None) -> CompressReport:
    """`--method quant --bits B` block by block (`symshrink.stream`): the calibration and held-out feeds run through
    one block of the original model at a time; the block's sites take their input moments from its fit feeds, are
    coded as soon as it has run and written into the model once the next block has run (weights read one site at a
    time); then the held-out
    feeds run through the coded model block by block and are verified. The same statistics as the whole-model path
    where no rows are subsampled (<= rows_per_batch per batch and site), hence the same codes. With `submit` (a
    cluster's, `symshrink.cluster`), each block's encodings run there while the next blocks stream, and are written
    in graph order once all blocks have run: the same bytes. With `spill`, the codes written go to its file until
    the model is saved."""
    fit_feeds, holdout = split_holdout(feeds)
    report = CompressReport(source, "", bytes_before, holdout_feeds=len(holdout), methods=["quant"],
                            parameters=float_parameters(model))
    packed = _packed_select(options)
    sites, passed = find_weight_sites(model, options.weights.exclude, MIN_ELEMENTS, tables=True, convs=True)
    sites = packed(sites, passed) if packed is not None else sites
    report.quant = plan = GridPlan(options.weights.block, options.weights.rounding_for("quant"),
                                   options.weights.layer_error, not options.quant.zero_points, options.quant.act_order,
                                   passed_over=passed)
    if not sites:
        raise NothingToCompress(f"nothing to compress with --method quant: {'; '.join(_no_site_reasons(report)[:6])}")
    _prepare_formats(model, sites, options.weights.block)  # before blocks are built: an opset upgrade replaces nodes
    blocks = partition(model.graph, options.block_bytes)
    in_block = [{node.name: node for node in block.nodes} for block in blocks]
    block_sites = [[site for site in sites if site.node in nodes] for nodes in in_block]
    block_moments = [{site.statistic: site for site in found if site.moments} for found in block_sites]
    rng = np.random.default_rng(options.seed)
    progress = tqdm(total=len(sites), desc="coding block by block", unit="layer", disable=not options.progress)
    stats: dict[str, UnitStats] = {}
    pending: list[tuple[int, Offer, Choice, dict[str, str]]] = []  # coded, not yet written: (block, rewrite, ...)

    def statistics(i: int, block) -> list[str]:
        stats.update({key: UnitStats(site.rows) for key, site in block_moments[i].items()})
        return sorted({site.activation for site in block_moments[i].values()})

    def accumulate(i: int, index: int, arrays: dict) -> None:
        if index < len(fit_feeds):
            for site in block_moments[i].values():
                stats[site.statistic].add(_input_rows(site, np.asarray(arrays[site.activation]), options.rows_per_batch,
                                                      rng))

    def reaches_on(i: int) -> bool:
        """Whether writing block i's codes may change a later block's nodes: a product read there (its bias Add)."""
        own = {id(node) for node in blocks[i].nodes}
        return any(id(use.node) not in own for site in block_sites[i] for use in in_block[i][site.node].outputs[0].uses())

    def code_block(i: int, block) -> None:
        """Code block i's sites now (on the cluster: start them) and write them, unless a product is read by a later
        block (its bias Add), whose nodes must stay as they are until it has run: then once the next block has run."""
        if block_sites[i]:
            nodes = {node.name: node for node in model.graph}
            offer = grid_offer(block_sites[i], stats, nodes, options.weights.block, passed,
                               rounding=options.weights.rounding_for("quant"), symmetric=not options.quant.zero_points,
                               act_order=options.quant.act_order, submit=submit)
            chosen, reasons = quant_rule(offer, options.quant.grid_bits(), options.weights.layer_error)
            if offer.prefetch is not None:
                offer.prefetch(chosen)
            else:  # encoded now: the statistics and fp32 weights go, the codes stay
                chosen = {site: _settled(c) for site, c in chosen.items()}
            pending.append((i, Offer(offer.method, [], {}, offer.rewrite), chosen, reasons))
            stats.clear()
        ready = i + 1 if block_sites[i] and not reaches_on(i) else i
        while pending and pending[0][0] < ready and submit is None:
            write(*pending.pop(0)[1:])

    def write(offer: Offer, chosen: Choice, reasons: dict[str, str]) -> None:
        kept = set(model.graph.initializers) if spill is not None else set()
        plan.layers.extend(_write_choice(model, offer, chosen, reasons, options.weights.layer_error).layers)
        if spill is not None:
            spill.spill(model, kept)  # the codes just written go to disk until the save
        progress.update(len(chosen))

    last_site = max((i for i, found in enumerate(block_sites) if found), default=-1)
    spool = stream_blocks(model, blocks, [*fit_feeds, *holdout], options.threads, statistics, accumulate, code_block,
                          last_block=lambda index: last_site if index < len(fit_feeds) else len(blocks), optimize=False)
    expected = _finite_reference(graph_outputs(model, spool.feeds[len(fit_feeds):]))
    spool.close()  # the reference outputs are all it keeps
    for _, offer, chosen, reasons in pending:  # the last block's, or the cluster's in graph order
        write(offer, chosen, reasons)
    progress.close()
    outputs = stream_outputs(model, holdout, options.threads, options.block_bytes, optimize=False)
    report.diffs, report.failures = verify(expected, outputs, options)
    return report


def compress_model(model: ir.Model, source: str, feeds: list, options: CompressOptions, bytes_before: int,
                   reference=None, model_spec: object = None) -> CompressReport:
    """Rewrite `model` in place with the options' methods, calibrated on `feeds` (the last 20% held out), and
    verify it: the report's `failures` are the gate's (empty: within tolerance). Nothing is written."""
    methods = list(options.method)
    candidates = hyper_candidates(options.hyper) if "hyper" in methods else []
    fit_feeds, holdout = split_holdout(feeds)
    reference = reference or session_for_model(model, options.threads)
    task = task_budget(options, model_spec, reference)
    expected = _reference_outputs(reference, holdout)
    del reference  # its weights and arenas are not needed again: keep peak memory down
    report = CompressReport(source, "", bytes_before, holdout_feeds=len(holdout), methods=methods,
                            parameters=float_parameters(model))
    if "moment" in methods:
        report.plan, report.skipped = _moment_stage(model, options, bytes_before, fit_feeds, holdout, expected)
    if "ternary" in methods:
        report.ternary = _ternary_stage(model, options, fit_feeds, holdout, expected)
        if options.ternary.activations == "two-level":
            report.ternary.activations = _activation_stage(model, options, fit_feeds, holdout, expected)
    if "quant" in methods:
        report.quant = _quant_stage(model, options, fit_feeds, holdout, expected, bytes_before, task)
    if "hyper" in methods:
        report.hyper = _hyper_stage(model, options, candidates, fit_feeds)
    if not _sites(report):
        reasons = _no_site_reasons(report)
        more = f"; and {len(reasons) - 6} more" if len(reasons) > 6 else ""
        raise NothingToCompress(f"nothing to compress with --method {','.join(methods)}: {'; '.join(reasons[:6])}{more}")
    session = session_for_model(model, options.threads)
    report.diffs, report.failures = verify(expected, run_all(session, holdout), options)
    if report.quant is not None and report.quant.unmet:
        report.failures.append(report.quant.unmet)
    if task is not None:
        report.task = task.measure(session)
        if report.task["loss"] > task.max_loss:
            report.failures.append(f"{task.name}: {report.task['value']:.4g} against {task.reference:.4g}, relative loss "
                                   f"{report.task['loss']:.4f} > {task.max_loss:g}")
    return report


def check_options(options: CompressOptions) -> list[str]:
    """The methods, after the checks that need no model (bad options fail before any work)."""
    methods = list(options.method)
    if methods == ["moment"] and not options.moment.has_widths() and options.max_error is None:
        raise BadInput("give the widths: --keep F, --width K, --width-rule sqrt:C, --target-size S, --max-error E "
                       "or --plan plan.json")
    if "moment" in methods and len(methods) > 1 and not options.moment.has_widths():
        raise BadInput(f"with --method {','.join(methods)} give the moment widths (--keep, --width, --width-rule, "
                       "--target-size or --plan): --max-error is the gate of the whole model")
    if options.ternary.activations == "two-level" and ("ternary" not in methods or options.max_error is None):
        raise BadInput("--activations two-level comes with --method ternary and --max-error: each ReLU is quantized "
                       "only where the held-out error stays within it")
    if options.moment.plan and not {"moment", "quant"} & set(methods):
        raise BadInput("--plan replays moment-reduction and integer-grid plans; ternary and hyperfunction codes are "
                       "recomputed from the calibration data")
    if "hyper" in methods:
        hyper_candidates(options.hyper)
    return methods


def compress(model_spec: str, output: str | Path, options: CompressOptions, force: bool = False,
             report_path: str | Path | None = None) -> CompressReport:
    """The file-to-file job: every output path checked before any work (the input, its data files and the
    calibration file are never written; existing files are replaced only with `force`); compress; the
    report written also when the gate fails (then OutsideTolerance and no model file); the model and the plan
    written atomically."""
    check_options(options)
    if report_path is not None:
        check_report_path(report_path)
    path = resolve_model(model_spec)
    model_files = input_files(path) if path.is_file() else []  # the .onnx and its external data, read once
    inputs = list(model_files)
    if isinstance(options.calib, (str, Path)):
        inputs += input_files(options.calib)
    claimed = claim_outputs({"output": output, "--plan-out": options.plan_out, "--report": report_path},
                            force=force, inputs=inputs)
    data = claimed["output"].with_name(claimed["output"].name + ".data")  # written when the weights pass 2 GB
    if any(data.exists() and data.samefile(p) for p in inputs):
        raise BadInput(f"{data} (the output's external data file) is an input of this run: give another -o")
    before = sum(f.stat().st_size for f in model_files)
    streaming = streams(options, before)
    with contextlib.closing(CodeSpill()) if streaming else contextlib.nullcontext() as spill:
        return _compress_and_save(model_spec, options, force, report_path, claimed, inputs, before, spill)


def _compress_and_save(model_spec, options: CompressOptions, force: bool, report_path, claimed: dict[str, Path],
                       inputs: list[Path], before: int, spill: CodeSpill | None) -> CompressReport:
    """`compress` once its outputs are claimed: block by block when a `spill` for the codes is given."""
    streaming = spill is not None
    if streaming:
        model, report = compress_file_streamed(model_spec, options, before, spill)
    else:
        model, path = load_model(model_spec)
        reference = make_session(path, options.threads)
        feeds = calibration_feeds(options, model_spec, input_specs(reference, model))
        report = compress_model(model, str(path), feeds, options, before, reference, model_spec)
    report.output = str(claimed["output"])
    if report.failures:
        report.bytes_after = sum(v.const_value.nbytes for v in model.graph.initializers.values()) if streaming \
            else ir.to_proto(model).ByteSize()  # the file it would have been (streaming: its weights, not serialised)
        if report_path is not None:
            write_report(report, claimed["--report"])
        raise OutsideTolerance("outside tolerance, nothing written: " + "; ".join(report.failures)
                               + (f" (report: {report_path})" if report_path is not None else ""))
    out = save_model(model, claimed["output"], force=force, inputs=inputs)
    report.bytes_after = model_bytes_on_disk(out)
    if options.plan_out:
        write_atomically(claimed["--plan-out"], lambda handle: handle.write(report.plan_json().encode()))
    if report_path is not None:
        write_report(report, claimed["--report"])
    return report
