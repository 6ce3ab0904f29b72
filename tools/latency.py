"""Batch-1 latency of several ONNX files side by side, robust to a machine whose speed drifts.

Each round times every file in its own block (a pause, warm-up runs, then `--runs` timed runs) in turn, for
`--rounds` rounds, so drift lands on every file alike; the table gives the median and quartiles over all rounds
and the ratio of medians to the first file. Feeds are seeded standard normals in each input's shape (dynamic
dimensions 1): latency here does not depend on the values. onnxruntime's CPU provider, `--threads` intra-op
threads, spinning off so that idle sessions do not steal the timed one's cores.

    python tools/latency.py fp32.onnx a.onnx b.onnx --rounds 8 --runs 60
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feed(sess: ort.InferenceSession, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {i.name: [d if isinstance(d, int) else 1 for d in i.shape] for i in sess.get_inputs()}
    return {i.name: rng.standard_normal(shapes[i.name]).astype(TYPES[i.type]) for i in sess.get_inputs()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=60, help="timed runs per file and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of rest before each block")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sessions = {path: session(path, args.threads) for path in args.models}
    feeds = {path: feed(sess, 0) for path, sess in sessions.items()}
    times: dict[Path, list[float]] = {path: [] for path in sessions}
    for _ in range(args.rounds):
        for path, sess in sessions.items():
            time.sleep(args.pause)
            for _ in range(args.warmup):
                sess.run(None, feeds[path])
            for _ in range(args.runs):
                start = time.perf_counter()
                sess.run(None, feeds[path])
                times[path].append(time.perf_counter() - start)
    first = float(np.median(times[args.models[0]]))
    print(f"{args.rounds} rounds x {args.runs} runs, {args.threads} threads\n")
    print("| model | median ms | p25 ms | p75 ms | vs first |\n|---|---:|---:|---:|---:|")
    for path, values in times.items():
        ms = np.asarray(values) * 1e3
        print(f"| {path.name} | {np.median(ms):.3f} | {np.percentile(ms, 25):.3f} | {np.percentile(ms, 75):.3f} "
              f"| {np.median(ms) / first / 1e3:.2f}x |")


if __name__ == "__main__":
    main()
