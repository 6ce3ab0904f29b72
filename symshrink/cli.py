"""Command line: `symshrink zoo|inspect|compress|diff|run|eval`.

Exit codes: 0 ok, 1 outside tolerance, 2 bad input, 3 internal error. Expected failures print one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import typing

from symshrink import __version__
from symshrink.errors import BadInput, OutsideTolerance, SymshrinkError, write_failure
from symshrink.options import (
    CODEBOOKS,
    CORRECTIONS,
    DEFAULT_MIN_COSINE,
    LAYOUTS,
    SELECTORS,
    STORAGES,
    CompressOptions,
    HyperOptions,
    MomentOptions,
    QuantOptions,
    TernaryOptions,
    WeightOptions,
)
from symshrink.passes.quant.grid import ROUNDINGS
from symshrink.runtime.backend import ENGINES
from symshrink.runtime.formats import GRID_BITS

__all__ = ["main", "compress_options"]

ENGINE_HELP = ("hybrid: onnxruntime runs the standard ops (its CUDA provider on cuda), the kernels the packed ones; "
               "executor: the node-by-node reference runtime; auto (default): hybrid where onnxruntime runs on the "
               "kernels' device, else the executor")


def _cmd_zoo(args: argparse.Namespace) -> int:
    from symshrink.models.registry import ZOO, cache_dir, get_model  # noqa: PLC0415

    if args.action == "list":
        _print(f"{'name':<14} {'params':>8} {'needs':<8} {'task':<18} {'fp32 ref':>8}  source")
        for m in ZOO.values():
            _print(f"{m.name:<14} {m.params:>8} {m.extra or 'core':<8} {m.task:<18} {m.reference_metric:>8.3f}  {m.source}")
        return 0
    if not args.name:
        raise BadInput("zoo get needs a model name")
    _print(get_model(args.name).materialise(cache_dir()))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from symshrink.modelio import load_model  # noqa: PLC0415
    from symshrink.passes.analysis.groups import analyse  # noqa: PLC0415

    model, path = load_model(args.model)
    groups = analyse(model)
    if args.json:
        _print(json.dumps({"model": str(path), "groups": [g.to_dict() for g in groups]}, indent=2))
        return 0
    _print(f"{path}: {sum(g.ok for g in groups)} symmetric groups, {sum(not g.ok for g in groups)} rejected candidates")
    _print(f"{'group':<10} {'kind':<7} {'width':>6} {'params':>10}  {'status':<44} where")
    for g in groups:
        if g.ok or args.all:
            extra = f" (kv heads {g.detail['kv_heads']}, dim {g.detail['head_dim']})" if g.kind == "heads" else ""
            status = "ok" + extra if g.ok else "skip: " + g.reason
            _print(f"{g.name:<10} {g.kind:<7} {g.width:>6} {g.params:>10}  {status:<44} {g.where}")
    if not args.all and any(not g.ok for g in groups):
        _print("(rejected candidates hidden: --all shows them with the reason)")
    return 0


def _number(text: str, flag: str, kind: type = float) -> float:
    try:
        return kind(text)
    except ValueError:
        raise BadInput(f"{flag} takes a number, not {text!r}") from None


def _ints(text: str | None, flag: str) -> tuple[int, ...]:
    """Comma-separated integers ('' or None: none)."""
    return tuple(int(_number(v, flag, int)) for v in (text or "").split(",") if v.strip())


def _width_rule(text: str | None) -> float | None:
    """'sqrt:C' -> C, for k = ceil(C sqrt(d))."""
    if text is None:
        return None
    match = re.fullmatch(r"sqrt:([0-9]*\.?[0-9]+)", text.strip())
    if not match or float(match.group(1)) <= 0:
        raise BadInput(f"--width-rule must look like sqrt:C with C > 0, got {text!r}")
    return float(match.group(1))


def _bytes(text: str, flag: str) -> int:
    """A number of bytes with an optional kB/MB/GB."""
    size = _size(text) if re.fullmatch(r"\s*[0-9]*\.?[0-9]+\s*[kMG]?B?\s*", text) else None
    if not isinstance(size, int) or size <= 0:
        raise BadInput(f"{flag} must be a number of bytes (e.g. 256MB), got {text!r}")
    return size


def _block_bytes(text: str | None) -> dict[str, int]:
    """--block-bytes as an option (none given: the options' default)."""
    return {} if text is None else {"block_bytes": _bytes(text, "--block-bytes")}


def _size(text: str | None) -> int | float | None:
    """A target file size: a fraction of the current size (0 < f < 1, a float) or bytes with an optional
    kB/MB/GB (an int)."""
    if text is None:
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kMG]?B)?", text.strip())
    if not match:
        raise BadInput(f"--target-size must be bytes (e.g. 30MB) or a fraction (e.g. 0.5), got {text!r}")
    number, unit = float(match.group(1)), match.group(2)
    if unit is None and 0 < number < 1:
        return number
    return int(number * {None: 1, "B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def _block(text: str) -> int | None:
    """--block-size: a number of input rows, or 'channel' (one scale per output column)."""
    return None if text == "channel" else int(_number(text, "--block-size", int))


def compress_options(args: argparse.Namespace) -> CompressOptions:
    """The typed options of `symshrink compress`, parsed from the command line's strings (here only)."""
    moment = MomentOptions(selector=args.selector, keep=args.keep, width=args.width, sqrt_c=_width_rule(args.width_rule),
                           target_size=_size(args.target_size), ridge=args.ridge, plan=args.plan)
    weights = WeightOptions(block=_block(args.block_size), layer_error=args.layer_error, exclude=tuple(args.exclude),
                            rounding=args.rounding)
    ternary = TernaryOptions(correction=args.correction, activations=args.activations, storage=args.storage)
    group = None if args.group_size == "tensor" else int(_number(args.group_size, "--group-size", int))
    hyper = HyperOptions(codebook=args.codebook, tensor_error=args.tensor_error, side=args.side, group_size=group,
                         index_bits=_ints(args.index_bits, "--index-bits"), codes=_ints(args.codes, "--codes"),
                         bands=_ints(args.bands, "--bands"), code_dims=args.code_dims)
    quant = QuantOptions(bits=args.bits, zero_points=args.zero_points, act_order=args.act_order,
                         dequantize_convs=args.dequantize_convs)
    return CompressOptions(method=args.method, moment=moment, weights=weights, ternary=ternary,
                           quant=quant, hyper=hyper, calib=args.calib,
                           calib_samples=args.calib_samples, calib_layout=args.calib_layout,
                           random_calib=args.random_calib, plan_out=args.plan_out, max_error=args.max_error,
                           min_cosine=args.min_cosine, max_loss=args.max_loss, task=args.task, threads=args.threads,
                           stream=args.stream, cluster=args.cluster, **_block_bytes(args.block_bytes),
                           progress=not args.quiet and not args.json)


def _cmd_compress(args: argparse.Namespace) -> int:
    from symshrink.pipeline import compress  # noqa: PLC0415
    from symshrink.runtime.diff import format_diffs  # noqa: PLC0415

    report = compress(args.model, args.output, compress_options(args), force=args.force, report_path=args.report)
    if args.json:
        _print(json.dumps(report.to_dict(), indent=2))
        return 0
    for plan in report.plans().values():
        _print(plan)
    _print(f"verified on {report.holdout_feeds} held-out calibration feeds:")
    _print(format_diffs(report.diffs))
    _print(f"wrote {report.output}: {report.size_line()}{report.task_text()}")
    return 0


def _floats(text: str, flag: str) -> tuple[float, ...]:
    return tuple(_number(v, flag) for v in text.split(",") if v.strip())


def _cmd_sweep(args: argparse.Namespace) -> int:
    from symshrink.baselines import BASELINES  # noqa: PLC0415
    from symshrink.models.registry import ZOO  # noqa: PLC0415
    from symshrink.sweep import DEFAULT_COSINES, points_table, sweep  # noqa: PLC0415

    options = CompressOptions(calib=args.calib, calib_samples=args.calib_samples, random_calib=args.random_calib,
                              threads=args.threads, progress=not args.quiet)
    task = args.task or (ZOO[args.model].task if args.model in ZOO and not args.no_task else None)
    baselines = () if args.no_baselines else BASELINES if args.baselines is None else \
        tuple(b for b in args.baselines.split(",") if b.strip())
    cosines = DEFAULT_COSINES if args.cosines is None else _floats(args.cosines, "--cosines")
    points = sweep(args.model, args.output, options, cosines, baselines, task, args.force, plot=not args.no_plot)
    _print(points_table(points, points[0].bytes, task))
    _print(f"wrote {args.output}/sweep.md, sweep.json{'' if args.no_plot else ', sweep.png'} and one .onnx a point")
    return 0


def _feeds(args: argparse.Namespace, model_spec: str, inputs) -> list:
    """Feeds from --data, the zoo model's default data set, or --random."""
    from symshrink.calibration.feeds import load_feeds, random_feeds  # noqa: PLC0415
    from symshrink.pipeline import default_calib  # noqa: PLC0415

    data = args.data or (None if args.random else default_calib(model_spec))  # --random wins, as --random-calib
    if data is None and not args.random:
        raise BadInput("give --data (zoo data set, .npz or folder of .npy) or --random")
    if data is None:
        return random_feeds(inputs, args.samples or 8)
    return load_feeds(data, inputs, "eval", args.samples, args.data_layout)


def _cmd_diff(args: argparse.Namespace) -> int:
    from symshrink.modelio import load_model  # noqa: PLC0415
    from symshrink.runtime.diff import compare_outputs, format_diffs, gate_failures  # noqa: PLC0415
    from symshrink.runtime.ort import input_specs, make_session, run_all  # noqa: PLC0415

    backend = _backend(args.device) if args.device else None  # no GPU: say so before loading anything
    _, path_a = load_model(args.a)
    model_b, path_b = load_model(args.b)
    session_a = make_session(path_a, args.threads)
    inputs = input_specs(session_a)
    names = [o.name for o in session_a.get_outputs()]
    if backend is None:
        session_b = make_session(path_b, args.threads)
        inputs_b, names_b = [i.name for i in input_specs(session_b)], [o.name for o in session_b.get_outputs()]
    else:
        from symshrink.runtime.hybrid import open_runtime  # noqa: PLC0415

        executor = open_runtime(model_b, backend, args.engine, args.threads)
        inputs_b, names_b = [i.name for i in executor.input_specs()], executor.output_names()
    if [i.name for i in inputs] != inputs_b:
        raise BadInput("the two models have different inputs")
    if names != names_b:
        raise BadInput("the two models have different outputs")
    feeds = _feeds(args, args.a, inputs)
    outputs_b = run_all(session_b, feeds) if backend is None else [executor.run(feed) for feed in feeds]
    if backend is not None and not args.json:
        _print(f"{args.b} on the symshrink runtime: " + "; ".join(executor.summary().lines()))
    diffs = compare_outputs(run_all(session_a, feeds), outputs_b)
    if args.json:
        _print(json.dumps([d.to_dict() for d in diffs], indent=2))
    else:
        _print(format_diffs(diffs))
    failures = gate_failures(diffs, args.max_error, args.min_cosine)
    if failures:
        raise OutsideTolerance("outside tolerance: " + "; ".join(failures))
    return 0


def _backend(device: str):
    from symshrink.runtime.backend import get_backend  # noqa: PLC0415

    return get_backend(device)


def _cmd_run(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from symshrink.modelio import claim_output, input_files, load_model, resolve_model, write_atomically  # noqa: PLC0415
    from symshrink.runtime.hybrid import open_runtime  # noqa: PLC0415

    backend = _backend(args.device)
    if args.output:
        model_path = resolve_model(args.model)
        inputs = input_files(model_path) if model_path.is_file() else []
        if args.data:
            inputs += input_files(args.data)
        args.output = claim_output(args.output, force=args.force, inputs=inputs, what="-o")
    model, _ = load_model(args.model)
    executor = open_runtime(model, backend, args.engine)
    feeds = _feeds(args, args.model, executor.input_specs())
    results, seconds = [], []
    for feed in feeds:
        start = time.perf_counter()
        results.append(executor.run(feed))  # outputs come back to the host: the device has finished
        seconds.append(time.perf_counter() - start)
    memory = backend.memory_line()  # after the runs: the pool has reserved the peak
    for line in [*executor.summary().lines(), *([memory] if memory else [])]:
        _print(line)
    _print(f"{len(feeds)} feeds; latency per feed: median {1e3 * float(np.median(seconds)):.2f} ms "
          f"(first {1e3 * seconds[0]:.2f} ms)")
    for name in executor.output_names():
        first = results[0][name]
        _print(f"  {name}: {first.dtype} {list(first.shape)}")
    if args.output:
        arrays = {}
        for name in executor.output_names():
            values = [r[name] for r in results]
            if all(v.ndim and v.shape[1:] == values[0].shape[1:] for v in values):
                arrays[name] = np.concatenate(values)
            else:
                arrays.update({f"{name}.{i}": v for i, v in enumerate(values)})
        write_atomically(args.output, lambda handle: np.savez(handle, **arrays))
        _print(f"wrote {args.output}: {', '.join(arrays)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from symshrink.modelio import load_model  # noqa: PLC0415
    from symshrink.models.registry import ZOO, get_task  # noqa: PLC0415
    from symshrink.runtime.ort import make_session  # noqa: PLC0415

    _, path = load_model(args.model)
    task_name = args.task or (ZOO[args.model].task if args.model in ZOO else None)
    if task_name is None:
        raise BadInput("give --task NAME")
    task = get_task(task_name)
    value = task.evaluate(make_session(path, args.threads))
    _print(json.dumps({"model": str(path), "task": task.name, "value": value}) if args.json else f"{task.name}: {value:.4f}")
    return 0


def _add_gate_args(parser: argparse.ArgumentParser) -> None:
    """The tolerance flags shared by compress and diff (same meaning, same gate)."""
    parser.add_argument("--max-error", type=float, help="max relative L2 error per output")
    parser.add_argument("--min-cosine", type=float, help="min cosine per output")
    parser.add_argument("--threads", type=_count)


def _add_data_args(parser: argparse.ArgumentParser, random_help: str) -> None:
    """The feeds of diff and run: a data set or files (as --calib), or random inputs."""
    parser.add_argument("--data", help="zoo data set (eval split), .npz, folder of .npy, or folder of .npz runs")
    parser.add_argument("--data-layout", default="batch", choices=LAYOUTS, help="as compress's --calib-layout")
    parser.add_argument("--samples", type=_count)
    parser.add_argument("--random", action="store_true", help=random_help)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, as every other bad input (exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"symshrink: error: {message} (see `{self.prog} --help`)\n")


def _count(text: str) -> int:
    """A positive whole number (--threads, --samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a positive whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symshrink", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"symshrink {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="list or materialise real models")
    zoo.add_argument("action", choices=["list", "get"])
    zoo.add_argument("name", nargs="?")
    zoo.set_defaults(run=_cmd_zoo)

    inspect = sub.add_parser("inspect", help="show the permutation-symmetric groups of a model")
    inspect.add_argument("model", help="zoo name or .onnx path")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--all", action="store_true", help="also list rejected candidates and why")
    inspect.set_defaults(run=_cmd_inspect)

    comp = sub.add_parser("compress", help="rewrite a model smaller; verify; write atomically")
    comp.add_argument("model")
    comp.add_argument("-o", "--output", required=True, help="the compressed model (never the input; an existing "
                      "file is replaced only with --force)")
    comp.add_argument("--force", action="store_true", help="replace existing output files (-o, --plan-out, --report)")
    comp.add_argument("--report", help="write the report (plans, held-out errors, gate) to this .json or .md file, "
                      "also when the gate fails")
    comp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    comp.add_argument("--method",
                      help="moment (width reduction), ternary (2-bit weights), quant (8/4/2-bit integer grids), hyper "
                           "(hyperfunction codes), or several comma-separated, run in that order (moment,ternary; "
                           "moment,quant; moment,hyper). Default: moment when widths are given, else the allocator: per "
                           "weight the integer grid (8/4/2 bits, blocks of 32 to 128) or fp32 that gives the smallest "
                           f"model within --max-error / --min-cosine (default: cosine >= {DEFAULT_MIN_COSINE})")
    comp.add_argument("--selector", default="select", choices=SELECTORS,
                      help="select: pivoted QR + ridge refit (default); recombine: Caratheodory moment matching; "
                           "fold: data-free k-means merge; magnitude: pruning without refit (baseline)")
    widths = comp.add_argument_group("widths (one of these; --max-error alone is a budget too)")
    widths.add_argument("--keep", type=float, help="fraction of units kept in every group")
    widths.add_argument("--width", type=int, help="units kept in every group")
    widths.add_argument("--width-rule", help="sqrt:C keeps ceil(C sqrt(d)) of d units")
    widths.add_argument("--target-size", help="file size to reach: bytes (30MB) or a fraction (0.6); moment widths "
                                              "allocated across groups by error per byte saved (the default without "
                                              "--method), or with --method quant the least distorted grids that fit")
    weights = comp.add_argument_group("weight codes (ternary and quant)")
    weights.add_argument("--block-size", default="64",
                         help="input rows per scale: 16, 32, 64, 128, 256 or channel (default 64)")
    weights.add_argument("--layer-error", type=float,
                         help="per-layer budget on the relative output error on the calibration moments: ternary layers "
                              "over it get 8 bits, then stay fp32; quant takes the fewest bits within it")
    weights.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                         help="keep MatMul/Gemm/Conv/Gather nodes or weights whose name matches this fnmatch pattern fp32 "
                              "(repeatable)")
    weights.add_argument("--bits", type=int, choices=GRID_BITS,
                         help="quant: bits per weight of the integer grid of every layer (default 4; the gate only "
                              "verifies); Gather tables (embeddings) take the same grid through onnxruntime's "
                              "GatherBlockQuantized. Without --bits, with --max-error, --min-cosine or --target-size "
                              "(and no --layer-error), the allocator picks 8/4/2 bits at 32-128 rows per scale or fp32 "
                              "per layer: a plan within them on the held-out feeds, by bisection over its multiplier")
    weights.add_argument("--zero-points", action="store_true",
                         help="quant: a zero point per block, the grid over the block's range (default: symmetric "
                              "grids, no zero points stored)")
    weights.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                         help="quant: second-moment rounding takes the input rows in order of decreasing E[x_i^2], "
                              "each block's scales set first on the weights as given (the stored layout is unchanged; "
                              "default); --no-act-order: in stored order, each block's scales set on its error-fed rows")
    weights.add_argument("--dequantize-convs", action="store_true",
                         help="quant: code the convs MatMulNBits cannot run (kxk, grouped, strided) too, as "
                              "DequantizeLinear -> Conv: smaller on disk, no smaller in memory, and slower in "
                              "onnxruntime, whose CPU Conv then loses its prepacked kernels (default: they stay fp32)")
    weights.add_argument("--rounding", choices=ROUNDINGS,
                         help="feedback rounds each input row and feeds its error forward on the calibration second "
                              "moment E[x x^T] (GPTQ-class; the default of quant; hyper: pairs of a MatMul weight's "
                              "row to their codewords, one frame a tensor); nearest rounds each weight on its own (the "
                              "default of ternary, its optimal fit, and of hyper)")
    ternary = comp.add_argument_group("ternary")
    ternary.add_argument("--correction", default="lstsq", choices=CORRECTIONS,
                         help="per-unit scale and bias fitted on calibration data: least squares (default), "
                              "mean and variance match, or none")
    ternary.add_argument("--storage", default="dequantize", choices=STORAGES,
                         help="dequantize: 2-bit DequantizeLinear at opset 25, kept 2-bit in memory by onnxruntime "
                              "(default); function / function-base3: the ai.symshrink.TernaryMatMul function over "
                              "2-bit / base-3 (1.6-bit) bytes at any opset >= 10 (onnxruntime unpacks it to fp32 at load)")
    ternary.add_argument("--activations", default="relu", choices=["relu", "two-level"],
                         help="two-level: try the NTK-LC paper's quantized activation (ReLU's alpha1, alpha2, alpha3 at "
                              "the input's scale) on each ReLU after a weight, kept only within --max-error")
    hyper = comp.add_argument_group("hyper (hyperfunction codes)")
    hyper.add_argument("--codebook", default="lattice", choices=CODEBOOKS,
                       help="lattice: the official v3 sheared lattice with radial bands (default); winding: the paper's "
                            "v1 irrational winding; grid: round-to-nearest at the same bits (the comparison)")
    hyper.add_argument("--tensor-error", type=float, default=0.05,
                       help="per tensor: the fewest bits whose relative error ||W - W'|| / ||W|| is within this (0.05)")
    hyper.add_argument("--index-bits", default="4,5,6,7,8,9,10,11,12,13",
                       help="index widths (bits per pair of weights) to choose from, comma-separated; each is filled "
                            "with the largest codebook that fits (default 4 to 13: 2 to 6.5 bits per weight)")
    hyper.add_argument("--codes", help="codebook sizes n to choose from instead, comma-separated (grid: levels per weight)")
    hyper.add_argument("--bands", default="0,1,2,3", help="radial band counts K to choose from (lattice; default 0,1,2,3)")
    hyper.add_argument("--side", type=float, help="absolute side L of the codebook's square (the paper's setting); default: "
                                                  "per tensor the best of 3, 4 or 6 RMS deviations (lattice), of the "
                                                  "full range or 4, 6, 8, 12 RMS deviations (grid), the range (winding)")
    hyper.add_argument("--code-dims", type=int, default=2, choices=[2, 3],
                       help="weights per index: pairs (default), or triples with the winding codebook")
    hyper.add_argument("--group-size", default="tensor",
                       help="weights per centre and span: an even number, or tensor (default)")
    comp.add_argument("--calib", help="zoo data set, .npz (input -> array) or folder of <input>.npy")
    comp.add_argument("--calib-samples", type=int, help="rows (layout batch) or runs to read at most")
    comp.add_argument("--calib-layout", default="batch", choices=LAYOUTS,
                      help="batch (default): arrays of an .npz / .npy folder are split on axis 0; runs: their leading "
                           "axis indexes complete model runs (inputs that are scalars or not batched on axis 0). A "
                           "folder of .npz files is always one run per file")
    comp.add_argument("--random-calib", action="store_true", help="fit random inputs (warns; for smoke tests)")
    comp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                      help="block by block in bounded memory, weights read from disk when coded (--method quant with "
                           "--bits or --layer-error; default: on when the input passes 2 GB)")
    comp.add_argument("--cluster", metavar="ADDRESS",
                      help="with --stream, encode on a Dask cluster: a scheduler's address (tcp://host:8786) or local:N "
                           "for N local worker processes (pip install 'symshrink[cluster]')")
    comp.add_argument("--block-bytes", help="weights per block with --stream (bytes, kB, MB, GB; default 64 MiB)")
    comp.add_argument("--plan", help="replay a plan written by --plan-out")
    comp.add_argument("--plan-out", help="write the plan (with kept units) as JSON")
    _add_gate_args(comp)
    comp.add_argument("--max-loss", type=float, help="max relative loss of a task metric against the original's "
                      "(0.01: 1%%), measured on the task's own data in every allocation trial and at the end")
    comp.add_argument("--task", help="the task metric of --max-loss: a zoo task (default: a zoo model's own)")
    comp.add_argument("--ridge", type=float, default=1e-3, help="relative ridge of the consumer refit")
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    comp.set_defaults(run=_cmd_compress)

    sw = sub.add_parser("sweep", help="the rate-distortion curve of a model: the allocator at several budgets beside "
                                      "onnxruntime's quantizers, each a real model measured on held-out feeds")
    sw.add_argument("model")
    sw.add_argument("-o", "--output", required=True, help="a new folder: one .onnx a point, sweep.md/.json/.png")
    sw.add_argument("--force", action="store_true", help="write into an existing folder")
    sw.add_argument("--cosines", help="held-out cosine budgets, one allocator point each, comma-separated (default "
                                      "0.9, 0.95, 0.98, 0.99, 0.995, 0.999)")
    sw.add_argument("--baselines",
                    help="onnxruntime's quantizers to put beside them, comma-separated: int8-dynamic, int8-dynamic-all, "
                         "nbits8, nbits4-rtn-b32, nbits4-rtn-b32-gather, nbits4-kquant, nbits2 (default: int8-dynamic, "
                         "nbits8, nbits4-rtn-b32, nbits2)")
    sw.add_argument("--no-baselines", action="store_true")
    sw.add_argument("--task", help="a zoo task metric measured on every point (default: a zoo model's own)")
    sw.add_argument("--no-task", action="store_true", help="no task metric (faster)")
    sw.add_argument("--no-plot", action="store_true", help="no sweep.png (matplotlib not needed)")
    sw.add_argument("--calib", help="as compress's --calib")
    sw.add_argument("--calib-samples", type=int)
    sw.add_argument("--random-calib", action="store_true")
    sw.add_argument("--threads", type=_count)
    sw.add_argument("-q", "--quiet", action="store_true")
    sw.set_defaults(run=_cmd_sweep)

    diff = sub.add_parser("diff", help="compare two models' outputs; exit 1 outside tolerance")
    diff.add_argument("a")
    diff.add_argument("b")
    _add_data_args(diff, "compare on random inputs")
    diff.add_argument("--device", choices=["cpu", "cuda"],
                      help="run B on the symshrink runtime on this device (weights stay compressed; cuda: CuPy "
                           "kernels) instead of onnxruntime; A always runs in onnxruntime")
    diff.add_argument("--engine", choices=ENGINES, default="auto", help="with --device: " + ENGINE_HELP)
    _add_gate_args(diff)
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(run=_cmd_diff)

    run = sub.add_parser("run", help="run a model on the symshrink runtime (numpy on cpu, CuPy kernels on cuda)")
    run.add_argument("model")
    run.add_argument("--device", required=True, choices=["cpu", "cuda"],
                     help="cuda: the CuPy kernels on an NVIDIA GPU; cpu: the same graph in numpy (their references)")
    run.add_argument("--engine", choices=ENGINES, default="auto", help=ENGINE_HELP)
    _add_data_args(run, "run on random inputs")
    run.add_argument("-o", "--output", help="write the outputs to this .npz: each output concatenated over the feeds "
                     "(axis 0), or NAME.i for feed i where the feeds' shapes differ")
    run.add_argument("--force", action="store_true", help="replace an existing -o file")
    run.set_defaults(run=_cmd_run)

    ev = sub.add_parser("eval", help="task metric of a model")
    ev.add_argument("model")
    ev.add_argument("--task")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--threads", type=_count)
    ev.set_defaults(run=_cmd_eval)
    return parser


def _terminate(signum: int, _frame) -> None:
    """SIGTERM unwinds like an exception: staging folders and temporary files are removed on the way out."""
    raise SystemExit(128 + signum)


def _print(text: object = "") -> None:
    """print to stdout, flushed: a reader that went away (`| head`) silences the rest of the output, not the run
    (a diff outside tolerance still exits 1)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _stdout_closed()


def _stdout_closed() -> int:
    """The reader went away (`symshrink inspect m.onnx | head`): not an error. Point stdout at /dev/null so the
    interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (one line on stderr): its code, returned
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.run(args)
    except SymshrinkError as err:
        print(f"symshrink: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("symshrink: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except Exception as err:  # the contract: one line, never a traceback, unless --debug (re-raised then)
        # a write the disk refused (full, quota, size limit, read-only) outside the output's staging: exit 2
        failure = write_failure(err, getattr(err, "filename", None)
                                or f"a temporary file in {tempfile.gettempdir()} (TMPDIR) or the output")
        if failure is not None and not args.debug:
            print(f"symshrink: error: {failure}", file=sys.stderr)
            return failure.exit_code
        if args.debug:
            raise
        print(f"symshrink: internal error: {type(err).__name__}: {err} (rerun with --debug for details)", file=sys.stderr)
        return 3
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
