"""Benchmark symshrink against onnxruntime's own quantizers on zoo models.

    python tools/bench.py --models fmnist-mlp ppocr-rec --selectors select magnitude \
        --budgets keep0.75 keep0.5 --moment moment-select-size@keep0.5 --merge --out docs/benchmarks.md

For each model, in one process: build every variant into a work folder (fp32, int8 dynamic,
MatMulNBits 2/4/8-bit, k-quant, symshrink moment reduction per selector and budget), then measure
each variant on its own: bytes on disk, peak RSS growth of creating a session (fresh subprocess,
VmHWM), median latency of one representative feed (each variant in its own block after a pause, fp32
in the same process), output error vs fp32 on the zoo data set's eval split, and the zoo task metric.
Writes a markdown report, a JSON file with all raw numbers (same name, .json) and one
rate-distortion plot per model (img/rd-<model>.png beside the report).
A variant that fails to build or run becomes a row with its one-line error; the run goes on.

symshrink variants are named moment-<selector>-<budget>; the budget is keep<F> (keep the fraction F
of every group), size<F> (--target-size F: the global allocator picks each group's width for a file of
F times the input's size) or size@<budget> (a size target equal to the bytes on disk of the same
selector's <budget> variant, built first in the same run: global vs uniform allocation at equal size).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from symshrink.baselines import ACCURACY_LEVEL, NBITS_BLOCK, build_baseline, name_nodes
from symshrink.calibration.feeds import load_feeds
from symshrink.modelio import model_bytes_on_disk, resolve_model
from symshrink.models.registry import ZooModel, get_model, get_task
from symshrink.passes.moment.budget import target_bytes
from symshrink.passes.moment.plan import SELECTOR_KINDS
from symshrink.runtime.diff import OutputDiff, compare_outputs
from symshrink.runtime.ort import input_specs, make_session, run_all

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6  # sizes and memory in decimal MB, as in shared/docs/baselines.md
LATENCY_BATCH = {"fmnist-mlp": 64, "digits-mlp": 64}  # rows per latency feed; others: 1
ORT_VARIANTS = ["fp32", "int8-dynamic", "nbits4-rtn-b32", "nbits4-kquant", "nbits2", "nbits8"]
# quantize_dynamic's defaults (Gather and Conv too); MatMulNBits over embedding tables (Gather) too
OPTIONAL_VARIANTS = ["int8-dynamic-all", "nbits4-rtn-b32-gather", "int8-static"]
MOMENT_NAME = re.compile(r"moment-(?P<selector>[a-z]+)-(?P<budget>(?:size@)?(?:keep|size)(?P<f>[0-9]*\.?[0-9]+))")
TERNARY_NAME = re.compile(r"(?:(?P<moment>moment-[a-z]+-keep[0-9]*\.?[0-9]+)\+)?"
                          r"ternary-(?P<block>b32|b64|b128|b256|channel)-(?P<correction>none|moments|lstsq)"
                          r"(?:-max(?P<max>[0-9]*\.?[0-9]+))?(?:-(?P<fed>fed))?")
HYPER_NAME = re.compile(r"(?:(?P<moment>moment-[a-z]+-keep[0-9]*\.?[0-9]+)\+)?"
                        r"hyper-(?P<codebook>lattice|winding|grid)(?:-g(?P<group>[0-9]+))?"
                        r"-(?:b(?P<bits>[0-9]+)|e(?P<error>[0-9]*\.?[0-9]+))(?:-(?P<fed>fed))?")
QUANT_NAME = re.compile(r"(?:(?P<moment>moment-[a-z]+-keep[0-9]*\.?[0-9]+)\+)?"
                        r"quant-(?P<block>b16|b32|b64|b128|b256|channel)-(?P<bits>8|4|2)(?:-(?P<zp>zp))?"
                        r"(?:-e(?P<error>[0-9]*\.?[0-9]+))?(?:-(?P<dq>dq))?(?:-(?P<nearest>nearest)|-(?P<inorder>inorder))?")
ALLOC_NAME = re.compile(r"(?:(?P<moment>moment-[a-z]+-keep[0-9]*\.?[0-9]+)\+)?"
                        r"alloc-(?:c(?P<cosine>0\.[0-9]+)|e(?P<error>[0-9]*\.?[0-9]+)|s(?P<size>0\.[0-9]+))"
                        r"(?:-b(?P<block>256))?")
BATCH = 32  # rows of the second latency feed (the representative feed repeated)
DRIFT = 1.25  # fp32's first and last latency differ by more than this factor: the timings are flagged
LOSS = 0.01  # "near-lossless": task metric within 1% (relative) of fp32's
NOTES = {
    "fp32": "original",
    "int8-dynamic": "quantize_dynamic, MatMul only, per-channel, reduce_range",
    "int8-dynamic-all": "quantize_dynamic defaults (MatMul, Gather, Conv...), per-channel, reduce_range",
    "int8-static": "quantize_static QDQ, per-channel, reduce_range, activation ranges from the zoo calibration data",
    "nbits4-rtn-b32": f"MatMulNBits RTN 4-bit, block {NBITS_BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits4-rtn-b32-gather": f"MatMulNBits RTN 4-bit, block {NBITS_BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}, and "
                             "Gather tables 4-bit (GatherBlockQuantized)",
    "nbits4-kquant": f"MatMulNBits k-quant 4-bit, block {NBITS_BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits2": f"MatMulNBits RTN 2-bit, block {NBITS_BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits8": f"MatMulNBits RTN 8-bit, block {NBITS_BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
}

# Runs in a fresh interpreter so that the parent's peak RSS does not carry over.
RSS_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

model, threads, feed_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with np.load(feed_file) as data:
    feed = {k: data[k] for k in data.files}
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.log_severity_level = 3
before = hwm()
start = time.perf_counter()
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
seconds = time.perf_counter() - start
created = hwm()
session.run(None, feed)
ran = hwm()
print(json.dumps({"before": before, "session": created - before, "first_run": ran - before, "seconds": seconds}))
"""


@dataclass
class Variant:
    name: str
    path: Path | None = None
    note: str = ""
    error: str | None = None
    build_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def moment_name(text: str) -> str:
    """Check a symshrink variant name moment-<selector>-<budget> (argparse type); returns it unchanged."""
    match = MOMENT_NAME.fullmatch(text)
    if not match or match["selector"] not in SELECTOR_KINDS or not 0 < float(match["f"]) <= 1:
        raise argparse.ArgumentTypeError(f"not moment-<{'|'.join(SELECTOR_KINDS)}>-<keepF|sizeF|size@keepF>, "
                                         f"0 < F <= 1: {text!r}")
    return text


def ternary_name(text: str) -> str:
    """Check a ternary variant name [moment-<selector>-keep<F>+]ternary-<b32|b64|b128|b256|channel>-<none|moments|lstsq>
    [-max<E>][-fed] (-max<E>: --max-error E, the held-out error budget that picks which layers are ternary; -fed:
    --rounding feedback)."""
    match = TERNARY_NAME.fullmatch(text)
    if not match or (match["moment"] and not MOMENT_NAME.fullmatch(match["moment"])):
        raise argparse.ArgumentTypeError(f"not [moment-SELECTOR-keepF+]ternary-<b32|b64|b128|b256|channel>-"
                                         f"<none|moments|lstsq>[-maxE][-fed]: {text!r}")
    return text


def hyper_name(text: str) -> str:
    """Check a hyperfunction variant name
    [moment-<selector>-keep<F>+]hyper-<lattice|winding|grid>[-g<G>]-<b<B>|e<E>>[-fed]: b<B>: every tensor at B bits
    per pair of weights, the setting of least error; e<E>: per tensor the fewest bits (4 to 13 per pair) within
    relative error E. grid is round-to-nearest in the same format; g<G>: per group of G; -fed: each MatMul weight's
    codes rounded with error feedback on its input's second moment (--rounding feedback)."""
    match = HYPER_NAME.fullmatch(text)
    if not match or (match["moment"] and not MOMENT_NAME.fullmatch(match["moment"])):
        raise argparse.ArgumentTypeError(f"not [moment-SELECTOR-keepF+]hyper-<lattice|winding|grid>[-gG]-<bB|eE>[-fed]: "
                                         f"{text!r}")
    return text


def quant_name(text: str) -> str:
    """Check an integer-grid variant name
    [moment-<selector>-keep<F>+]quant-<b16|b32|b64|b128|b256|channel>-<8|4|2>[-zp][-eE][-dq][-nearest|-inorder]:
    every weight site, 1x1 conv and Gather table on symshrink's grid of that many bits (MatMulNBits,
    DequantizeLinear or GatherBlockQuantized; symmetric, or with zero points: -zp), or with -eE the fewest bits
    within the per-layer error E (--layer-error), -dq the other convs too (--dequantize-convs), rounded with error
    feedback on the calibration second moment in act-order (-inorder: in stored order), or to nearest."""
    match = QUANT_NAME.fullmatch(text)
    if not match or (match["moment"] and not MOMENT_NAME.fullmatch(match["moment"])):
        raise argparse.ArgumentTypeError(f"not [moment-SELECTOR-keepF+]quant-<b16|b32|b64|b128|b256|channel>-<8|4|2>"
                                         f"[-zp][-eE][-dq][-nearest|-inorder]: {text!r}")
    return text


def alloc_name(text: str) -> str:
    """Check an allocator variant name [moment-<selector>-keep<F>+]alloc-<c<C>|e<E>|s<F>>: `symshrink compress` with
    no --method (per site the integer grid or fp32 of the fewest bytes) within held-out cosine C, relative error E, or
    (--method quant) the least distorted plan within F of fp32's size; -b256: --block-size 256 (blocks of 256 offered
    for every site: smaller, slower)."""
    match = ALLOC_NAME.fullmatch(text)
    if not match or (match["moment"] and not MOMENT_NAME.fullmatch(match["moment"])):
        raise argparse.ArgumentTypeError(f"not [moment-SELECTOR-keepF+]alloc-<cC|eE|sF>[-b256]: {text!r}")
    return text


def budget_name(text: str) -> str:
    """Check a budget (keep<F>, size<F> or size@<budget>) by the variant name it makes (argparse type)."""
    moment_name(f"moment-select-{text}")
    return text


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------- building variants


def quantize_static_int8(spec: str, entry: ZooModel, named: Path, out: Path) -> None:
    """onnxruntime's static int8 (QDQ, per-channel weights, reduce_range) with activation ranges from the same
    calibration feeds symshrink fits on (the zoo model's data set)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static  # noqa: PLC0415

    from symshrink.options import options_from  # noqa: PLC0415
    from symshrink.pipeline import calibration_feeds  # noqa: PLC0415
    from symshrink.runtime.ort import input_specs  # noqa: PLC0415

    session = ort.InferenceSession(str(named), providers=["CPUExecutionProvider"])
    feeds = calibration_feeds(options_from(calib=entry.calib), spec, input_specs(session))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(named, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True)


def compress_symshrink(spec: str, entry: ZooModel, out: Path, threads: int, **settings: Any) -> dict[str, Any]:
    """symshrink.pipeline.compress with these (flat, typed) options; the plans' widths and codecs. The work folder
    is the benchmark's own: earlier outputs are replaced."""
    from symshrink.options import options_from  # noqa: PLC0415
    from symshrink.pipeline import compress  # noqa: PLC0415

    if "max_error" not in settings and "min_cosine" not in settings:
        settings["min_cosine"] = -1.0  # no gate: a row records what the setting gives
    report = compress(spec, out, options_from(calib=entry.calib, progress=False, threads=threads, **settings), force=True)
    result = {"holdout_feeds": report.holdout_feeds, "holdout_diffs": [d.to_dict() for d in report.diffs]}
    if report.hyper is not None:
        coded = report.hyper.coded()
        weights = sum(int(np.prod(t.shape)) for t in coded)
        result["hyper"] = {"tensors": len(coded), "kept_float": len(report.hyper.tensors) - len(coded),
                           "bits_per_weight": sum(int(np.prod(t.shape)) * t.bits_per_weight for t in coded) / max(weights, 1),
                           "table_bytes": report.hyper.table_bytes,
                           "max_tensor_error": max((t.relative_error for t in coded), default=None),
                           "settings": {t.name: t.setting for t in coded}}
    if report.quant is not None and report.quant.trials:  # the allocator's: its calibration and verified trials
        result["allocation"] = {"calibration": report.quant.calibration, "trials": report.quant.trials,
                                "codecs": dict(Counter(f"{layer.codec} b{layer.block_text()}"
                                                       for layer in report.quant.layers))}
    if report.ternary is not None:
        result["codecs"] = report.ternary.counts()
        result["fp32_layers"] = {layer.node: layer.reason for layer in report.ternary.layers if layer.codec != "ternary"}
    if report.plan is None:
        return result
    widths = [{"group": g.group, "kind": g.kind, "width": g.width,
               "kept": g.keep_width if g.kept is None else len(g.kept)} for g in report.plan.groups]
    kept = [w["kept"] / w["width"] for w in widths] or [1.0]
    return {"groups": len(report.plan.groups), "skipped_groups": len(report.skipped),
            "kept_fraction": {"min": min(kept), "max": max(kept), "mean": float(np.mean(kept)),
                              "units": sum(w["kept"] for w in widths) / max(1, sum(w["width"] for w in widths))},
            "widths": widths, **result}


def build_moment(spec: str, entry: ZooModel, variant: Variant, built: dict[str, Variant], threads: int) -> None:
    """Compress `variant` (moment-<selector>-<budget>) into its path; size@ budgets read `built`."""
    match = MOMENT_NAME.fullmatch(variant.name)
    assert match and variant.path is not None
    selector, budget = match["selector"], match["budget"]
    keep, target, what = None, None, ""
    if budget.startswith("size@"):
        ref = built.get(f"moment-{selector}-{budget.removeprefix('size@')}")
        if ref is None or ref.path is None:
            raise RuntimeError(f"size@ needs moment-{selector}-{budget.removeprefix('size@')} built in the same run")
        target = model_bytes_on_disk(ref.path)
        what = f"global allocation to the size of {ref.name} ({target / MB:.2f} MB)"
    elif budget.startswith("size"):
        target = float(budget.removeprefix("size"))
        what = f"global allocation to {target:g} of the input's size"
    else:
        keep = float(budget.removeprefix("keep"))
        what = f"keep {keep:g} of each group"
    variant.note = f"symshrink moment reduction, selector {selector}, {what}, calib {entry.calib}"
    before = model_bytes_on_disk(built["fp32"].path)
    variant.extra = {"selector": selector, "budget": budget,
                     "target_bytes": None if target is None else target_bytes(target, before)}
    variant.extra.update(compress_symshrink(spec, entry, variant.path, threads, selector=selector, keep=keep,
                                            target_size=target))


def after_moment(match: re.Match, method: str, settings: dict[str, Any], what: str) -> str:
    """A variant named moment-<selector>-keep<F>+<method>...: width reduction first (the settings say so), and the
    note's text with it."""
    if not match["moment"]:
        return what
    moment = MOMENT_NAME.fullmatch(match["moment"])
    settings.update(method=f"moment,{method}", selector=moment["selector"], keep=float(moment["f"]))
    return f"moment reduction ({moment['selector']}, keep {moment['f']}) then {what}"


def build_ternary(spec: str, entry: ZooModel, variant: Variant, threads: int) -> None:
    """Compress `variant` ([moment-<selector>-keep<F>+]ternary-<block>-<correction>) into its path."""
    match = TERNARY_NAME.fullmatch(variant.name)
    assert match and variant.path is not None
    block = match["block"].removeprefix("b")
    settings: dict[str, Any] = {"method": "ternary", "block": None if block == "channel" else int(block),
                                "correction": match["correction"]}
    what = "symshrink " + after_moment(match, "ternary", settings, f"ternary, block {block}, correction {match['correction']}")
    if match["max"]:
        settings["max_error"] = float(match["max"])
        what += f", layers ternary as long as the held-out error stays <= {match['max']} (others 8-bit)"
    if match["fed"]:
        settings["rounding"] = "feedback"
        what += ", second-moment rounding (error feedback) onto the ternary blocks"
    variant.note = f"{what}, calib {entry.calib}"
    variant.extra = {"ternary": match["block"] + "-" + match["correction"]}
    variant.extra.update(compress_symshrink(spec, entry, variant.path, threads, **settings))


def build_quant(spec: str, entry: ZooModel, variant: Variant, threads: int) -> None:
    """Compress `variant` ([moment-<selector>-keep<F>+]quant-<block>-<bits>) into its path."""
    match = QUANT_NAME.fullmatch(variant.name)
    assert match and variant.path is not None
    block = match["block"].removeprefix("b")
    rounding = "nearest" if match["nearest"] else "feedback"
    settings: dict[str, Any] = {"method": "quant", "bits": int(match["bits"]), "rounding": rounding,
                                "block": None if block == "channel" else int(block), "zero_points": bool(match["zp"]),
                                "act_order": not match["inorder"], "dequantize_convs": bool(match["dq"])}
    grid = f"{'grids with zero points' if match['zp'] else 'symmetric grids'}, block {block}, "
    grid += "every conv (DequantizeLinear -> Conv where not 1x1), " if match["dq"] else ""
    if match["error"]:
        settings["layer_error"] = float(match["error"])
        what = f"per layer the fewest bits (8/4/2) within output error {match['error']}, {grid}"
    else:
        what = f"{match['bits']}-bit {grid}"
    what += "rounded to nearest" if match["nearest"] else \
        f"second-moment rounding (error feedback{', in stored order' if match['inorder'] else ', act-order'})"
    variant.note = f"symshrink {after_moment(match, 'quant', settings, what)}, calib {entry.calib}"
    variant.extra = {"quant": f"{match['block']}-{match['bits']}-{'zp' if match['zp'] else 'sym'}-"
                              f"e{match['error'] or '-'}{'-dq' if match['dq'] else ''}-{rounding}"
                              f"{'-inorder' if match['inorder'] else ''}"}
    variant.extra.update(compress_symshrink(spec, entry, variant.path, threads, **settings))


def build_alloc(spec: str, entry: ZooModel, variant: Variant, threads: int) -> None:
    """Compress `variant` ([moment-<selector>-keep<F>+]alloc-<cC|eE|sF>) into its path: the allocator's plan."""
    match = ALLOC_NAME.fullmatch(variant.name)
    assert match and variant.path is not None
    settings: dict[str, Any] = {"method": "quant"} if match["size"] or match["moment"] else {}
    if match["cosine"]:
        settings["min_cosine"], what = float(match["cosine"]), f"held-out cosine >= {match['cosine']}"
    elif match["error"]:
        settings["max_error"], what = float(match["error"]), f"held-out relative error <= {match['error']}"
    else:
        settings["target_size"], what = float(match["size"]), f"{match['size']} of fp32's size"
    if match["block"]:
        settings["block"] = int(match["block"])
    blocks = "32-256" if match["block"] else "32-128 (tables 256 too)"
    what = f"the allocator (per site an integer grid of 8/4/2 bits, blocks of {blocks}, or fp32) within {what}"
    variant.note = f"symshrink {after_moment(match, 'quant', settings, what)}, calib {entry.calib}"
    variant.extra = {"alloc": variant.name.rsplit("alloc-", 1)[1]}
    variant.extra.update(compress_symshrink(spec, entry, variant.path, threads, **settings))


def build_hyper(spec: str, entry: ZooModel, variant: Variant, threads: int) -> None:
    """Compress `variant` ([moment-<selector>-keep<F>+]hyper-<codebook>[-g<G>]-<b<B>|e<E>>[-fed]) into its path."""
    match = HYPER_NAME.fullmatch(variant.name)
    assert match and variant.path is not None
    settings: dict[str, Any] = {"method": "hyper", "codebook": match["codebook"],
                                "group_size": int(match["group"]) if match["group"] else None}
    group = f"per group of {match['group']}" if match["group"] else "per tensor"
    codec = {"lattice": "HC v3 lattice (K 0-3, side 3/4/6 RMS)", "winding": "HC v1 winding",
             "grid": "round-to-nearest (range or clipped to 4-12 RMS, least error)"}[match["codebook"]] + f", {group}"
    if match["bits"]:
        settings.update(index_bits=(int(match["bits"]),), tensor_error=None)
        what = f"{codec}, {match['bits']} bits per pair, least error"
    else:
        settings["tensor_error"] = float(match["error"])
        what = f"{codec}, per tensor the fewest bits within relative error {match['error']}"
    if match["fed"]:
        settings["rounding"] = "feedback"
        what += ", MatMul weights rounded with error feedback on their input's second moment"
    variant.note = f"symshrink {after_moment(match, 'hyper', settings, what)}"
    variant.extra = {"hyper_variant": match["codebook"] + (f"-g{match['group']}" if match["group"] else "")
                     + ("-fed" if match["fed"] else "")}
    variant.extra.update(compress_symshrink(spec, entry, variant.path, threads, **settings))


def build_variants(spec: str, entry: ZooModel, src: Path, work: Path, moments: list[str],
                   wanted: list[str], threads: int) -> list[Variant]:
    """Build every variant into `work`; a failure is recorded on its Variant, never raised."""
    work.mkdir(parents=True, exist_ok=True)
    named = work / "named.onnx"
    builders: dict[str, Any] = {name: partial(build_baseline, name, named) for name in ORT_VARIANTS + OPTIONAL_VARIANTS
                                if name not in ("fp32", "int8-static")}
    builders["int8-static"] = lambda out: quantize_static_int8(spec, entry, named, out)
    try:
        name_nodes(src, named)
    except Exception as err:  # noqa: BLE001 (any failure becomes a row)
        log.warning("%s: naming nodes failed: %s", spec, one_line(err))
        named = src
    order = [v for v in wanted if v in builders] + moments
    todo = sorted(order, key=lambda m: "size@" in m)  # size@ variants read the size of another one
    built = {"fp32": Variant("fp32", src, NOTES["fp32"])}
    for name in tqdm(todo, desc=f"{spec}: build", unit="variant", leave=False):
        out = work / f"{name}.onnx"
        variant = Variant(name, out, NOTES.get(name, ""))
        start = time.perf_counter()
        try:
            if name in builders:
                with contextlib.redirect_stdout(io.StringIO()):  # k-quant prints a progress bar
                    builders[name](out)
            elif TERNARY_NAME.fullmatch(name):
                build_ternary(spec, entry, variant, threads)
            elif HYPER_NAME.fullmatch(name):
                build_hyper(spec, entry, variant, threads)
            elif QUANT_NAME.fullmatch(name):
                build_quant(spec, entry, variant, threads)
            elif ALLOC_NAME.fullmatch(name):
                build_alloc(spec, entry, variant, threads)
            else:
                build_moment(spec, entry, variant, built, threads)
        except Exception as err:  # noqa: BLE001 (any failure becomes a row)
            variant.error, variant.path = one_line(err), None
            log.warning("%s %s: %s", spec, name, variant.error)
        variant.build_s = time.perf_counter() - start
        log.info("%s %-26s built in %.1f s%s", spec, name, variant.build_s, " (failed)" if variant.error else "")
        built[name] = variant
    return [built[name] for name in ["fp32", *order]]


# ---------------------------------------------------------------- measurements


def representative_feed(entry: ZooModel, spec: str, specs: list, eval_feeds: list[dict]) -> dict:
    """The largest eval feed (longest text), cut to the latency batch (fmnist 64 rows, else 1)."""
    batch = LATENCY_BATCH.get(spec, 1)
    feeds = eval_feeds
    if max(next(iter(f.values())).shape[0] for f in feeds) < batch:
        feeds = load_feeds(entry.calib, specs, "eval", batch)
    feed = max(feeds, key=lambda f: sum(a.size for a in f.values()))
    return {k: np.ascontiguousarray(v[:batch]) for k, v in feed.items()}


def measure_rss(path: Path, feed_file: Path, threads: int) -> dict[str, float]:
    """Peak RSS growth (MB) of creating a session, and after its first run, and the session's creation time
    (s), in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(threads), str(feed_file)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["rss child failed"])[-1])
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rss_mb": raw["session"] / MB, "rss_first_run_mb": raw["first_run"] / MB,
            "rss_before_mb": raw["before"] / MB, "session_s": raw["seconds"]}


def measure_latency(path: Path, feed: dict, threads: int, pause: float, min_runs: int,
                    min_seconds: float) -> dict[str, float]:
    """Median wall time of `session.run` on one feed, timed in its own block after a pause."""
    session = make_session(path, threads)
    for _ in range(3):
        session.run(None, feed)
    time.sleep(pause)
    times: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 20 * min_runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"latency_ms": float(np.median(ms)), "latency_p25_ms": float(np.percentile(ms, 25)),
            "latency_p75_ms": float(np.percentile(ms, 75)), "latency_runs": len(times)}


def primary_output(session: ort.InferenceSession) -> str:
    """The float output of lowest rank (MiniLM: the pooled sentence embedding), first on ties."""
    floats = [o for o in session.get_outputs() if o.type in ("tensor(float)", "tensor(float16)")]
    outs = floats or session.get_outputs()
    return min(outs, key=lambda o: len(o.shape)).name


def measure_quality(session: ort.InferenceSession, feeds: list[dict], reference: list[dict],
                    output: str) -> dict[str, Any]:
    """Output error vs fp32 over the eval feeds: the primary output's rel L2 / cosine, plus all diffs."""
    diffs: list[OutputDiff] = compare_outputs(reference, run_all(session, feeds, list(reference[0])))
    main = next(d for d in diffs if d.name == output)
    return {"rel_l2": main.rel_l2, "cosine": main.cosine, "top1": main.top1,
            "diffs": [d.to_dict() for d in diffs]}


def bench_model(spec: str, moments: list[str], wanted: list[str], args: argparse.Namespace,
                work: Path) -> dict[str, Any]:
    entry = get_model(spec)
    src = Path(args.onnx[spec]) if spec in args.onnx else resolve_model(spec)
    model_spec = str(src) if spec in args.onnx else spec
    reference = make_session(src, args.threads)
    specs = input_specs(reference)
    eval_feeds = load_feeds(entry.calib, specs, "eval", args.samples)
    feed = representative_feed(entry, spec, specs, eval_feeds)
    feed_file = work / spec / "latency_feed.npz"
    feed_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(feed_file, **feed)
    batch_feed = {k: np.repeat(v[:1], BATCH, axis=0) for k, v in feed.items()} if args.batch32 else None
    output = primary_output(reference)
    ref_outputs = run_all(reference, eval_feeds)
    del reference

    start = time.perf_counter()
    variants = build_variants(model_spec, entry, src, work / spec, moments, wanted, args.threads)
    build_wall = time.perf_counter() - start
    rows = []
    for v in tqdm(variants, desc=f"{spec}: measure", unit="variant", leave=False):
        row: dict[str, Any] = {"variant": v.name, "note": v.note, "error": v.error, "build_s": v.build_s,
                               **v.extra}
        if v.path is not None:
            try:
                row["bytes"] = model_bytes_on_disk(v.path)
                row.update(measure_rss(v.path, feed_file, args.threads))
                row.update(measure_latency(v.path, feed, args.threads, args.pause, args.min_runs,
                                           args.min_seconds))
                if batch_feed is not None:
                    timing = measure_latency(v.path, batch_feed, args.threads, args.pause, args.min_runs // 3,
                                             args.min_seconds)
                    row["latency_b32_ms"] = timing["latency_ms"]
                session = make_session(v.path, args.threads)
                row.update(measure_quality(session, eval_feeds, ref_outputs, output))
                row["metric"] = get_task(entry.task).evaluate(session)
                del session
            except Exception as err:  # noqa: BLE001 (any failure becomes a row)
                row["error"] = one_line(err)
                log.warning("%s %s: %s", spec, v.name, row["error"])
        log.info("%s %-26s %s", spec, v.name, row.get("error") or
                 f"{row['bytes'] / MB:.2f} MB, {row['latency_ms']:.2f} ms, metric {row['metric']:.4f}")
        rows.append(row)
    # fp32 again at the end: the drift of the machine over the run
    drift = measure_latency(src, feed, args.threads, args.pause, args.min_runs, args.min_seconds)
    return {"model": spec, "source": str(src), "package": entry.source, "override": spec in args.onnx,
            "task": entry.task, "calib": entry.calib,
            "reference_metric": entry.reference_metric, "primary_output": output,
            "eval_samples": sum(next(iter(f.values())).shape[0] for f in eval_feeds),
            "latency_feed": {k: list(v.shape) for k, v in feed.items()},
            "batch_feed": None if batch_feed is None else {k: list(v.shape) for k, v in batch_feed.items()},
            "fp32_latency_end_ms": drift["latency_ms"], "build_wall_s": build_wall, "rows": rows}


# ---------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    flags: list[str] = []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": simd, "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "commit": commit + ("+dirty" if dirty else ""), "loadavg_start": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def family(variant: str) -> str:
    """fp32, onnxruntime (its quantizers) or symshrink (everything else)."""
    if variant == "fp32":
        return "fp32"
    return "onnxruntime" if variant in ORT_VARIANTS + OPTIONAL_VARIANTS else "symshrink"


def kept_range(row: dict[str, Any]) -> str:
    """min-max over the rewritten groups of kept width / width (blank for rows without a plan)."""
    kept = row.get("kept_fraction")
    if not kept:
        return ""
    return f"{kept['min']:.2f}" if kept["max"] - kept["min"] < 5e-3 else f"{kept['min']:.2f}-{kept['max']:.2f}"


def drifted(model: dict[str, Any], fp32: dict[str, Any]) -> bool:
    """fp32's first and end-of-run latencies differ by more than DRIFT: the machine's load changed."""
    first, end = fp32["latency_ms"], model["fp32_latency_end_ms"]
    return max(first, end) > DRIFT * min(first, end)


def near_lossless(model: dict[str, Any]) -> str:
    """The smallest row of each family whose task metric is within LOSS (relative) of fp32's."""
    rows = [r for r in model["rows"] if not r.get("error")]
    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    if fp32 is None:
        return ""
    higher = get_task(model["task"]).higher_is_better
    bound = fp32["metric"] * (1 - LOSS if higher else 1 + LOSS)
    parts = []
    for fam in ("symshrink", "onnxruntime"):
        ok = [r for r in rows if family(r["variant"]) == fam and (r["metric"] >= bound if higher else r["metric"] <= bound)]
        if not ok:
            tried = sum(family(r["variant"]) == fam for r in rows)
            parts.append(f"{fam}: none of its {tried} measured rows")
            continue
        best = min(ok, key=lambda r: r["bytes"])
        end = (f" ({best['latency_ms'] / model['fp32_latency_end_ms']:.2f}x vs fp32's end-of-run timing)"
               if drifted(model, fp32) else "")
        parts.append(f"{fam}: `{best['variant']}`, {best['bytes'] / MB:.2f} MB = {best['bytes'] / fp32['bytes']:.2f}x "
                     f"size, {best['latency_ms'] / fp32['latency_ms']:.2f}x batch-1 latency{end}, metric {best['metric']:.4f}")
    sign = ">=" if higher else "<="
    return (f"**Smallest within {LOSS:.0%} of fp32's task metric** ({'higher' if higher else 'lower'} is better: "
            f"metric {sign} {bound:.4f}): " + "; ".join(parts) + ".")


def plot_rd(model: dict[str, Any], path: Path) -> None:
    """Rate-distortion plot: size on disk vs task metric, one line per selector across its uniform budgets."""
    import matplotlib  # noqa: PLC0415 (only the report needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in model["rows"] if not r.get("error")]
    fp32 = next(r for r in rows if r["variant"] == "fp32")
    higher = get_task(model["task"]).higher_is_better
    fig, ax = plt.subplots(figsize=(8, 5))
    base = fp32["metric"]
    low, high = (base * (1 - LOSS), base) if higher else (base, base * (1 + LOSS))
    ax.axhspan(low, high, color="0.9", label=f"within {LOSS:.0%} of fp32")
    ax.plot(fp32["bytes"] / MB, base, "k*", markersize=14, label="fp32", zorder=3)
    ort_rows = [r for r in rows if family(r["variant"]) == "onnxruntime"]
    for r, marker in zip(ort_rows, "sDv^<>ph", strict=False):
        ax.plot(r["bytes"] / MB, r["metric"], marker, color="0.35", markersize=7, linestyle="none",
                label=f"ort {r['variant']}", zorder=3)
    styles = dict(zip(SELECTOR_KINDS, zip(plt.get_cmap("tab10").colors, ["o-", "s--", "^-.", "v:"]), strict=False))
    for selector, (color, style) in styles.items():
        uniform = sorted((r for r in rows if r.get("selector") == selector and r["budget"].startswith("keep")),
                         key=lambda r: r["bytes"])
        if uniform:
            ax.plot([r["bytes"] / MB for r in uniform], [r["metric"] for r in uniform], style, color=color,
                    fillstyle="none", markersize=8, label=f"{selector} (keep)", zorder=4)
            for r in uniform:
                ax.annotate(r["budget"].removeprefix("keep"), (r["bytes"] / MB, r["metric"]), fontsize=7,
                            color=color, xytext=(4, 4), textcoords="offset points")
        for r in (r for r in rows if r.get("selector") == selector and r["budget"].startswith("size")):
            ax.plot(r["bytes"] / MB, r["metric"], "P", color=color, markersize=11, markeredgecolor="k",
                    label=f"{selector} {r['budget']}", zorder=5)
    lines: dict[str, list[dict[str, Any]]] = {}  # hyper-<codebook>[-gG]-b<B> rows: one line per codec across B
    for r in rows:
        match = HYPER_NAME.fullmatch(r["variant"])
        if match and match["bits"] and not match["moment"]:
            lines.setdefault(r["hyper_variant"], []).append(r)
    for (codec, members), style in zip(sorted(lines.items()), ["o-", "s--", "^-.", "v:", "D-"], strict=False):
        members.sort(key=lambda r: r["bytes"])
        ax.plot([r["bytes"] / MB for r in members], [r["metric"] for r in members], style, fillstyle="none",
                markersize=8, label=f"hyper {codec} (bits per pair)", zorder=4)
        for r in members:
            ax.annotate(HYPER_NAME.fullmatch(r["variant"])["bits"], (r["bytes"] / MB, r["metric"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    drawn = {r["variant"] for members in lines.values() for r in members}
    for r in (r for r in rows if family(r["variant"]) == "symshrink" and "selector" not in r and r["variant"] not in drawn):
        ax.plot(r["bytes"] / MB, r["metric"], "x", markersize=8, label=r["variant"], zorder=4)
    if not higher:
        ax.set_yscale("log")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"{model['task']} ({'higher' if higher else 'lower'} is better)")
    ax.set_title(f"{model['model']}: size vs task metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moment_section(result: dict[str, Any]) -> list[str]:
    """Machine, commands and conventions of the runs that built moment-<selector>-<budget> variants."""
    models = [m for m in result["models"] if any("selector" in r for r in m.get("rows", []))]
    if not models:
        return []
    m = result["machine"]
    runs = list({model["run"]["command"]: model["run"] for model in models}.values())
    return [
        "## Moment reduction: selectors and budgets", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), onnxruntime {m['onnxruntime']}. Commands:",
        "", *[f"- `{r['command']}` ({r['date']}, {r['wall_s'] / 60:.1f} min)" for r in runs], "",
        "symshrink rows are `moment-<selector>-<budget>`. Selectors: `select` (pivoted QR on the calibration "
        "moments + ridge refit of the consumer, the default), `recombine` (Caratheodory moment matching), `fold` "
        "(data-free k-means merge of units; does not rewrite attention heads), `magnitude` (keep the largest units, "
        "no refit: the pruning baseline). Budgets: `keepF` keeps the fraction F of every group (uniform); `sizeF` "
        "is `--target-size F` (the global allocator picks each group's width by marginal error per byte for a "
        "file of F times fp32's size); `size@keepF` is a size target equal to the bytes of the same selector's "
        "`keepF` row, i.e. global vs uniform allocation at equal size. Groups rewritten: FFN, SwiGLU, conv "
        "channels, attention heads (multi-head only: smollm2's grouped-query heads are left as they are). "
        "**kept/group**: min-max over the rewritten groups of kept width / width; **build s**: wall time to "
        "build the variant (for symshrink rows the whole compress: calibration, fit, verify, save). Each "
        "model's plot: x = size on disk, y = task metric, one line per selector across its `keep` budgets, "
        f"plus symbols for size targets, onnxruntime's quantizers and fp32; the grey band is within {LOSS:.0%} "
        "of fp32's metric.", "",
    ]


# the explanation of each family of rows, shown when a run built one: (the key its rows carry, title, text)
ROW_SECTIONS = [
    ("ternary", "Ternary rows",
        "`ternary-<block>-<correction>` rows: every MatMul/Gemm weight of at least 4096 elements becomes 2-bit "
        "codes t+1 (t in {-1, 0, 1}) behind `DequantizeLinear(uint2, zero point 1)` at opset 25, which onnxruntime "
        "fuses into its 2-bit `MatMulNBits` (accuracy_level 4: int8 activations). `<block>`: input rows per scale "
        "(b32, b64, b128, b256) or one scale per output column (`channel`, which onnxruntime expands to blocks of 32 "
        "in memory). `<correction>`: the per-unit scale and bias fitted on the calibration moments: `lstsq` (least "
        "squares of the original pre-activation), `moments` (keep its mean and variance), `none` (the optimal ternary "
        "threshold and scale only). `-max<E>`: `--max-error E`: layers, smallest calibrated ternary error first, "
        "become ternary as long as the held-out error stays within E; the others get 8 bits. "
        "`moment-<selector>-keep<F>+ternary-...`: `--method moment,ternary`, moment reduction first. Weights that "
        "are not MatMul/Gemm constants (embedding tables, convolutions) stay fp32. **batch-32** timings repeat the "
        "latency feed's first row 32 times."),
    ("quant", "Integer-grid rows",
        "`quant-<block>-<bits>` rows (`symshrink compress --method quant`): every MatMul/Gemm weight, 1x1 Conv "
        "(stride 1, no pads, one group) and Gather table of at least 4096 elements on a grid of 8, 4 or 2 bits per "
        "output column and block of input rows (`<block>`: b16 to b256, or `channel`; a conv's block the largest "
        "power of two up to it that divides its input channels), symmetric (`-zp`: with zero points), rounded with "
        "error feedback on the calibration second moment of the layer's input (a conv's: of its patches) in "
        "act-order (`-inorder`: in stored order; `-nearest`: to nearest). Products are written as onnxruntime's "
        "`MatMulNBits` (a 1x1 Conv between two Transposes, over the channels of every pixel), tables as "
        "`GatherBlockQuantized`, a tied LM head as MatMulNBits over its table's codes. `-e<E>`: per layer the "
        "fewest bits within relative output error E on the calibration moments (`--layer-error`). `-dq`: the other "
        "convs (kxk, strided, grouped) too, as `DequantizeLinear -> Conv` (`--dequantize-convs`: smaller on disk, "
        "slower in onnxruntime); without it they stay fp32."),
    ("alloc", "Allocator rows",
        "`alloc-c<C>` / `alloc-e<E>` rows: `symshrink compress` with no `--method` (`--min-cosine C` / `--max-error E`; "
        "`alloc-c0.99` is the default run): per weight site (MatMul/Gemm and Gather table of at least 1024 elements, 1x1 "
        "Conv of at least 4096) one of the integer grids of 8, 4 or 2 bits at 32, 64 or 128 input rows per scale "
        "(symmetric, "
        "second-moment rounding in act-order, written as the quant rows are) or fp32, chosen by the Lagrangian "
        "allocator: predicted errors calibrated per kind of site and width (4, 2 bits) by one trial each, then bisection "
        "over the multiplier, "
        "each plan verified on the held-out calibration feeds, the fewest-bytes plan within the budget. `alloc-s<F>`: "
        "`--method quant --target-size F`, the least distorted plan within F of fp32's size. Blocks of 256 rows are "
        "offered for tables only (onnxruntime's MatMulNBits runs them 3-6x slower) unless `-b256` (`--block-size 256`)."),
    ("hyper_variant", "Hyperfunction rows",
        "`hyper-<codebook>[-g<G>]-b<B>` rows: every float32 weight tensor of at least 4096 elements that the graph "
        "reads as a weight (MatMul/Gemm B, Conv W, Gather tables, tied or not) becomes indices of B bits per pair of "
        "weights into a fixed codebook, decoded by the `ai.symshrink.HyperDecode` function (stock ops; onnxruntime "
        "constant-folds it at session creation, so the file is small and the memory and speed are fp32's). "
        "`lattice`: the Hyper-Compression v3 codebook (sheared lattice, radial bands; per tensor the band count "
        "K in 0-3 and square side of 3, 4 or 6 RMS deviations of least error at B bits). `winding`: the paper's v1 "
        "codebook over the tensor's range. `grid`: round-to-nearest in the same format at the same B bits per pair "
        "(floor(2^(B/2)) levels per weight) over the tensor's full range or clipped to 4, 6, 8 or 12 RMS deviations, "
        "whichever has the least error: the baseline at equal bits; `-g64`: one centre and span per group of 64 "
        "weights (1.5 more bits per weight of side information, counted: g64-b5, b7, b9 are at the bits per weight "
        "of b8, b10, b12). `-e<E>`: per tensor the fewest bits (4-13 per pair) whose relative weight error is "
        "within E. `moment-...+hyper-...`: `--method moment,hyper`. **bits/w**: bits per coded weight, index and "
        "per-tensor side information included; the codebook tables, shared by every tensor of the same size, are "
        "in the file size. **load s**: session creation time (where the decode is folded)."),
]


def row_sections(result: dict[str, Any]) -> list[str]:
    """What the ternary, integer-grid and hyperfunction rows are, for the families this run built."""
    rows = [r for model in result["models"] for r in model.get("rows", [])]
    return [line for key, title, text in ROW_SECTIONS if any(key in r for r in rows) for line in (f"## {title}", "", text, "")]


def other_outputs(model: dict[str, Any]) -> list[str]:
    """The cosine against fp32 of each output besides the primary one (MobileNetV2's pooled features), per row."""
    rows = [r for r in model["rows"] if not r.get("error")]
    names = [d["name"] for d in rows[0]["diffs"] if d["name"] != model["primary_output"]] if rows else []
    if not names:
        return []
    cells = [f"{r['variant']} " + ", ".join(f"{d['cosine']:.4f}" for d in r["diffs"] if d["name"] in names)
             for r in rows]
    return ["", f"Cosine against fp32 of the other outputs ({', '.join(names)}): " + "; ".join(cells) + "."]


def hyper_comparison(model: dict[str, Any]) -> list[str]:
    """HC against round-to-nearest at equal bits per pair: one table per model."""
    rows = [r for r in model["rows"] if "hyper_variant" in r and not r.get("error")]
    fp32 = next((r for r in model["rows"] if r["variant"] == "fp32" and not r.get("error")), None)
    if not rows or fp32 is None:
        return []
    lines = ["", "HC vs round-to-nearest (per tensor, per group of 64) at equal bits per pair:", "",
             "| variant | bits/w | size vs fp32 | max tensor error | rel L2 | task metric |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["hyper"]["bits_per_weight"], r["variant"])):
        h = r["hyper"]
        lines.append(f"| {r['variant']} | {h['bits_per_weight']:.2f} | {r['bytes'] / fp32['bytes']:.3f}x "
                     f"| {_fmt(h['max_tensor_error'], '.4f')} | {r['rel_l2']:.4f} | {r['metric']:.4f} |")
    return lines


def render_markdown(result: dict[str, Any], images: dict[str, str]) -> str:
    """The report; `images` maps a model to its plot's path relative to the report."""
    m, a = result["machine"], result["args"]
    runs = list({model["run"]["command"]: model["run"] for model in result["models"]}.values())
    lines = [
        "# Benchmarks: symshrink vs onnxruntime's quantizers", "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])})",
        f"- onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, python {m['python']}",
        *[f"- run: `{r['command']}` (commit {r['commit']}, {r['date']}, {r['wall_s'] / 60:.1f} min, load "
          f"average {r['loadavg_start']:.1f} at start, {r['loadavg_end']:.1f} at end)" for r in runs], "",
        "Sizes are bytes on disk including external data; MB = 10^6 bytes. **RSS** is the growth of peak "
        "resident memory (VmHWM) while creating the session, in a fresh subprocess (the JSON also has the "
        "growth after the first run). **Latency** is the median of at least --min-runs runs lasting at least "
        "--min-seconds (30 and 3 s unless the model's command says otherwise) of one feed with intra_op_num_threads="
        f"{a['threads']}, each variant in its own block after a {a['pause']:g} s pause; fp32 is timed in "
        "the same process, first and again at the end (drift check). **rel L2 / cosine** compare the "
        "primary output with fp32's on the zoo data set's eval split. int8-dynamic quantizes MatMul only "
        "(per-channel, reduce_range=True: the defaults also turn Gather/Conv into slow integer ops, see "
        f"shared/docs/baselines.md). MatMulNBits variants: block {NBITS_BLOCK}, symmetric, accuracy_level "
        f"{ACCURACY_LEVEL}. symshrink rows: `symshrink.pipeline.compress` with the zoo's default "
        "calibration data (moment reduction; rows named symshrink-moment-keepF come from an earlier version of "
        "this script, keep F of each group with the default selector).", "",
    ]
    if any(max(r["loadavg_start"], r["loadavg_end"]) > m["cores"] for r in runs):
        lines += ["**Warning:** the load average exceeded the core count during a run (other jobs shared the "
                  "machine): latencies are inflated and noisy; compare each model's first and final fp32 "
                  "timing, and trust ratios more than absolute milliseconds.", ""]
    lines += moment_section(result)
    lines += row_sections(result)
    for model in result["models"]:
        lines.append(f"## {model['model']}")
        lines.append("")
        if model.get("note"):
            lines += [f"**Note:** {model['note']}", ""]
        if "error" in model:
            lines += [f"Failed: {model['error']}", ""]
            continue
        feed = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in model["latency_feed"].items())
        source = f"`{model['package']}`" + (f", file `{model['source']}`" if model["override"] else "")
        lines.append(f"Model from {source}. Task `{model['task']}` (fp32 reference in shared/docs/models.md: "
                     f"{model['reference_metric']}); error on output `{model['primary_output']}` over "
                     f"{model['eval_samples']} eval samples of `{model['calib']}`; latency feed {feed}; "
                     f"fp32 latency at the end of the run {model['fp32_latency_end_ms']:.2f} ms.")
        fp32 = next((r for r in model["rows"] if r["variant"] == "fp32" and not r.get("error")), {})
        if fp32 and drifted(model, fp32):
            lines += ["", f"**Latency drift:** fp32 took {fp32['latency_ms']:.2f} ms when timed first and "
                      f"{model['fp32_latency_end_ms']:.2f} ms at the end of the run (the machine's load changed during "
                      "the run): this model's latencies and latency ratios are unreliable."]
        batch = "latency_b32_ms" in fp32
        lines += ["", "| variant | size MB | size vs fp32 | RSS MB | load s | latency ms | latency vs fp32 "
                  + ("| batch-32 ms | batch-32 vs fp32 " if batch else "") + "| rel L2 "
                  "| cosine | task metric | kept/group | build s |",
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if batch else "") + "---:|---:|---:|---:|---:|"]
        notes = []
        for r in model["rows"]:
            if r.get("error"):
                notes.append(f"- {r['variant']}: {r['error']}")
                empty = "| | " if batch else ""
                lines.append(f"| {r['variant']} | n/a | | | | | | {empty}| | | | | {r['build_s']:.1f} |")
                continue
            size = r["bytes"] / fp32["bytes"] if fp32 else None
            speed = r["latency_ms"] / fp32["latency_ms"] if fp32 else None
            batch_cells = ""
            if batch:
                ratio = r["latency_b32_ms"] / fp32["latency_b32_ms"]
                batch_cells = f"| {r['latency_b32_ms']:.2f} | {ratio:.2f}x "
            lines.append(f"| {r['variant']} | {r['bytes'] / MB:.2f} | {_fmt(size, '.2f')}x "
                         f"| {r['rss_mb']:.1f} | {_fmt(r.get('session_s'), '.2f')} | {r['latency_ms']:.2f} "
                         f"| {_fmt(speed, '.2f')}x {batch_cells}"
                         f"| {r['rel_l2']:.4f} | {r['cosine']:.4f} | {r['metric']:.4f} | {kept_range(r)} "
                         f"| {r['build_s']:.1f} |")
        if notes:
            lines += ["", "Not available:", *notes]
        lines += other_outputs(model)
        lines += hyper_comparison(model)
        lines += ["", near_lossless(model)]
        if model["model"] in images:
            lines += ["", f"![{model['model']}: size on disk vs task metric]({images[model['model']]})"]
        lines.append("")
    return "\n".join(lines)


def plot_prefix(out: Path) -> str:
    """Plot names: img/rd-<model>.png beside docs/benchmarks.md, img/<report name>-<model>.png beside others."""
    return "rd" if out.stem == "benchmarks" else out.stem


def write_report(result: dict[str, Any], out: Path) -> None:
    """The markdown report at `out` and each model's plot at img/<plot_prefix>-<model>.png beside it."""
    images = {}
    for model in result["models"]:
        if "error" in model or not any(r["variant"] == "fp32" and not r.get("error") for r in model["rows"]):
            continue
        image = Path("img") / f"{plot_prefix(out)}-{model['model']}.png"
        plot_rd(model, out.parent / image)
        images[model["model"]] = image.as_posix()
    out.write_text(render_markdown(result, images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-mlp", "minilm-l3", "ppocr-rec"])
    ap.add_argument("--selectors", nargs="*", default=["select"], choices=list(SELECTOR_KINDS),
                    help="moment-reduction selectors, each built at every --budgets entry")
    ap.add_argument("--budgets", nargs="*", type=budget_name, default=["keep0.75", "keep0.5"],
                    help="keep<F> (uniform), size<F> (global, F of fp32's size) or size@<budget> (global, to the "
                         "size of the same selector's <budget> variant)")
    ap.add_argument("--moment", nargs="*", type=moment_name, default=[], metavar="moment-SELECTOR-BUDGET",
                    help="more symshrink variants, e.g. moment-select-size@keep0.5")
    ap.add_argument("--ternary", nargs="*", type=ternary_name, default=[],
                    metavar="[moment-SELECTOR-keepF+]ternary-BLOCK-CORRECTION",
                    help="symshrink ternary variants, e.g. ternary-b64-lstsq, moment-select-keep0.5+ternary-channel-moments")
    ap.add_argument("--hyper", nargs="*", type=hyper_name, default=[],
                    metavar="[moment-SELECTOR-keepF+]hyper-CODEBOOK[-gG]-<bB|eE>",
                    help="symshrink hyperfunction variants, e.g. hyper-lattice-b10 hyper-grid-b10 hyper-grid-g64-b10 "
                         "hyper-lattice-e0.05 moment-select-keep0.5+hyper-lattice-b10")
    ap.add_argument("--quant", nargs="*", type=quant_name, default=[], metavar="[moment-SELECTOR-keepF+]quant-BLOCK-BITS",
                    help="symshrink integer-grid variants, e.g. quant-b32-4 quant-b64-2 quant-b64-2-nearest")
    ap.add_argument("--alloc", nargs="*", type=alloc_name, default=[], metavar="[moment-SELECTOR-keepF+]alloc-<cC|eE|sF>",
                    help="symshrink allocator variants, e.g. alloc-c0.99 alloc-e0.1 alloc-s0.1")
    ap.add_argument("--batch32", action="store_true",
                    help=f"also time a batch of {BATCH} (the latency feed's first row repeated)")
    ap.add_argument("--variants", nargs="+", default=ORT_VARIANTS, choices=ORT_VARIANTS + OPTIONAL_VARIANTS,
                    help="onnxruntime variants to build (fp32 is always measured)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--json", type=Path, help="raw numbers (default: --out with .json)")
    ap.add_argument("--onnx", nargs="*", default=[], metavar="MODEL=PATH",
                    help="use this .onnx instead of materialising the zoo model (zoo data and task apply)")
    ap.add_argument("--samples", type=int, default=32, help="eval samples for the output error")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of rest before each timing block")
    ap.add_argument("--min-runs", type=int, default=30)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--note", help="a remark printed under the heading of each model of this run")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models already in the JSON file (rerun some models only)")
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from the JSON file, measure nothing")
    ap.add_argument("--work", type=Path, help="keep built variants here (default: a temporary folder)")
    args = ap.parse_args()
    args.onnx = dict(item.split("=", 1) for item in args.onnx)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)

    json_path = args.json or args.out.with_suffix(".json")
    if importlib.util.find_spec("matplotlib") is None:  # say so now, not after the measurements
        sys.exit("tools/bench.py draws its plots with matplotlib: pip install 'symshrink[bench]' (./setup.sh zoo bench)")
    if args.render_only:
        write_report(json.loads(json_path.read_text()), args.out)
        return
    moments = list(dict.fromkeys([f"moment-{s}-{b}" for s in args.selectors for b in args.budgets] + args.moment
                                 + args.ternary + args.hyper + args.quant + args.alloc))
    start = time.perf_counter()
    machine = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="symshrink-bench-"))
    models = []
    try:
        for spec in args.models:
            log.info("model %s", spec)
            try:
                models.append(bench_model(spec, moments, args.variants, args, work))
            except Exception as err:  # noqa: BLE001 (a broken zoo entry is reported, not fatal)
                log.error("%s: %s", spec, one_line(err))
                models.append({"model": spec, "error": one_line(err)})
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()[0]
    argv0 = os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0]
    command = "python " + " ".join(shlex.quote(a) for a in [argv0, *sys.argv[1:]])
    run = {"command": command, "commit": machine["commit"], "date": machine["date"],
           "wall_s": time.perf_counter() - start, "loadavg_start": machine["loadavg_start"],
           "loadavg_end": machine["loadavg_end"]}
    for model in models:
        model["run"] = run
        if args.note:
            model["note"] = args.note
    if args.merge and json_path.is_file():  # keep the other models of an earlier run
        done = {m["model"] for m in models}
        models = [m for m in json.loads(json_path.read_text())["models"] if m["model"] not in done] + models
    result = {"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "models": models}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_report(result, args.out)
    log.info("wrote %s and %s in %.1f min", args.out, json_path, run["wall_s"] / 60)


if __name__ == "__main__":
    main()
