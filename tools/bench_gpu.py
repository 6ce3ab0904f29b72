"""Benchmarks of the GPU runtime: each kernel against the device's roofline, and zoo models end to end.

    python tools/bench_gpu.py --models fmnist-mlp,mobilenetv2 --work .gpu-models --prepare   (here: the zoo's data)
    python tools/bench_gpu.py --device cuda --models-dir .gpu-models --out docs/benchmarks-gpu.md   (on the GPU)

Kernels: the ternary (2-bit), hyperfunction (--hyper-bits per pair) and integer-grid (MatMulNBits' 4 and 2 bits,
blocks of 32) matmuls, and the dense fp32 and fp16 products (cuBLAS through CuPy), for
each weight shape KxN in --shapes and each batch M in --batches. GPU time from CUDA events
(cupyx.profiler.benchmark), with the weights rotated over enough copies to overflow the L2 cache. Bandwidth counts
the bytes a call must move (weights, x, the slices' partials written and read, y); FLOP/s counts 2 M K N. Both are
shown against the device-to-device copy bandwidth measured in the same run and against the nominal peaks the driver
reports.
Models: `--prepare` builds, where the zoo's data is, the ternary, hyperfunction and 2/4-bit grid variants of each
model in --models, its evaluation feeds and the original's outputs on them (onnxruntime, CPU), and copies the
original while the folder stays within --budget-mb; the run takes each variant on each engine in --engines (the
executor; hybrid: onnxruntime for the standard segments) with median latency of one feed, device memory after load,
and relative L2 and cosine against the original's outputs; beside them the original on onnxruntime's CUDA provider
where it is installed. A variant that fails becomes a row with its one-line error.
--device cpu runs the same code on the numpy references: a dry run whose timings say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compress_symshrink, machine_info, one_line

from symshrink.calibration.feeds import load_feeds, random_feeds
from symshrink.modelio import load_model
from symshrink.models.registry import cache_dir, get_model
from symshrink.runtime.backend import Backend, get_backend
from symshrink.runtime.diff import compare_outputs
from symshrink.runtime.formats import matmul_nbits_arrays, quantize_grid
from symshrink.runtime.hybrid import HybridRunner, open_runtime
from symshrink.runtime.kernels import KERNELS, grid, hyper, ternary
from symshrink.runtime.kernels.launch import GEOMETRY, cuda_launcher, device_target_blocks, launch_config
from symshrink.runtime.ort import input_specs, make_session, run_all

GB = 1e9
TERNARY_BLOCK = 64
FP32_FMA_PER_SM_CLOCK = 128  # Hopper and Ampere: 128 fp32 lanes per SM


def _wall_seconds(call: Callable[[], Any], repeats: int) -> float:
    """Median wall-clock seconds of `call` after one warm-up call (calls that return host arrays have waited
    for the device)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _timer(backend: Backend, repeats: int) -> Callable[[Callable[[], Any]], tuple[float, float]]:
    """Seconds per call, (device, host): CUDA events and the host's time in the call on a GPU (the host's is the
    launch path; where the two agree, the host is what the device waits for), the wall clock twice on the CPU."""
    if backend.name == "cuda":
        from cupyx.profiler import benchmark  # noqa: PLC0415

        def timed(call):
            result = benchmark(call, n_repeat=repeats, n_warmup=3)
            return float(np.median(result.gpu_times[0])), float(np.median(result.cpu_times))

        return timed
    return lambda call: (_wall_seconds(call, repeats),) * 2


def device_info(backend: Backend, timer) -> dict[str, Any]:
    """Name, nominal peaks where the driver reports the clocks, and a measured copy bandwidth."""
    if backend.name != "cuda":
        return {"name": "CPU (numpy references)", "copy_gbs": None, "peak_gbs": None, "peak_gflops": None, "l2": 0}
    cupy = backend.xp
    device = cupy.cuda.Device()
    attributes = device.attributes
    name = cupy.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    memory_khz, bus_bits, clock_khz = (attributes.get(k) for k in ("MemoryClockRate", "GlobalMemoryBusWidth", "ClockRate"))
    peak_gbs = 2 * memory_khz * 1e3 * bus_bits / 8 / GB if memory_khz and bus_bits else None
    sms = attributes["MultiProcessorCount"]
    peak_gflops = 2 * FP32_FMA_PER_SM_CLOCK * sms * clock_khz * 1e3 / GB if clock_khz else None
    source = cupy.ones(2**28, cupy.float32)  # 1 GiB
    target = cupy.empty_like(source)
    seconds, _ = timer(lambda: cupy.copyto(target, source))
    return {"name": name, "sms": sms, "l2": attributes.get("L2CacheSize", 0), "peak_gbs": peak_gbs,
            "peak_gflops": peak_gflops, "copy_gbs": 2 * source.nbytes / seconds / GB}


GRID_BLOCK = 32
KERNEL_KINDS = ("dense", "dense_fp16", "ternary_matmul", "decoded_b2", "hyper_matmul", "grid_matmul_b4",
                "grid_matmul_b2")  # decoded_b2: a 2-bit weight decoded whole to float32, then cuBLAS


def _weights(kind: str, depth: int, cols: int, bits: int, rng: np.random.Generator):
    """A random weight in each format (kernel time does not depend on the values)."""
    if kind in ("ternary_matmul", "decoded_b2"):
        codes = rng.integers(-1, 2, size=(depth, cols)).astype(np.int8)
        return ternary.ternary_weight(codes, rng.uniform(0.5, 1.5, (-(-depth // TERNARY_BLOCK), cols)).astype(np.float32),
                                      TERNARY_BLOCK)
    if kind == "hyper_matmul":
        packed = rng.integers(0, 256, size=(depth * cols // 16, bits), dtype=np.uint8)
        return hyper.HyperWeight(packed, rng.standard_normal((1 << bits, 2)).astype(np.float32),
                                 np.array([[0.1, -0.1, 2.0]], np.float32), len(packed), bits, depth, cols)
    if kind.startswith("grid_matmul"):  # MatMulNBits' arrays, in the kernel's layout
        bits = int(kind.rsplit("_b", 1)[1])
        stored = matmul_nbits_arrays(quantize_grid(rng.standard_normal((depth, cols)).astype(np.float32), GRID_BLOCK, bits))
        return grid.matmul_nbits_weight(stored.arrays["B"], stored.arrays["scales"], stored.arrays["zero_points"], depth,
                                        cols, bits, GRID_BLOCK)
    dense = rng.standard_normal((depth, cols)).astype(np.float32)
    return dense.astype(np.float16) if kind == "dense_fp16" else dense


def _runner(kind: str, backend: Backend) -> tuple[Callable, Callable]:
    """(place the weight on the device, run x @ W) for a kernel kind: cuBLAS for the dense ones, else the runtime's
    kernel (its numpy reference on the CPU)."""
    if kind.startswith("dense"):
        return backend.to_device, lambda x, w: x @ w
    if kind == "decoded_b2":
        return (lambda w: w.to(backend, {})), lambda x, w: x @ grid.dense_grid(w, backend.xp)
    call = KERNELS[kind].cuda if backend.name == "cuda" else KERNELS[kind].reference
    return (lambda w: w.to(backend, {})), call


def _moved_bytes(kind: str, weight, rows_x: int, depth: int, cols: int, target_blocks: int) -> int:
    """What a call must move: the weight's bytes, x and y (fp16 for the fp16 product), and the slices' partials
    the runtime's kernels write and read back."""
    activations = (2 if kind == "dense_fp16" else 4) * rows_x * (depth + cols)
    if kind.startswith("dense"):
        return weight.nbytes + activations
    if kind == "decoded_b2":  # the float32 weight written, then read by the product
        return weight.nbytes + activations + 2 * 4 * depth * cols
    geometry = GEOMETRY[getattr(weight, "kernel", kind)]  # ternary runs on the 2-bit grid kernel
    slices = launch_config(rows_x, depth, -(-cols // geometry.columns), target_blocks, geometry.depth_step).slices
    return weight.nbytes + activations + 2 * 4 * slices * rows_x * cols


def _rotating(timer, run: Callable, x, weights: list) -> tuple[float, float]:
    """Seconds per call of run(x, w), each call on the next copy of the weight (none still in L2)."""
    turn = iter(range(10**9))
    return timer(lambda: run(x, weights[next(turn) % len(weights)]))


def bench_kernels(backend: Backend, shapes: list[tuple[int, int]], batches: list[int], bits: int, device: dict,
                  timer) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    target_blocks = 4 * device.get("sms", 1)
    rows = []
    for depth, cols in shapes:
        for kind in KERNEL_KINDS:
            weight = _weights(kind, depth, cols, bits, rng)
            place, run = _runner(kind, backend)
            copies = max(1, min(64, math.ceil(3 * device["l2"] / weight.nbytes))) if device["l2"] else 1
            placed = [place(weight) for _ in range(copies)]
            dtype = np.float16 if kind == "dense_fp16" else np.float32
            for rows_x in batches:
                x = backend.to_device(rng.standard_normal((rows_x, depth)).astype(dtype))
                seconds, host_seconds = _rotating(timer, run, x, placed)
                moved = _moved_bytes(kind, weight, rows_x, depth, cols, target_blocks)
                gbs, gflops = moved / seconds / GB, 2 * rows_x * depth * cols / seconds / GB
                rows.append({"kernel": kind, "shape": f"{depth}x{cols}", "batch": rows_x, "us": seconds * 1e6,
                             "host_us": host_seconds * 1e6,
                             "weight_bytes": weight.nbytes, "moved_bytes": moved, "gbs": gbs, "gflops": gflops,
                             "of_copy": gbs / device["copy_gbs"] if device["copy_gbs"] else None,
                             "of_peak_bw": gbs / device["peak_gbs"] if device["peak_gbs"] else None,
                             "of_peak_flops": gflops / device["peak_gflops"] if device["peak_gflops"] else None})
            del placed
    return rows


def bench_launch(backend: Backend, timer) -> list[dict[str, Any]]:
    """Where a kernel call's time goes at batch 1 (GPU only): the whole call, the kernel launch alone (grid and
    buffers made beforehand), the sum of the slices' partials alone, an empty kernel and a one-element CuPy add."""
    if backend.name != "cuda":
        return []
    cupy = backend.xp
    rng = np.random.default_rng(1)
    weight = _weights("ternary_matmul", 4096, 4096, 10, rng).to(backend, {})
    x = backend.to_device(rng.standard_normal((1, 4096)).astype(np.float32))
    depth, words = weight.words.shape
    config = launch_config(1, depth, words, device_target_blocks(), GEOMETRY[weight.kernel].depth_step)
    partial = cupy.empty((config.slices, 1, words * GEOMETRY[weight.kernel].columns), cupy.float32)
    arguments = (x, *weight.arrays(), partial, 1, depth, words, *weight.format_ints(), config.rows_per_slice)
    empty = cupy.RawKernel('extern "C" __global__ void nothing() {}', "nothing")
    one = cupy.ones(1, cupy.float32)
    parts = {"whole call (KERNELS['ternary_matmul'].cuda)": lambda: KERNELS["ternary_matmul"].cuda(x, weight),
             f"kernel launch alone ({config.slices} slices)": lambda: cuda_launcher(weight.kernel, config, arguments),
             "sum of the slices' partials (partial.sum(axis=0))": lambda: partial.sum(axis=0),
             "empty RawKernel launch": lambda: empty((1,), (32,), ()),
             "one-element CuPy add": lambda: one + one}
    rows = []
    for part, call in parts.items():
        seconds, host_seconds = timer(call)
        rows.append({"part": part, "us": seconds * 1e6, "host_us": host_seconds * 1e6})
    return rows


# -- zoo models -------------------------------------------------------------------------------------------------
# `prepare_models` builds, on a machine with the zoo's data, each model's compressed variants, its evaluation feeds
# and the original's outputs on them (onnxruntime, CPU), and the original itself where it fits the folder's byte
# budget (a lent GPU machine takes 64 MiB a call and has no network); `bench_models` runs what the folder holds.

FEEDS = 4
REFERENCE_BYTES = 8 << 20  # the original's outputs kept for a model, before compression
VARIANTS = {"grid-4bit": {"method": "quant", "bits": 4}, "grid-2bit": {"method": "quant", "bits": 2},
            "ternary": {"method": "ternary"}}  # after hyper-b<bits>: in the order they go in while the budget holds


def _feeds(spec: str, session) -> tuple[list[dict], str]:
    """The model's evaluation feeds from its data set, else random ones (the machine lacks the data)."""
    calib = get_model(spec).calib
    try:
        return load_feeds(calib, input_specs(session), "eval", FEEDS), calib
    except Exception:  # noqa: BLE001 (no data here: random inputs of the model's shapes)
        return random_feeds(input_specs(session), FEEDS), "random"


def _within(feeds: list[dict], session, limit: int) -> tuple[list[dict], list[dict]]:
    """The feeds, fewer or with fewer rows (the leading axis) until the original's outputs on them take at most
    `limit` bytes (an OCR model's per-character class probabilities: 3 MB a word image), and those outputs."""
    while True:
        reference = run_all(session, feeds)
        size = sum(a.nbytes for out in reference for a in out.values())
        rows = min(a.shape[0] if a.ndim else 1 for a in feeds[0].values())
        if size <= limit or (len(feeds) == 1 and rows == 1):
            return feeds, reference
        if len(feeds) > 1:
            feeds = feeds[: max(1, len(feeds) * limit // size)]
        else:
            keep = max(1, rows * limit // size)
            feeds = [{k: a[:keep] if a.ndim else a for k, a in feeds[0].items()}]


def _fits(folder: Path, size: int, budget_bytes: int) -> bool:
    return sum(f.stat().st_size for f in folder.iterdir()) + size <= budget_bytes


def prepare_models(specs: list[str], folder: Path, bits: int, budget_bytes: int) -> dict[str, Any]:
    """Feeds, reference outputs and originals of the models in `folder`, then their variants, with `manifest.json`:
    each file while the folder stays within `budget_bytes` (one that would not fit is left out, with the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {}
    variants = {f"hyper-b{bits}": {"method": "hyper", "index_bits": (bits,), "tensor_error": None}} | VARIANTS
    for spec in specs:
        original = Path(get_model(spec).materialise(cache_dir()))
        item: dict[str, Any] = {"variants": {}, "errors": {}, "fp32": None}
        session = make_session(original)
        feeds, item["data"] = _feeds(spec, session)
        feeds, reference = _within(feeds, session, REFERENCE_BYTES)
        for name, arrays in (("feeds", feeds), ("reference", reference)):  # softmax outputs: mostly zeros, compressed
            np.savez_compressed(folder / f"{spec}-{name}.npz",
                                **{f"{i}/{k}": v for i, values in enumerate(arrays) for k, v in values.items()})
        fp32 = folder / f"{spec}-fp32.onnx"
        if fp32.exists() or _fits(folder, original.stat().st_size, budget_bytes):
            shutil.copyfile(original, fp32)
            item["fp32"] = fp32.name
        else:
            item["errors"]["fp32"] = f"{original.stat().st_size / 1e6:.0f} MB: beyond the folder's budget"
        manifest[spec] = item
    for spec in specs:
        entry, item = get_model(spec), manifest[spec]
        for name, options in variants.items():
            out = folder / f"{spec}-{name}.onnx"
            try:
                if not out.exists():
                    with tempfile.TemporaryDirectory() as tmp:
                        built = Path(tmp) / out.name
                        compress_symshrink(spec, entry, built, threads=None, **options)
                        if not _fits(folder, built.stat().st_size, budget_bytes):
                            raise ValueError(f"{built.stat().st_size / 1e6:.1f} MB: beyond the folder's budget")
                        shutil.move(built, out)
                item["variants"][name] = out.name
            except Exception as err:  # noqa: BLE001 (one row with the reason, the run goes on)
                item["errors"][name] = one_line(err)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        feeds: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            index, name = key.split("/", 1)
            feeds.setdefault(int(index), {})[name] = data[key]
    return [feeds[i] for i in sorted(feeds)]


def bench_models(backend: Backend, folder: Path, engines: list[str], runs: int,
                 rows: list[dict[str, Any]], on_model: Callable[[], None]) -> None:
    """Appends the rows of each model to `rows`, and calls `on_model` after each."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for spec, item in manifest.items():
        feeds, reference = _load_feeds(folder / f"{spec}-feeds.npz"), _load_feeds(folder / f"{spec}-reference.npz")
        rows += [{"model": spec, "variant": name, "error": reason} for name, reason in item["errors"].items()]
        paths = ({"fp32": folder / item["fp32"]} if item["fp32"] else {}) | {
            name: folder / file for name, file in item["variants"].items()}
        if item["fp32"] and backend.name == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            rows.append(_onnxruntime_cuda(spec, paths["fp32"], feeds, reference, runs))
        for variant, path in paths.items():
            for engine in engines:
                row: dict[str, Any] = {"model": spec, "variant": variant, "engine": engine,
                                       "disk_mb": path.stat().st_size / 1e6, "data": item["data"]}
                try:
                    row |= _run_variant(backend, path, engine, feeds, reference, runs)
                except Exception as err:  # noqa: BLE001
                    row["error"] = one_line(err)
                rows.append(row)
        on_model()


def _onnxruntime_cuda(spec: str, path: Path, feeds: list[dict], reference: list[dict], runs: int) -> dict[str, Any]:
    """The user's own fp32 baseline on the GPU: onnxruntime's CUDA execution provider (its memory is its arena's)."""
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    outputs = run_all(session, feeds)
    seconds = _wall_seconds(lambda: session.run(None, feeds[0]), runs)
    return {"model": spec, "variant": "fp32", "engine": f"onnxruntime ({session.get_providers()[0]})",
            "disk_mb": path.stat().st_size / 1e6, "ms": 1e3 * seconds, "device_mb": None, "peak_mb": None,
            "rel_l2": compare_outputs(reference, outputs)[0].rel_l2, "kernels": {}, "function_bodies": {}}


def _run_variant(backend: Backend, path: Path, engine: str, feeds: list[dict], reference: list[dict],
                 runs: int) -> dict[str, Any]:
    pool = backend.xp.get_default_memory_pool() if backend.name == "cuda" else None
    if pool is not None:
        pool.free_all_blocks()
    model, _ = load_model(path)
    runner = open_runtime(model, backend, engine)
    loaded = pool.used_bytes() if pool is not None else runner.summary().constant_bytes
    outputs = [runner.run(feed) for feed in feeds]
    diff = max(compare_outputs(reference, outputs), key=lambda d: d.rel_l2)
    seconds = _wall_seconds(lambda: runner.run(feeds[0]), runs)  # outputs come back to the host
    summary = runner.summary()
    row = {"ms": 1e3 * seconds, "device_mb": loaded / 1e6, "constants_mb": summary.constant_bytes / 1e6,
           "peak_mb": pool.total_bytes() / 1e6 if pool is not None else None, "rel_l2": diff.rel_l2,
           "cosine": diff.cosine, "kernels": summary.kernels, "function_bodies": summary.function_calls}
    if isinstance(runner, HybridRunner):
        row["partitions"] = f"{summary.plan.count('standard')}+{summary.plan.count('packed')}"
        row["copies"] = summary.moves.total
    return row


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    device, machine = result["device"], result["machine"]
    lines = [f"# GPU runtime benchmarks ({device['name']})", "",
             f"Command: `{result['command']}`; commit {machine['commit']}, {machine['date']}; CPU {machine['cpu']}.",
             f"Device: {device['name']}; copy bandwidth measured here {_cell(device['copy_gbs'], '.0f')} GB/s; nominal "
             f"peaks {_cell(device['peak_gbs'], '.0f')} GB/s, {_cell(device['peak_gflops'], '.0f')} GFLOP/s fp32.", "",
             "## Kernels", "",
             "us: device time per call (CUDA events); host us: the host's time in the call (its launch path).", "",
             "| kernel | K x N | batch | us | host us | weight MB | GB/s | of copy | of peak BW | GFLOP/s | of peak FLOP |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['batch']} | {r['us']:.1f} | {_cell(r.get('host_us'), '.1f')} | "
                     f"{r['weight_bytes'] / 1e6:.2f} | {r['gbs']:.0f} | {_cell(r['of_copy'], '.2f')} | "
                     f"{_cell(r['of_peak_bw'], '.2f')} | {r['gflops']:.0f} | {_cell(r['of_peak_flops'], '.3f')} |")
    if result.get("launch"):
        lines += ["", "## The launch path of one call (ternary 4096x4096, batch 1)", "",
                  "| part | us | host us |", "|---|---|---|"]
        lines += [f"| {r['part']} | {r['us']:.1f} | {r['host_us']:.1f} |" for r in result["launch"]]
    lines += ["", "## Models on the symshrink runtime", "",
              "Each variant on each engine: median wall time of one feed (outputs back on the host), device memory "
              "after load (CuPy's pool; onnxruntime's arena not included) and the packed constants, the worst output's "
              "relative L2 and cosine against the original in onnxruntime (CPU) on the same feeds; hybrid rows give "
              "onnxruntime + packed partitions and host-device copies per run.", "",
              "| model | variant | engine | disk MB | device MB (load) | constants MB | ms / feed | rel L2 | cosine "
              "| partitions | copies | kernels | data |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | {r.get('engine', '')} | error: {r['error']} ||||||||||")
            continue
        kernels = ", ".join(f"{n} {k}" for k, n in r["kernels"].items()) or "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['engine']} | {r['disk_mb']:.1f} | "
                     f"{_cell(r['device_mb'], '.1f')} | {_cell(r.get('constants_mb'), '.1f')} | {r['ms']:.2f} | "
                     f"{r['rel_l2']:.3g} | {_cell(r.get('cosine'), '.5f')} | {r.get('partitions', '-')} | "
                     f"{r.get('copies', '-')} | {kernels} | {r.get('data', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="4096x4096,1536x384", help="weight shapes KxN")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--hyper-bits", type=int, default=10, help="bits per pair of the HC kernel and models")
    parser.add_argument("--models", default="", help="zoo models: their variants built in --work first")
    parser.add_argument("--models-dir", type=Path, help="a folder --prepare made (manifest.json): run what it holds")
    parser.add_argument("--prepare", action="store_true", help="build --models into --work and stop (no device needed)")
    parser.add_argument("--budget-mb", type=float, default=54, help="with --prepare: the folder's size (a lent GPU "
                        "machine takes 64 MiB a call, the checkout included); originals first, then the variants")
    parser.add_argument("--engines", default="executor,hybrid", help="engines the models run on (runtime.hybrid)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per kernel measurement")
    parser.add_argument("--runs", type=int, default=20, help="timed feeds per model variant")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "symshrink" / "bench-gpu")
    parser.add_argument("--out", type=Path, help="markdown report (raw numbers beside it, .json)")
    args = parser.parse_args(argv)
    specs = [m for m in args.models.split(",") if m]
    if specs:
        prepare_models(specs, args.work, args.hyper_bits, int(args.budget_mb * 2**20))
    if args.prepare:
        return 0
    if args.out is None:
        parser.error("--out is required unless --prepare")
    backend = get_backend(args.device)
    timer = _timer(backend, args.repeats)
    device = device_info(backend, timer)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    folder = args.models_dir or (args.work if specs else None)
    result = {"command": " ".join(["python", "tools/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "device": device,
              "kernels": bench_kernels(backend, shapes, batches, args.hyper_bits, device, timer),
              "launch": bench_launch(backend, timer), "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after the kernels and after each model: a run stopped by its time limit keeps its rows
        args.out.write_text(render(result))
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))

    save()
    if folder:
        bench_models(backend, folder, args.engines.split(","), args.runs, result["models"], save)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
