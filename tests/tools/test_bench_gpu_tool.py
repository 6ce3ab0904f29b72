"""tools/bench_gpu.py end to end on the CPU backend (the numpy references): every kernel and variant row is
there and the compressed variants run their kernels. A smoke test of the tool; its timings mean nothing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_gpu.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_runs_on_the_cpu_backend(tmp_path):
    out = tmp_path / "gpu.md"
    assert _tool().main(["--device", "cpu", "--shapes", "64x32", "--batches", "1,5", "--models", "fmnist-mlp",
                         "--repeats", "2", "--runs", "2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    kernels = {(r["kernel"], r["batch"]) for r in result["kernels"]}
    assert kernels == {(k, b) for k in ("dense", "ternary_matmul", "hyper_matmul") for b in (1, 5)}
    rows = {r["variant"]: r for r in result["models"]}
    assert set(rows) == {"fp32", "ternary", "hyper-b10"} and not any("error" in r for r in rows.values())
    assert rows["fp32"]["rel_l2"] < 1e-5 and rows["ternary"]["kernels"] == {"ternary_matmul": 2}
    assert rows["hyper-b10"]["kernels"] == {"hyper_matmul": 2} and rows["hyper-b10"]["rel_l2"] < 0.1
    assert "| fmnist-mlp | hyper-b10 |" in out.read_text()
