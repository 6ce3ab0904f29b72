"""Benchmark symshrink against onnxruntime's own quantizers on zoo models.

    python tools/bench.py --models minilm-l3 fmnist-mlp ppocr-rec --keeps 0.75 0.5 --out docs/benchmarks.md

For each model, in one process: build every variant into a work folder (fp32, int8 dynamic,
MatMulNBits 2/4/8-bit, k-quant, symshrink moment reduction per keep), then measure each variant on
its own: bytes on disk, peak RSS growth of creating a session (fresh subprocess, VmHWM), median
latency of one representative feed (each variant in its own block after a pause, fp32 in the same
process), output error vs fp32 on the zoo data set's eval split, and the zoo task metric.
Writes a markdown report and a JSON file with all raw numbers (same name, .json).
A variant that fails to build or run becomes a row with its one-line error; the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from symshrink.calib import load_feeds
from symshrink.modelio import model_bytes_on_disk, resolve_model
from symshrink.models.registry import ZooModel, get_model, get_task
from symshrink.runtime.diff import OutputDiff, compare_outputs
from symshrink.runtime.ort import input_specs, make_session, run_all

log = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6  # sizes and memory in decimal MB, as in shared/docs/baselines.md
LATENCY_BATCH = {"fmnist-mlp": 64, "digits-mlp": 64}  # rows per latency feed; others: 1
BLOCK = 32  # MatMulNBits block size
ACCURACY_LEVEL = 4  # int8 compute for MatMulNBits (2- and 8-bit are very slow without it)
ORT_VARIANTS = ["fp32", "int8-dynamic", "nbits4-rtn-b32", "nbits4-kquant", "nbits2", "nbits8"]
OPTIONAL_VARIANTS = ["int8-dynamic-all"]  # quantize_dynamic's defaults (Gather and Conv too)
NOTES = {
    "fp32": "original",
    "int8-dynamic": "quantize_dynamic, MatMul only, per-channel, reduce_range",
    "int8-dynamic-all": "quantize_dynamic defaults (MatMul, Gather, Conv...), per-channel, reduce_range",
    "nbits4-rtn-b32": f"MatMulNBits RTN 4-bit, block {BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits4-kquant": f"MatMulNBits k-quant 4-bit, block {BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits2": f"MatMulNBits RTN 2-bit, block {BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
    "nbits8": f"MatMulNBits RTN 8-bit, block {BLOCK}, sym, accuracy_level {ACCURACY_LEVEL}",
}

# Runs in a fresh interpreter so that the parent's peak RSS does not carry over.
RSS_CHILD = r"""
import json, sys
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
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
created = hwm()
session.run(None, feed)
ran = hwm()
print(json.dumps({"before": before, "session": created - before, "first_run": ran - before}))
"""


@dataclass
class Variant:
    name: str
    path: Path | None = None
    note: str = ""
    error: str | None = None
    build_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------- building variants


def name_nodes(src: Path, dst: Path) -> Path:
    """A copy of the model whose nodes all have unique, non-empty names (MatMulNBits needs them)."""
    proto = onnx.load(str(src))
    seen: set[str] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for i, node in enumerate(graph.node):
            if not node.name or node.name in seen:
                base = f"{node.op_type}_{graph.name or 'g'}_{i}"
                name, k = base, 0
                while name in seen:
                    k += 1
                    name = f"{base}_{k}"
                node.name = name
            seen.add(node.name)
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    visit(sub)

    visit(proto.graph)
    big = proto.ByteSize() > 2**31 - 2**24
    onnx.save(proto, str(dst), save_as_external_data=big, location=dst.name + ".data" if big else None)
    return dst


def quantize_int8(named: Path, out: Path, matmul_only: bool) -> None:
    from onnxruntime.quantization import quantize_dynamic  # noqa: PLC0415

    ops = ["MatMul"] if matmul_only else None
    quantize_dynamic(named, out, per_channel=True, reduce_range=True, op_types_to_quantize=ops)


def quantize_nbits(named: Path, out: Path, bits: int, kquant: bool = False) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq  # noqa: PLC0415

    model = onnx.load(str(named))
    if kquant:
        config = mnq.KQuantWeightOnlyQuantConfig()
        quantizer = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                                             accuracy_level=ACCURACY_LEVEL, algo_config=config)
    else:  # DefaultWeightOnlyQuantConfig is round-to-nearest per block
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                                  accuracy_level=ACCURACY_LEVEL, bits=bits)
        quantizer = mnq.MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node):
        raise RuntimeError("no MatMul was quantized (no constant 2-D weight with K divisible by the block)")
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)


def compress_symshrink(spec: str, entry: ZooModel, out: Path, keep: float, threads: int) -> dict[str, Any]:
    from symshrink.pipeline import CompressOptions, compress  # noqa: PLC0415

    options = CompressOptions(keep=keep, calib=entry.calib, progress=False, threads=threads)
    report = compress(spec, out, options)
    return {"groups": len(report.plan.groups), "skipped_groups": len(report.skipped),
            "holdout_feeds": report.holdout_feeds, "holdout_diffs": [d.to_dict() for d in report.diffs]}


def build_variants(spec: str, entry: ZooModel, src: Path, work: Path, keeps: list[float],
                   wanted: list[str], threads: int) -> list[Variant]:
    """Build every variant into `work`; a failure is recorded on its Variant, never raised."""
    work.mkdir(parents=True, exist_ok=True)
    named = work / "named.onnx"
    builders: dict[str, Any] = {
        "int8-dynamic": lambda out: quantize_int8(named, out, matmul_only=True),
        "int8-dynamic-all": lambda out: quantize_int8(named, out, matmul_only=False),
        "nbits4-rtn-b32": lambda out: quantize_nbits(named, out, 4),
        "nbits4-kquant": lambda out: quantize_nbits(named, out, 4, kquant=True),
        "nbits2": lambda out: quantize_nbits(named, out, 2),
        "nbits8": lambda out: quantize_nbits(named, out, 8),
    }
    variants = [Variant("fp32", src, NOTES["fp32"])]
    try:
        name_nodes(src, named)
    except Exception as err:  # noqa: BLE001 (any failure becomes a row)
        log.warning("%s: naming nodes failed: %s", spec, one_line(err))
        named = src
    todo = [v for v in wanted if v in builders]
    todo += [f"symshrink-moment-keep{k:g}" for k in keeps]
    for name in tqdm(todo, desc=f"{spec}: build", unit="variant", leave=False):
        out = work / f"{name}.onnx"
        variant = Variant(name, out, NOTES.get(name, ""))
        start = time.perf_counter()
        try:
            if name in builders:
                with contextlib.redirect_stdout(io.StringIO()):  # k-quant prints a progress bar
                    builders[name](out)
            else:
                keep = float(name.removeprefix("symshrink-moment-keep"))
                variant.note = f"symshrink moment reduction, keep {keep:g} of each group, calib {entry.calib}"
                variant.extra = compress_symshrink(spec, entry, out, keep, threads)
        except Exception as err:  # noqa: BLE001 (any failure becomes a row)
            variant.error, variant.path = one_line(err), None
            log.warning("%s %s: %s", spec, name, variant.error)
        variant.build_s = time.perf_counter() - start
        variants.append(variant)
    return variants


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
    """Peak RSS growth (MB) of creating a session, and after its first run, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(threads), str(feed_file)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["rss child failed"])[-1])
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"rss_mb": raw["session"] / MB, "rss_first_run_mb": raw["first_run"] / MB,
            "rss_before_mb": raw["before"] / MB}


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


def bench_model(spec: str, keeps: list[float], wanted: list[str], args: argparse.Namespace,
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
    output = primary_output(reference)
    ref_outputs = run_all(reference, eval_feeds)
    del reference

    start = time.perf_counter()
    variants = build_variants(model_spec, entry, src, work / spec, keeps, wanted, args.threads)
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


def render_markdown(result: dict[str, Any]) -> str:
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
        "growth after the first run). **Latency** is the median of at least "
        f"{a['min_runs']} runs (and {a['min_seconds']:g} s) of one feed with intra_op_num_threads="
        f"{a['threads']}, each variant in its own block after a {a['pause']:g} s pause; fp32 is timed in "
        "the same process, first and again at the end (drift check). **rel L2 / cosine** compare the "
        "primary output with fp32's on the zoo data set's eval split. int8-dynamic quantizes MatMul only "
        "(per-channel, reduce_range=True: the defaults also turn Gather/Conv into slow integer ops, see "
        f"shared/docs/baselines.md). MatMulNBits variants: block {BLOCK}, symmetric, accuracy_level "
        f"{ACCURACY_LEVEL}. symshrink rows: `symshrink.pipeline.compress` with the zoo's default "
        "calibration data (moment reduction, keep = fraction of units kept in each group).", "",
    ]
    if any(max(r["loadavg_start"], r["loadavg_end"]) > m["cores"] for r in runs):
        lines += ["**Warning:** the load average exceeded the core count during a run (other jobs shared the "
                  "machine): latencies are inflated and noisy; compare each model's first and final fp32 "
                  "timing, and trust ratios more than absolute milliseconds.", ""]
    for model in result["models"]:
        lines.append(f"## {model['model']}")
        lines.append("")
        if "error" in model:
            lines += [f"Failed: {model['error']}", ""]
            continue
        feed = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in model["latency_feed"].items())
        source = f"`{model['package']}`" + (f", file `{model['source']}`" if model["override"] else "")
        lines.append(f"Model from {source}. Task `{model['task']}` (fp32 reference in shared/docs/models.md: "
                     f"{model['reference_metric']}); error on output `{model['primary_output']}` over "
                     f"{model['eval_samples']} eval samples of `{model['calib']}`; latency feed {feed}; "
                     f"fp32 latency at the end of the run {model['fp32_latency_end_ms']:.2f} ms.")
        lines += ["", "| variant | size MB | size vs fp32 | RSS MB | latency ms | latency vs fp32 | rel L2 "
                  "| cosine | task metric |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        fp32 = next((r for r in model["rows"] if r["variant"] == "fp32" and not r.get("error")), {})
        notes = []
        for r in model["rows"]:
            if r.get("error"):
                notes.append(f"- {r['variant']}: {r['error']}")
                lines.append(f"| {r['variant']} | n/a | | | | | | | |")
                continue
            size = r["bytes"] / fp32["bytes"] if fp32 else None
            speed = r["latency_ms"] / fp32["latency_ms"] if fp32 else None
            lines.append(f"| {r['variant']} | {r['bytes'] / MB:.2f} | {_fmt(size, '.2f')}x "
                         f"| {r['rss_mb']:.1f} | {r['latency_ms']:.2f} | {_fmt(speed, '.2f')}x "
                         f"| {r['rel_l2']:.4f} | {r['cosine']:.4f} | {r['metric']:.4f} |")
        if notes:
            lines += ["", "Not available:", *notes]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-mlp", "minilm-l3", "ppocr-rec"])
    ap.add_argument("--keeps", nargs="*", type=float, default=[0.75, 0.5])
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
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models already in the JSON file (rerun some models only)")
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from the JSON file, measure nothing")
    ap.add_argument("--work", type=Path, help="keep built variants here (default: a temporary folder)")
    args = ap.parse_args()
    args.onnx = dict(item.split("=", 1) for item in args.onnx)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)

    json_path = args.json or args.out.with_suffix(".json")
    if args.render_only:
        args.out.write_text(render_markdown(json.loads(json_path.read_text())))
        return
    start = time.perf_counter()
    machine = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="symshrink-bench-"))
    models = []
    try:
        for spec in args.models:
            log.info("model %s", spec)
            try:
                models.append(bench_model(spec, args.keeps, args.variants, args, work))
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
    if args.merge and json_path.is_file():  # keep the other models of an earlier run
        done = {m["model"] for m in models}
        models = [m for m in json.loads(json_path.read_text())["models"] if m["model"] not in done] + models
    result = {"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "models": models}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    args.out.write_text(render_markdown(result))
    log.info("wrote %s and %s in %.1f min", args.out, json_path, run["wall_s"] / 60)


if __name__ == "__main__":
    main()
