"""The compress pipeline: load -> analyse -> plan -> calibrate -> rewrite -> verify -> save.

Each step calls the module that owns it; data flows one way. Nothing is written unless the verify
gate passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from symshrink.calib import load_feeds, random_feeds, split_holdout
from symshrink.errors import BadInput, OutsideTolerance
from symshrink.modelio import load_model, model_bytes_on_disk, save_model
from symshrink.passes.analysis import Group, analyse
from symshrink.passes.moment import MomentReductionPass
from symshrink.passes.plan import Plan, make_plan
from symshrink.runtime.diff import OutputDiff, compare_outputs, gate_failures
from symshrink.runtime.ort import collect_probes, input_specs, make_session, run_all, session_for_model

__all__ = ["CompressOptions", "CompressReport", "compress", "default_calib"]

logger = logging.getLogger(__name__)


@dataclass
class CompressOptions:
    method: str = "moment"
    keep: float | None = None
    width: int | None = None
    calib: str | None = None  # zoo data set, .npz or folder; None: the zoo model's default
    calib_samples: int | None = None
    random_calib: bool = False
    plan: str | None = None  # replay this plan file
    plan_out: str | None = None
    max_error: float | None = None  # relative L2 gate on held-out samples
    min_cosine: float | None = None
    ridge: float = 1e-3
    threads: int | None = None
    progress: bool = True


@dataclass
class CompressReport:
    source: str
    output: str
    plan: Plan
    diffs: list[OutputDiff]
    bytes_before: int
    bytes_after: int = 0
    holdout_feeds: int = 0
    skipped: list[Group] = field(default_factory=list)


def default_calib(model_spec: str) -> str | None:
    from symshrink.models.registry import ZOO  # noqa: PLC0415

    entry = ZOO.get(str(model_spec))
    return entry.calib if entry else None


def _calibration(options: CompressOptions, model_spec: str, inputs) -> list:
    spec = options.calib or default_calib(model_spec)
    if spec is None:
        if not options.random_calib:
            raise BadInput("give calibration data with --calib (zoo data set, .npz or folder of .npy), "
                           "or --random-calib to fit random inputs")
        return random_feeds(inputs, options.calib_samples or 32)
    return load_feeds(spec, inputs, "calib", options.calib_samples)


def compress(model_spec: str, output: str | Path, options: CompressOptions) -> CompressReport:
    model, path = load_model(model_spec)
    before = model_bytes_on_disk(path)
    reference = make_session(path, options.threads)
    groups = analyse(model)
    if options.plan:
        plan = Plan.load(options.plan)
        plan.check_against(groups)
    else:
        plan = make_plan(groups, options.method, keep=options.keep, width=options.width, ridge=options.ridge)
    feeds = _calibration(options, model_spec, input_specs(reference))
    fit_feeds, holdout = split_holdout(feeds)
    by_name = {g.name: g for g in groups}
    probes = {by_name[p.group].probe: -1 for p in plan.groups}
    bar = tqdm(total=len(fit_feeds), desc="calibrating", unit="batch", disable=not options.progress, leave=False)
    with bar:
        acts = collect_probes(model, probes, fit_feeds, options.threads, progress=bar)
    activations = {p.group: acts[by_name[p.group].probe] for p in plan.groups}
    MomentReductionPass(plan, groups, activations)(model)
    compressed = session_for_model(model, options.threads)
    diffs = compare_outputs(run_all(reference, holdout), run_all(compressed, holdout))
    report = CompressReport(str(path), str(output), plan, diffs, before, holdout_feeds=len(holdout),
                            skipped=[g for g in groups if not g.ok])
    failures = gate_failures(diffs, options.max_error, options.min_cosine)
    if failures:
        raise OutsideTolerance("outside tolerance, nothing written: " + "; ".join(failures))
    out = save_model(model, output)
    report.bytes_after = model_bytes_on_disk(out)
    if options.plan_out:
        Path(options.plan_out).write_text(plan.to_json())
    return report
