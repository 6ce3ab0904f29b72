"""Compression at scale: wall time and peak memory of symshrink and of onnxruntime's MatMulNBits quantizer on
synthetic external-data models of growing size, each job in its own process (peak = that process's VmHWM).

    python tools/bench_scale.py --sizes 0.1,0.5,2.5 --work /tmp/scale --out docs/benchmarks-scale.md
    python tools/bench_scale.py --sizes 8 --dtype float16 --work /tmp/scale --out docs/benchmarks-scale.md --merge

A model of S GB is a residual stack x + W2 relu(W1 x) (d = 2048 -> 8192 -> 2048; d = 1024 -> 4096 below 0.5 GB),
input [128, d], weights random (seeded) and written tensor by tensor to one external data file. Calibration: 16
random feeds (2048 rows). Jobs: `symshrink-stream` (--method quant --bits 4 --block-size 32 --stream, second-moment
rounding), `symshrink-stream-rtn` (the same, --rounding nearest), `symshrink-whole` (the whole-model path, small
models only), `ort-nbits4-rtn` (MatMulNBitsQuantizer, 4 bits, blocks of 32, symmetric: round to nearest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
SAMPLES, ROWS = 16, 128
JOBS = ("symshrink-stream", "symshrink-stream-rtn", "symshrink-whole", "ort-nbits4-rtn")
WHOLE_MAX_GB = 0.6  # the whole-model path needs several copies of the model: run it on small ones only


def shape_for(size_gb: float) -> tuple[int, int]:
    return (1024, 4096) if size_gb < 0.5 else (2048, 8192)


def build_model(path: Path, size_gb: float, dtype: str, seed: int = 0) -> int:
    """A residual MLP stack of about `size_gb` GB of weights, written layer by layer to `<path>.data`; its bytes."""
    d, hidden = shape_for(size_gb)
    np_dtype, elem = (np.float16, TensorProto.FLOAT16) if dtype == "float16" else (np.float32, TensorProto.FLOAT)
    layer_bytes = 2 * d * hidden * np.dtype(np_dtype).itemsize
    layers = max(1, round(size_gb * 1e9 / layer_bytes))
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    nodes, inits, x, offset = [], [], "x", 0
    with open(path.parent / data_name, "wb") as data:
        for i in range(layers):
            for name, shape, std in ((f"W1_{i}", (d, hidden), 1 / np.sqrt(d)),
                                     (f"W2_{i}", (hidden, d), 1 / np.sqrt(hidden * layers))):
                array = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np_dtype)
                data.write(array.tobytes())
                tensor = TensorProto(name=name, dims=list(shape), data_type=elem, data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                    tensor.external_data.add(key=key, value=value)
                inits.append(tensor)
                offset += array.nbytes
                del array
            nodes += [helper.make_node("MatMul", [x, f"W1_{i}"], [f"h{i}"], name=f"up{i}"),
                      helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
                      helper.make_node("MatMul", [f"r{i}", f"W2_{i}"], [f"d{i}"], name=f"down{i}"),
                      helper.make_node("Add", [x, f"d{i}"], [f"x{i}"], name=f"res{i}")]
            x = f"x{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", elem, [ROWS, d])],
                              [helper.make_tensor_value_info("y", elem, [ROWS, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return offset


def _peak_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def worker(job: str, model: Path, out: Path) -> dict:
    """Run one job in this process; its wall time and peak resident memory."""
    start = time.perf_counter()
    if job.startswith("symshrink"):
        from symshrink.cli import main  # noqa: PLC0415

        argv = ["compress", str(model), "-o", str(out), "--method", "quant", "--bits", "4", "--block-size", "32",
                "--random-calib", "--calib-samples", str(SAMPLES), "--min-cosine", "0.5", "-q", "--force",
                "--stream" if "stream" in job else "--no-stream"]
        if job.endswith("rtn"):
            argv += ["--rounding", "nearest"]
        code = main(argv)
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq  # noqa: PLC0415

        proto = onnx.load(str(model))
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=4)
        quantizer = mnq.MatMulNBitsQuantizer(proto, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=True)
        code = 0
    wall = time.perf_counter() - start
    files = [out, out.with_name(out.name + ".data")]
    return {"job": job, "code": code, "wall_s": wall, "peak_bytes": _peak_kb() * 1024,
            "out_bytes": sum(f.stat().st_size for f in files if f.exists())}


def run_job(job: str, model: Path, out: Path) -> dict:
    """One job in a fresh process (its own peak)."""
    command = [sys.executable, __file__, "--worker", job, str(model), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(REPO)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"job": job, "code": done.returncode, "error": tail[:200]}
    return json.loads(lines[-1])


def machine() -> str:
    from bench import machine_info  # noqa: PLC0415 (tools/bench.py; not in the workers, whose peaks are measured)

    info = machine_info()
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    return f"{info['cores']} cores ({info['cpu']}), {memory:.0f} GiB, onnxruntime {info['onnxruntime']}"


def site_times(shapes: list[tuple[int, int]], rows: int = SAMPLES * ROWS) -> list[dict]:
    """Per weight site K x N: seconds to accumulate the input moments of `rows` rows, to code the site with
    second-moment rounding and to nearest (4 bits, blocks of 32), each with its calibrated output error."""
    from symshrink.calibration.stats import UnitStats  # noqa: PLC0415
    from symshrink.passes.quant.grid import encode_grid  # noqa: PLC0415

    rng, found = np.random.default_rng(0), []
    for k, n in shapes:
        weight = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k))
        stats, start = UnitStats(k), time.perf_counter()
        for _ in range(rows // ROWS):
            stats.add(rng.standard_normal((ROWS, k), dtype=np.float32))
        moments = time.perf_counter() - start
        times = {}
        for rounding in ("feedback", "nearest"):
            start = time.perf_counter()
            encode_grid(weight, stats, 32, 4, rounding, symmetric=True)
            times[rounding] = time.perf_counter() - start
        found.append({"K": k, "N": n, "moments_s": moments, "feedback_s": times["feedback"], "nearest_s": times["nearest"]})
        print(json.dumps(found[-1]), flush=True)
    return found


def site_table(sites: list[dict]) -> str:
    lines = [f"| site K x N | moments of {SAMPLES * ROWS} rows, s | second-moment rounding, s | to nearest, s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {s['K']} x {s['N']} | {s['moments_s']:.1f} | {s['feedback_s']:.1f} | {s['nearest_s']:.1f} |"
              for s in sites]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | job | wall s | peak RSS | peak / weights | output | time vs ORT |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['weights'] / 1e9:.2f} GB | {row['job']} | failed: {row['error']} "
                         "| | | | |")
            continue
        ort = next((r for r in rows if r["model"] == row["model"] and r["job"] == "ort-nbits4-rtn" and "error" not in r),
                   None)
        ratio = f"{row['wall_s'] / ort['wall_s']:.1f}x" if ort else ""
        lines.append(f"| {row['model']} | {row['weights'] / 1e9:.2f} GB | {row['job']} | {row['wall_s']:.0f} | "
                     f"{row['peak_bytes'] / 1e9:.2f} GB | {row['peak_bytes'] / row['weights']:.2f}x | "
                     f"{row['out_bytes'] / 1e9:.3f} GB | {ratio} |")
    return "\n".join(lines)


def write(out: Path, saved: Path, rows: list[dict], sites: list[dict]) -> None:
    saved.write_text(json.dumps({"machine": machine(), "rows": rows, "sites": sites}, indent=1))
    out.write_text(f"# Compression at scale\n\nMeasured by `tools/bench_scale.py` ({' '.join(sys.argv[1:])}) on "
                   f"{machine()}; each job in its own process, peak = its VmHWM.\n\n{table(rows)}\n"
                   + (f"\nSingle sites (4 bits, blocks of 32, in this process):\n\n{site_table(sites)}\n" if sites else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("JOB", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="0.1,0.5,2.5", help="model sizes in GB, comma-separated")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--work", default="/tmp/symshrink-scale")
    parser.add_argument("--out", default="docs/benchmarks-scale.md")
    parser.add_argument("--merge", action="store_true", help="add to the rows already in OUT's .json")
    parser.add_argument("--sites", default="", help="also time single sites KxN,KxN (e.g. 4096x11008)")
    args = parser.parse_args()
    if args.worker:
        job, model, out = args.worker
        print(json.dumps(worker(job, Path(model), Path(out))), flush=True)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    saved = out.with_suffix(".json")
    previous = json.loads(saved.read_text()) if args.merge and saved.exists() else {}
    rows, sites = previous.get("rows", []), previous.get("sites", [])
    if args.sites:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.sites.split(",")]
        sites = [s for s in sites if (s["K"], s["N"]) not in shapes] + site_times(shapes)
        write(out, saved, rows, sites)
    for size in (float(s) for s in args.sizes.split(",")):
        name = f"mlp-{size:g}gb-{args.dtype}"
        model = work / f"{name}.onnx"
        weights = build_model(model, size, args.dtype)
        print(f"{name}: {weights / 1e9:.2f} GB of weights", flush=True)
        for job in args.jobs.split(","):
            if job == "symshrink-whole" and size > WHOLE_MAX_GB:
                continue
            row = {"model": name, "weights": weights, **run_job(job, model, work / f"{name}-{job}.onnx")}
            rows = [r for r in rows if (r["model"], r["job"]) != (name, job)] + [row]
            print(json.dumps(row), flush=True)
            for leftover in work.glob(f"{name}-{job}.onnx*"):
                leftover.unlink()
            write(out, saved, rows, sites)
        for leftover in work.glob(f"{name}.onnx*"):
            leftover.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
