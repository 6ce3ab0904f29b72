"""`symshrink sweep` on a small inline MLP: one real model a point, measured on the held-out feeds beside
onnxruntime's quantizers; the table, JSON and PNG written; bad budgets and an occupied folder refused."""

import json

import numpy as np
import onnx
import pytest

from symshrink.cli import main
from symshrink.errors import BadInput
from symshrink.options import CompressOptions
from symshrink.sweep import sweep
from tests.conftest import mlp_model


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(hidden=256, inputs=64, outputs=32, seed=2), path)
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((320, 64)).astype(np.float32))
    return path, calib


def test_sweep_points_are_real_models_smaller_as_the_budget_widens(mlp, tmp_path):
    path, calib = mlp
    out, before = tmp_path / "sweep", path.read_bytes()
    points = sweep(str(path), out, CompressOptions(calib=str(calib), progress=False), cosines=(0.95, 0.999),
                   baselines=("nbits8",))
    names = [p.name for p in points]
    assert names == ["fp32", "alloc-c0.95", "alloc-c0.999", "nbits8"] and not any(p.error for p in points)
    loose, strict = points[1], points[2]
    assert loose.cosine >= 0.95 and strict.cosine >= 0.999  # each within its own budget, measured
    assert loose.bytes < strict.bytes < points[0].bytes
    for p in points[1:]:
        assert (out / f"{p.name}.onnx").stat().st_size <= p.bytes  # the model on disk is the point
    data = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in data["points"]] == names
    assert "| alloc-c0.95 |" in (out / "sweep.md").read_text() and (out / "sweep.png").stat().st_size > 1000
    assert path.read_bytes() == before  # the input stays as it was


def test_sweep_refuses_an_occupied_folder_and_bad_budgets(mlp, tmp_path, capsys):
    path, calib = mlp
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["sweep", str(path), "-o", str(tmp_path / "full"), "--calib", str(calib), "-q"]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["sweep", str(path), "-o", str(tmp_path / "a"), "--calib", str(calib), "--cosines", "1.5", "-q"]) == 2
    assert main(["sweep", str(path), "-o", str(tmp_path / "b"), "--calib", str(calib), "--baselines", "gptq", "-q"]) == 2
    assert "unknown gptq" in capsys.readouterr().err
    with pytest.raises(BadInput, match="budgets in"):
        sweep(str(path), tmp_path / "c", CompressOptions(calib=str(calib), progress=False), cosines=())
