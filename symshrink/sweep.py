"""`symshrink sweep`: the rate-distortion curve of the user's own model.

Each point is a real compressed model: the allocator's plan (no --method: integer grids or fp32 per site) within one
held-out cosine budget, written to the output folder, measured on the held-out calibration feeds (size on disk,
largest relative L2 error and smallest cosine over the outputs; the task metric where one is given), beside
onnxruntime's quantizers measured the same way. The table, JSON and PNG are rewritten after every point: a run that
is cut keeps the points it finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir
from tqdm import tqdm

from symshrink.baselines import BASELINE_NAMES, BASELINES, build_baseline, name_nodes
from symshrink.calibration.feeds import split_holdout
from symshrink.errors import BadInput
from symshrink.modelio import input_files, load_model, model_bytes_on_disk, resolve_model, save_model, write_atomically
from symshrink.options import CompressOptions
from symshrink.pipeline import calibration_feeds, compress_model
from symshrink.runtime.diff import compare_outputs
from symshrink.runtime.ort import input_specs, make_session, run_all

__all__ = ["DEFAULT_COSINES", "Point", "sweep", "points_table"]

DEFAULT_COSINES = (0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass
class Point:
    name: str  # "alloc-c0.99", "nbits4-rtn-b32"...
    family: str  # "symshrink", "onnxruntime" or "fp32"
    bytes: int = 0
    rel_l2: float | None = None  # the largest over the outputs, on the held-out feeds
    cosine: float | None = None  # the smallest
    metric: float | None = None  # the task's, where one is given
    seconds: float = 0.0  # to build
    error: str = ""  # why the point has no model


def _measure(point: Point, path: Path, holdout: list, expected: list, task, threads: int | None) -> None:
    session = make_session(path, threads)
    diffs = compare_outputs(expected, run_all(session, holdout))
    point.bytes = model_bytes_on_disk(path)
    point.rel_l2 = max(d.rel_l2 for d in diffs)
    point.cosine = min(d.cosine for d in diffs)
    point.metric = None if task is None else float(task.evaluate(session))


def points_table(points: Sequence[Point], fp32_bytes: int, task_name: str | None) -> str:
    """The points as a Markdown table, smallest first."""
    metric = task_name or "task metric"
    lines = [f"| variant | family | MB | vs fp32 | rel L2 | cosine | {metric} | build s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.error != "", p.bytes)):
        if p.error:
            lines.append(f"| {p.name} | {p.family} | failed: {p.error} | | | | | |")
            continue
        value = "" if p.metric is None else f"{p.metric:.4f}"
        lines.append(f"| {p.name} | {p.family} | {p.bytes / 1e6:.3f} | {p.bytes / fp32_bytes:.3f}x | {p.rel_l2:.4f} | "
                     f"{p.cosine:.5f} | {value} | {p.seconds:.1f} |")
    return "\n".join(lines)


def _plot(points: Sequence[Point], fp32_bytes: int, title: str, task_name: str | None, path: Path) -> None:
    import matplotlib  # noqa: PLC0415 (the zoo/bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    done = [p for p in points if not p.error and p.family != "fp32"]
    panels = 2 if task_name and any(p.metric is not None for p in done) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    styles = {"symshrink": ("o-", "tab:blue"), "onnxruntime": ("s", "tab:red")}
    for axis, (value, label) in zip(axes[0], [(lambda p: 1 - p.cosine, "1 - cosine (held-out, worst output)"),
                                              (lambda p: p.metric, task_name)]):
        for family, (marker, colour) in styles.items():
            rows = sorted((p for p in done if p.family == family), key=lambda p: p.bytes)
            if not rows:
                continue
            xs, ys = [p.bytes / fp32_bytes for p in rows], [value(p) for p in rows]
            axis.plot(xs, ys, marker, color=colour, label=family)
            for p, x, y in zip(rows, xs, ys):
                axis.annotate(p.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        fp32 = next((p for p in points if p.family == "fp32"), None)
        if label == task_name and fp32 is not None and fp32.metric is not None:
            axis.axhline(fp32.metric, color="grey", linestyle="--", label="fp32")
        if label != task_name:
            axis.set_yscale("log")
        axis.set_xlabel("size on disk / fp32")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine() -> str:
    """Where the points were measured: CPU, cores, the versions that matter, the date."""
    import onnxruntime  # noqa: PLC0415

    from symshrink import __version__  # noqa: PLC0415

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown CPU")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu}, {os.cpu_count()} cores; symshrink {__version__}, onnxruntime {onnxruntime.__version__}; {date}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _write(out: Path, points: list[Point], fp32_bytes: int, title: str, task_name: str | None, plot: bool) -> None:
    table = points_table(points, fp32_bytes, task_name)
    write_atomically(out / "sweep.md", lambda h: h.write(f"# {title}\n\n{table}\n".encode()))
    data = {"title": title, "fp32_bytes": fp32_bytes, "task": task_name, "points": [dataclasses.asdict(p) for p in points]}
    write_atomically(out / "sweep.json", lambda h: h.write(json.dumps(data, indent=1).encode()))
    if plot:
        _plot(points, fp32_bytes, title, task_name, out / "sweep.png")


def sweep(model_spec: str, out: str | Path, options: CompressOptions, cosines: Sequence[float] = DEFAULT_COSINES,
          baselines: Sequence[str] = BASELINES, task_name: str | None = None, force: bool = False,
          plot: bool = True) -> list[Point]:
    """The allocator at each cosine budget and onnxruntime's `baselines`, each written to `out` (a new folder, or an
    existing one with `force`) and measured on the same held-out feeds; the points, also in out/sweep.{md,json,png}."""
    if not cosines or any(not 0 < c < 1 for c in cosines):
        raise BadInput(f"--cosines: budgets in (0, 1), not {list(cosines)}")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise BadInput("sweep draws its PNG with matplotlib: pip install 'symshrink[bench]' (or --no-plot)")
    unknown = [b for b in baselines if b not in BASELINE_NAMES]
    if unknown:
        raise BadInput(f"--baselines: unknown {', '.join(unknown)}; available: {', '.join(BASELINE_NAMES)}")
    out = Path(out)
    path = resolve_model(model_spec)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise BadInput(f"{out}: exists (a sweep writes a new folder; --force reuses it)")
    if any(out.resolve() == f.parent.resolve() for f in input_files(path)):
        raise BadInput(f"{out}: the model's own folder; give a new one")
    task = None
    if task_name is not None:
        from symshrink.models.registry import get_task  # noqa: PLC0415

        task = get_task(task_name)
    model, path = load_model(model_spec)
    reference = make_session(path, options.threads)
    feeds = calibration_feeds(options, model_spec, input_specs(reference, model))
    _, holdout = split_holdout(feeds)
    expected = run_all(reference, holdout)
    out.mkdir(parents=True, exist_ok=True)
    fp32_bytes = model_bytes_on_disk(path)
    fp32 = Point("fp32", "fp32", fp32_bytes, 0.0, 1.0, None if task is None else float(task.evaluate(reference)))
    points, title = [fp32], f"symshrink sweep of {model_spec}: {len(holdout)} held-out feeds ({_machine()})"
    quiet = dataclasses.replace(options, progress=False)
    steps = [("symshrink", c) for c in sorted(cosines)] + [("onnxruntime", b) for b in baselines]
    with tempfile.TemporaryDirectory(prefix="symshrink-sweep-") as scratch:
        named = None
        for family, what in tqdm(steps, desc="sweep", unit="point", disable=not options.progress):
            start = time.perf_counter()
            point = Point(f"alloc-c{what:g}" if family == "symshrink" else what, family)
            target = out / f"{point.name}.onnx"
            try:
                if family == "symshrink":
                    trial = ir.from_proto(ir.to_proto(model))
                    run_options = dataclasses.replace(quiet, method=None if not options.moment.has_widths() else options.method,
                                                      min_cosine=what, max_error=None)
                    report = compress_model(trial, str(path), feeds, run_options, fp32_bytes, reference)
                    if report.failures:
                        raise BadInput("; ".join(report.failures))
                    save_model(trial, target, force=True)
                else:
                    named = named or name_nodes(path, Path(scratch) / "named.onnx")
                    build_baseline(what, named, target)
                point.seconds = time.perf_counter() - start
                _measure(point, target, holdout, expected, task, options.threads)
            except Exception as err:  # noqa: BLE001 (a point that fails is a row with its reason, not the end)
                point.error = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            points.append(point)
            _write(out, points, fp32_bytes, title, task_name, plot)
    return points
