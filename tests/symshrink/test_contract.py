"""The user's contract: no path the tool writes replaces or deletes something of the user's without --force,
never an input and never a non-regular file; a report also when the gate fails; bad input exits 2 before work."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.cli import main
from symshrink.errors import BadInput
from symshrink.modelio import load_model, save_model
from symshrink.options import CompressOptions
from symshrink.pipeline import verify
from tests.conftest import mlp_model

REPO = Path(__file__).resolve().parents[2]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _compress(model: Path, out: Path, *extra) -> list:
    gate = () if "--max-error" in extra or "--min-cosine" in extra else ("--min-cosine", "0")  # lossy on random data
    return ["compress", model, "-o", out, "--method", "ternary", "-q", *gate, *extra]


@pytest.fixture
def big_mlp(tmp_path) -> Path:
    """An MLP with weight sites (>= 4096 elements) and its calibration file."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(hidden=512, inputs=64, outputs=16), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32))
    return path


def _calib(model: Path) -> tuple[str, Path]:
    return "--calib", model.parent / "calib.npz"


def test_output_equal_to_input_is_refused_and_the_input_is_untouched(capsys, big_mlp):
    digest = _digest(big_mlp)
    for same in (big_mlp, big_mlp.parent / "." / big_mlp.name):
        for force in ((), ("--force",)):
            code, err = _run(capsys, *_compress(big_mlp, same, *_calib(big_mlp), *force))
            assert code == 2 and "is an input of this run" in err, err
    assert _digest(big_mlp) == digest


def test_existing_output_needs_force(capsys, big_mlp):
    out = big_mlp.parent / "notes.txt"
    out.write_text("mine")
    code, err = _run(capsys, *_compress(big_mlp, out, *_calib(big_mlp)))
    assert code == 2 and "give --force" in err and out.read_text() == "mine"
    assert _run(capsys, *_compress(big_mlp, out, *_calib(big_mlp), "--force"))[0] == 0
    onnx.checker.check_model(onnx.load(out))


def test_a_device_or_folder_is_never_replaced(capsys, big_mlp):
    for target in (Path(os.devnull), big_mlp.parent):
        code, err = _run(capsys, *_compress(big_mlp, target, *_calib(big_mlp), "--force"))
        assert code == 2 and "not a regular file" in err, err
    assert Path(os.devnull).is_char_device()


def test_missing_output_folder_is_refused_before_work(capsys, big_mlp):
    code, err = _run(capsys, *_compress(big_mlp, big_mlp.parent / "no" / "o.onnx", *_calib(big_mlp)))
    assert code == 2 and "folder does not exist" in err


def test_plan_out_into_the_model_or_a_missing_folder_is_refused_before_the_model_is_written(capsys, big_mlp):
    out = big_mlp.parent / "o.onnx"
    digest = _digest(big_mlp)
    for plan_out in (big_mlp, big_mlp.parent / "missing" / "plan.json", out):
        code, err = _run(capsys, *_compress(big_mlp, out, *_calib(big_mlp), "--plan-out", plan_out))
        assert code == 2, err
        assert not out.exists()
    assert _digest(big_mlp) == digest


def test_calibration_file_is_an_input(capsys, big_mlp):
    calib = big_mlp.parent / "calib.npz"
    digest = _digest(calib)
    code, err = _run(capsys, *_compress(big_mlp, calib, "--calib", calib, "--force"))
    assert code == 2 and "is an input" in err and _digest(calib) == digest


def test_run_output_equal_to_the_model_is_refused(capsys, big_mlp):
    digest = _digest(big_mlp)
    code, err = _run(capsys, "run", big_mlp, "--device", "cpu", "--random", "-o", big_mlp, "--force")
    assert code == 2 and "is an input" in err and _digest(big_mlp) == digest


def test_external_data_model_and_its_data_are_inputs(capsys, tmp_path):
    onnx.save(mlp_model(hidden=512, inputs=64, outputs=16), tmp_path / "ext.onnx", save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=np.zeros((16, 64), np.float32) + 0.5)
    before = {p.name: _digest(p) for p in tmp_path.iterdir()}
    for out in (tmp_path / "ext.onnx", tmp_path / "ext.onnx.data"):
        code, err = _run(capsys, *_compress(tmp_path / "ext.onnx", out, "--calib", tmp_path / "calib.npz", "--force"))
        assert code == 2 and "is an input" in err, err
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == before


def test_someone_elses_data_file_beside_the_output_is_kept(tmp_path):
    model, _ = load_model(_saved(tmp_path / "m.onnx"))
    theirs = tmp_path / "out.onnx.data"
    theirs.write_text("not ours")
    save_model(model, tmp_path / "out.onnx")  # embedded weights: the data file is neither used nor deleted
    assert theirs.read_text() == "not ours"
    with pytest.raises(BadInput, match="give --force"):
        save_model(model, tmp_path / "out.onnx", external_data=True)
    assert theirs.read_text() == "not ours"


def _saved(path: Path) -> Path:
    onnx.save(mlp_model(hidden=64), path)
    return path


def test_report_is_written_when_the_gate_fails(capsys, big_mlp):
    out, report = big_mlp.parent / "o.onnx", big_mlp.parent / "why.json"
    code, err = _run(capsys, *_compress(big_mlp, out, *_calib(big_mlp), "--max-error", "1e-6", "--report", report))
    assert code == 1 and "nothing written" in err
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["passed"] is False and data["failures"] and data["plans"]["ternary"]["layers"]
    assert data["diffs"][0]["rel_l2"] > 1e-6


def test_markdown_report_and_json_stdout(capsys, big_mlp):
    out, report = big_mlp.parent / "o.onnx", big_mlp.parent / "report.md"
    assert main([str(a) for a in _compress(big_mlp, out, *_calib(big_mlp), "--report", report, "--json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["passed"] and printed["bytes_after"] == out.stat().st_size
    assert "## Plan: ternary" in report.read_text()


def test_nan_in_calibration_exits_2_before_work(capsys, big_mlp):
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    x[60, 3] = np.nan  # in the held-out part
    np.savez(big_mlp.parent / "nan.npz", x=x)
    code, err = _run(capsys, *_compress(big_mlp, big_mlp.parent / "o.onnx", "--calib", big_mlp.parent / "nan.npz"))
    assert code == 2 and "NaN" in err and "'x'" in err


def test_non_finite_outputs_fail_verification_without_a_gate():
    expected = [{"y": np.ones((2, 3), np.float32)}]
    broken = [{"y": np.array([[1, np.nan, 1], [1, 1, np.inf]], np.float32)}]
    _, failures = verify(expected, broken, CompressOptions(method="moment", min_cosine=-1.0))
    assert failures and "2 NaN or infinite" in failures[0]
    assert verify(expected, expected, CompressOptions(method="moment"))[1] == []


@pytest.mark.parametrize("argv, expected", [
    (["--ridge", "-1", "--method", "moment", "--keep", "0.5"], "ridge must be non-negative"),
    (["--random-calib", "--method", "hyper", "--calib-samples", "1000000000"], "between 1 and"),
    (["--random-calib", "--method", "hyper", "--report", "r.txt"], ".json, .md or .html"),
])
def test_bad_options_exit_2(capsys, big_mlp, argv, expected):
    code, err = _run(capsys, "compress", big_mlp, "-o", big_mlp.parent / "o.onnx", "-q", *argv)
    assert code == 2 and expected in err, err


def test_open_rank_input_with_random_calibration_exits_2(capsys, tmp_path):
    model = mlp_model(hidden=64)
    model.graph.input[0].type.tensor_type.ClearField("shape")
    onnx.save(model, tmp_path / "m.onnx")
    code, err = _run(capsys, "compress", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--keep", "0.5",
                     "--random-calib", "-q")
    assert code == 2 and "no fixed rank" in err


def test_nothing_to_compress_says_why(capsys, tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    for method in ("ternary", "hyper"):
        code, err = _run(capsys, "compress", tmp_path / "relu.onnx", "-o", tmp_path / "o.onnx", "--method", method,
                         "--random-calib", "-q")
        assert code == 2 and "nothing to compress" in err, err
    assert not (tmp_path / "o.onnx").exists()


def test_int8_weights_are_nothing_to_code(capsys, tmp_path):
    weight = numpy_helper.from_array(np.ones((64, 128), np.int8), "Wq")
    nodes = [helper.make_node("Cast", ["Wq"], ["W"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 128])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "q.onnx")
    code, err = _run(capsys, "compress", tmp_path / "q.onnx", "-o", tmp_path / "o.onnx", "--method", "hyper",
                     "--random-calib", "-q")
    assert code == 2 and "nothing to compress" in err


def _cli(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "symshrink", *map(str, argv)], cwd=REPO, **kwargs)


def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "symshrink", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("symshrink ")


def test_closed_stdout_is_not_an_error(big_mlp):
    process = _cli("inspect", "--all", big_mlp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader went away, as `| head -0` does
    assert process.wait(timeout=120) == 0
    assert process.stderr.read() == b""


SLOW_SAVE = """
import sys, time, onnx_ir
from symshrink.cli import main
from symshrink.errors import BadInput
real = onnx_ir.save
def slow(model, path, **kw):
    real(model, path, **kw)
    print("WRITING", flush=True)
    time.sleep(60)
onnx_ir.save = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_write_leaves_no_file(big_mlp):
    folder = big_mlp.parent
    before = sorted(p.name for p in folder.iterdir())
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *map(str, _compress(big_mlp, folder / "o.onnx",
                                                                                     *_calib(big_mlp)))],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    for line in process.stdout:  # the staged model is on disk, not yet renamed into place
        if "WRITING" in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in folder.iterdir()) == before  # no output, no staging folder


def test_staging_folder_of_a_killed_run_is_swept(big_mlp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = big_mlp.parent / f".o.onnx.symshrink-{dead.pid}.abcd_123"
    stale.mkdir()
    (stale / "o.onnx").write_bytes(b"partial")
    assert main([str(a) for a in _compress(big_mlp, big_mlp.parent / "o.onnx", *_calib(big_mlp))]) == 0
    assert not stale.exists() and (big_mlp.parent / "o.onnx").exists()


def test_random_feeds_win_over_a_zoo_models_default_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SYMSHRINK_FMNIST_DIR", str(tmp_path / "no-data-here"))  # as on a machine without the package
    out = tmp_path / "t.onnx"
    assert main(["compress", "fmnist-mlp", "-o", str(out), "--method", "ternary", "--random-calib", "--min-cosine", "0",
                 "-q"]) == 0
    assert main(["diff", "fmnist-mlp", str(out), "--random", "--samples", "2"]) == 0
    capsys.readouterr()


def test_two_outputs_through_dotdot_or_a_symlinked_folder_are_one_file(capsys, big_mlp):
    folder = big_mlp.parent
    (folder / "d").mkdir()
    (folder / "link").symlink_to(folder)
    out = folder / "o.onnx"
    for plan_out in (folder / "d" / ".." / "o.onnx", folder / "link" / "o.onnx"):
        code, err = _run(capsys, *_compress(big_mlp, out, *_calib(big_mlp), "--plan-out", plan_out))
        assert code == 2 and "same file" in err, err
    assert not out.exists()


def test_files_in_a_calibration_folder_are_inputs(capsys, big_mlp):
    folder = big_mlp.parent / "calib"
    folder.mkdir()
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    digest = _digest(folder / "x.npy")
    code, err = _run(capsys, *_compress(big_mlp, big_mlp.parent / "o.onnx", "--calib", folder,
                                        "--plan-out", folder / "x.npy", "--force"))
    assert code == 2 and "is an input" in err and _digest(folder / "x.npy") == digest


def test_an_input_external_data_file_is_never_the_outputs_data(capsys, tmp_path):
    onnx.save(mlp_model(hidden=512, inputs=64, outputs=16), tmp_path / "v1.onnx", save_as_external_data=True,
              location="model.onnx.data", size_threshold=0)  # an export renamed later: its data keeps the old name
    np.savez(tmp_path / "calib.npz", x=np.zeros((16, 64), np.float32) + 0.5)
    digest = _digest(tmp_path / "model.onnx.data")
    code, err = _run(capsys, *_compress(tmp_path / "v1.onnx", tmp_path / "model.onnx", "--calib",
                                        tmp_path / "calib.npz", "--force"))
    assert code == 2 and "external data file" in err and _digest(tmp_path / "model.onnx.data") == digest


def test_the_sweep_leaves_what_is_not_a_staging_folder_of_a_dead_run(big_mlp):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = big_mlp.parent
    keep = [folder / f".o.onnx.symshrink-{dead.pid}.abcdefgh-mine",  # not the staging name
            folder / f".o.onnx.symshrink-{dead.pid}.notmine1",  # holds something else
            folder / ".o.onnx.symshrink-99999999999999999999.abcdefgh"]  # no such pid
    for path in keep:
        path.mkdir()
    (keep[1] / "thesis.tex").write_text("mine")
    assert main([str(a) for a in _compress(big_mlp, folder / "o.onnx", *_calib(big_mlp))]) == 0
    assert all(path.exists() for path in keep)


def test_a_closed_pipe_keeps_the_gates_exit_code(big_mlp, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(mlp_model(hidden=512, inputs=64, outputs=16, seed=5), other)
    process = _cli("diff", big_mlp, other, "--random", "--max-error", "0", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.stdout.close()
    assert process.wait(timeout=120) == 1
    assert b"Traceback" not in process.stderr.read()
