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
    out, work = tmp_path / "gpu.md", tmp_path / "work"
    tool = _tool()
    assert tool.main(["--models", "fmnist-mlp", "--work", str(work), "--prepare", "--budget-mb", "4"]) == 0
    manifest = json.loads((work / "manifest.json").read_text())["fmnist-mlp"]
    assert set(manifest["variants"]) == {"ternary", "hyper-b10", "grid-4bit", "grid-2bit"} and manifest["fp32"]
    assert sum(f.stat().st_size for f in work.iterdir()) <= 4 * 2**20
    assert tool.main(["--device", "cpu", "--shapes", "64x32", "--batches", "1,5", "--models-dir", str(work),
                      "--repeats", "2", "--runs", "2", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    kernels = {(r["kernel"], r["batch"]) for r in result["kernels"]}
    assert kernels == {(k, b) for k in tool.KERNEL_KINDS for b in (1, 5)}
    rows = {(r["variant"], r["engine"]): r for r in result["models"]}
    assert set(rows) == {(v, e) for v in ("fp32", *manifest["variants"]) for e in ("executor", "hybrid")}
    assert not any("error" in r for r in rows.values())
    assert rows["fp32", "executor"]["rel_l2"] < 1e-5 and rows["ternary", "executor"]["kernels"] == {"ternary_matmul": 2}
    assert rows["hyper-b10", "hybrid"]["kernels"] == {"hyper_matmul": 2} and rows["hyper-b10", "hybrid"]["rel_l2"] < 0.1
    assert rows["hyper-b10", "hybrid"]["partitions"] == "2+2" and rows["hyper-b10", "hybrid"]["copies"] == 0
    assert "| fmnist-mlp | hyper-b10 | hybrid |" in out.read_text()


def test_prepare_leaves_out_what_the_budget_does_not_hold(tmp_path):
    """A budget below the original's 2.1 MB: the variants go in, the original does not, and says why."""
    work = tmp_path / "work"
    assert _tool().main(["--models", "fmnist-mlp", "--work", str(work), "--prepare", "--budget-mb", "1.5"]) == 0
    manifest = json.loads((work / "manifest.json").read_text())["fmnist-mlp"]
    assert manifest["fp32"] is None and "budget" in manifest["errors"]["fp32"]
    assert sum(f.stat().st_size for f in work.iterdir()) <= 1.5 * 2**20
