"""Benchmarks of the GPU runtime: each kernel against the device's roofline, and zoo models end to end.

    python tools/bench_gpu.py --device cuda --out docs/benchmarks-gpu.md

Kernels: the ternary (2-bit) and hyperfunction (--hyper-bits per pair) matmuls and the dense fp32 product
(cuBLAS through CuPy), for each weight shape KxN in --shapes and each batch M in --batches. GPU time from
CUDA events (cupyx.profiler.benchmark), with the weights rotated over enough copies to overflow the L2 cache.
Bandwidth counts the bytes a call must move (weights, x, the slices' partials written and read, y); FLOP/s
counts 2 M K N. Both are shown against the device-to-device copy bandwidth measured in the same run and
against the nominal peaks the driver reports.
Models: fp32, ternary and HC variants of each zoo model in --models on the symshrink runtime: median latency
of one feed, device memory (constants after load; pool peak after the runs), output relative L2 against the
original in onnxruntime; beside them the original on onnxruntime's CUDA provider where it is installed.
A variant that fails becomes a row with its one-line error.
--device cpu runs the same code on the numpy references: a smoke test whose timings say nothing of a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import compress_symshrink, machine_info, one_line

from symshrink.calibration.feeds import load_feeds
from symshrink.modelio import load_model
from symshrink.models.registry import cache_dir, get_model
from symshrink.runtime.backend import Backend, get_backend
from symshrink.runtime.diff import compare_outputs
from symshrink.runtime.executor import Executor
from symshrink.runtime.kernels import KERNELS, hyper, ternary
from symshrink.runtime.kernels.launch import launch_config
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


def _timer(backend: Backend, repeats: int) -> Callable[[Callable[[], Any]], float]:
    """Seconds per call: CUDA events on a GPU, the wall clock on the CPU."""
    if backend.name == "cuda":
        from cupyx.profiler import benchmark  # noqa: PLC0415

        return lambda call: float(np.median(benchmark(call, n_repeat=repeats, n_warmup=3).gpu_times[0]))
    return lambda call: _wall_seconds(call, repeats)


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
    seconds = timer(lambda: cupy.copyto(target, source))
    return {"name": name, "sms": sms, "l2": attributes.get("L2CacheSize", 0), "peak_gbs": peak_gbs,
            "peak_gflops": peak_gflops, "copy_gbs": 2 * source.nbytes / seconds / GB}


def _weights(kind: str, depth: int, cols: int, bits: int, rng: np.random.Generator):
    """A random weight in each format (kernel time does not depend on the values)."""
    if kind == "ternary_matmul":
        codes = rng.integers(-1, 2, size=(depth, cols)).astype(np.int8)
        return ternary.ternary_weight(codes, rng.uniform(0.5, 1.5, (-(-depth // TERNARY_BLOCK), cols)).astype(np.float32),
                                      TERNARY_BLOCK)
    if kind == "hyper_matmul":
        packed = rng.integers(0, 256, size=(depth * cols // 16, bits), dtype=np.uint8)
        return hyper.HyperWeight(packed, rng.standard_normal((1 << bits, 2)).astype(np.float32),
                                 np.array([[0.1, -0.1, 2.0]], np.float32), len(packed), bits, depth, cols)
    return rng.standard_normal((depth, cols)).astype(np.float32)


def _moved_bytes(kind: str, weight, rows_x: int, depth: int, cols: int, target_blocks: int) -> int:
    activations = 4 * rows_x * (depth + cols)
    if kind == "dense":
        return weight.nbytes + activations
    slices = launch_config(rows_x, depth, -(-cols // 16), target_blocks).slices
    return weight.nbytes + activations + 2 * 4 * slices * rows_x * cols


def _rotating(timer, run: Callable, x, weights: list) -> float:
    """Seconds per call of run(x, w), each call on the next copy of the weight (none still in L2)."""
    turn = iter(range(10**9))
    return timer(lambda: run(x, weights[next(turn) % len(weights)]))


def bench_kernels(backend: Backend, shapes: list[tuple[int, int]], batches: list[int], bits: int, device: dict,
                  timer) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    target_blocks = 4 * device.get("sms", 1)
    rows = []
    for depth, cols in shapes:
        for kind in ("dense", "ternary_matmul", "hyper_matmul"):
            weight = _weights(kind, depth, cols, bits, rng)
            copies = max(1, min(64, math.ceil(3 * device["l2"] / weight.nbytes))) if device["l2"] else 1
            placed = [backend.to_device(weight) if kind == "dense" else weight.to(backend, {}) for _ in range(copies)]
            run = (lambda x, w: x @ w) if kind == "dense" else (
                KERNELS[kind].cuda if backend.name == "cuda" else KERNELS[kind].reference)
            for rows_x in batches:
                x = backend.to_device(rng.standard_normal((rows_x, depth)).astype(np.float32))
                seconds = _rotating(timer, run, x, placed)
                moved = _moved_bytes(kind, weight, rows_x, depth, cols, target_blocks)
                gbs, gflops = moved / seconds / GB, 2 * rows_x * depth * cols / seconds / GB
                rows.append({"kernel": kind, "shape": f"{depth}x{cols}", "batch": rows_x, "us": seconds * 1e6,
                             "weight_bytes": weight.nbytes, "moved_bytes": moved, "gbs": gbs, "gflops": gflops,
                             "of_copy": gbs / device["copy_gbs"] if device["copy_gbs"] else None,
                             "of_peak_bw": gbs / device["peak_gbs"] if device["peak_gbs"] else None,
                             "of_peak_flops": gflops / device["peak_gflops"] if device["peak_gflops"] else None})
            del placed
    return rows


def _variants(spec: str, work: Path, bits: int) -> dict[str, Path]:
    """fp32 and the compressed variants of a zoo model, built on the CPU."""
    entry = get_model(spec)
    original = Path(entry.materialise(cache_dir()))
    paths = {"fp32": original}
    settings = {"ternary": {"method": "ternary"},
                f"hyper-b{bits}": {"method": "hyper", "index_bits": (bits,), "tensor_error": None}}
    for name, options in settings.items():
        out = work / f"{spec}-{name}.onnx"
        if not out.exists():
            compress_symshrink(spec, entry, out, threads=None, **options)
        paths[name] = out
    return paths


def bench_models(backend: Backend, specs: list[str], work: Path, bits: int, runs: int) -> list[dict[str, Any]]:
    rows = []
    for spec in specs:
        entry = get_model(spec)
        try:
            paths = _variants(spec, work, bits)
        except Exception as err:  # noqa: BLE001 (one row with the reason, the run goes on)
            rows.append({"model": spec, "variant": "all", "error": one_line(err)})
            continue
        session = make_session(paths["fp32"])
        feeds = load_feeds(entry.calib, input_specs(session), "eval", 8)
        reference = run_all(session, feeds)
        if backend.name == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            rows.append(_onnxruntime_cuda(spec, paths["fp32"], feeds, reference, runs))
        for variant, path in paths.items():
            row: dict[str, Any] = {"model": spec, "variant": variant, "disk_mb": path.stat().st_size / 1e6}
            try:
                row |= _run_variant(backend, path, feeds, reference, runs)
            except Exception as err:  # noqa: BLE001
                row["error"] = one_line(err)
            rows.append(row)
    return rows


def _onnxruntime_cuda(spec: str, path: Path, feeds: list[dict], reference: list[dict], runs: int) -> dict[str, Any]:
    """The user's own fp32 baseline on the GPU: onnxruntime's CUDA execution provider (its memory is its arena's)."""
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    outputs = run_all(session, feeds)
    seconds = _wall_seconds(lambda: session.run(None, feeds[0]), runs)
    return {"model": spec, "variant": f"fp32 onnxruntime ({session.get_providers()[0]})",
            "disk_mb": path.stat().st_size / 1e6, "ms": 1e3 * seconds, "device_mb": None,
            "peak_mb": None, "rel_l2": compare_outputs(reference, outputs)[0].rel_l2, "kernels": {},
            "function_bodies": {}}


def _run_variant(backend: Backend, path: Path, feeds: list[dict], reference: list[dict], runs: int) -> dict[str, Any]:
    pool = backend.xp.get_default_memory_pool() if backend.name == "cuda" else None
    if pool is not None:
        pool.free_all_blocks()
    model, _ = load_model(path)
    executor = Executor(model, backend)
    loaded = pool.used_bytes() if pool is not None else executor.summary().constant_bytes
    outputs = [executor.run(feed) for feed in feeds]
    diff = compare_outputs(reference, outputs)[0]
    seconds = _wall_seconds(lambda: executor.run(feeds[0]), runs)  # outputs come back to the host
    summary = executor.summary()
    return {"ms": 1e3 * seconds, "device_mb": loaded / 1e6,
            "peak_mb": pool.total_bytes() / 1e6 if pool is not None else None, "rel_l2": diff.rel_l2,
            "kernels": summary.kernels, "function_bodies": summary.function_calls}


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def render(result: dict[str, Any]) -> str:
    device, machine = result["device"], result["machine"]
    lines = [f"# GPU runtime benchmarks ({device['name']})", "",
             f"Command: `{result['command']}`; commit {machine['commit']}, {machine['date']}; CPU {machine['cpu']}.",
             f"Device: {device['name']}; copy bandwidth measured here {_cell(device['copy_gbs'], '.0f')} GB/s; nominal "
             f"peaks {_cell(device['peak_gbs'], '.0f')} GB/s, {_cell(device['peak_gflops'], '.0f')} GFLOP/s fp32.", "",
             "## Kernels", "",
             "| kernel | K x N | batch | us | weight MB | GB/s | of copy | of peak BW | GFLOP/s | of peak FLOP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["kernels"]:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['batch']} | {r['us']:.1f} | {r['weight_bytes'] / 1e6:.2f} | "
                     f"{r['gbs']:.0f} | {_cell(r['of_copy'], '.2f')} | {_cell(r['of_peak_bw'], '.2f')} | {r['gflops']:.0f} | "
                     f"{_cell(r['of_peak_flops'], '.3f')} |")
    lines += ["", "## Models on the symshrink runtime", "",
              "| model | variant | disk MB | device MB (load) | pool peak MB | ms / feed | rel L2 vs fp32 (onnxruntime) "
              "| kernels |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error']} |||||")
            continue
        kernels = ", ".join(f"{n} {k}" for k, n in r["kernels"].items()) or "-"
        lines.append(f"| {r['model']} | {r['variant']} | {r['disk_mb']:.1f} | {_cell(r['device_mb'], '.1f')} | "
                     f"{_cell(r['peak_mb'], '.1f')} | {r['ms']:.2f} | {r['rel_l2']:.3g} | {kernels} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", default="4096x4096,1536x384", help="weight shapes KxN")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--hyper-bits", type=int, default=10, help="bits per pair of the HC kernel and models")
    parser.add_argument("--models", default="minilm-l6,smollm2-135m")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per kernel measurement")
    parser.add_argument("--runs", type=int, default=20, help="timed feeds per model variant")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "symshrink" / "bench-gpu")
    parser.add_argument("--out", type=Path, required=True, help="markdown report (raw numbers beside it, .json)")
    args = parser.parse_args(argv)
    backend = get_backend(args.device)
    timer = _timer(backend, args.repeats)
    device = device_info(backend, timer)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",") if b]
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(["python", "tools/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "device": device,
              "kernels": bench_kernels(backend, shapes, batches, args.hyper_bits, device, timer),
              "models": bench_models(backend, [m for m in args.models.split(",") if m], args.work, args.hyper_bits,
                                     args.runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
