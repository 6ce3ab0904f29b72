"""Faults during a run (issue 18, part 5): SIGTERM and SIGKILL in every phase, a full disk and a file size limit,
and byte-identical output. The faults are made deterministic without hooks in the product: a `python -c` harness
wraps the phase's function so that the process signals itself when the phase starts, then runs the CLI."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from symshrink.cli import main
from symshrink.modelio import STAGING_TAG

REPO = Path(__file__).resolve().parents[2]
ARGS = ("--method", "quant", "--bits", "4", "--random-calib", "--min-cosine", "0", "-q")


def _with_data(args: tuple[str, ...], calib: Path) -> tuple[str, ...]:
    """The arguments with a calibration file instead of random inputs (whose warning would be a second line)."""
    return tuple(a for a in args if a != "--random-calib") + ("--calib", str(calib))

HARNESS = r"""
import os, resource, signal, sys
import onnx_ir
import symshrink.modelio as modelio
import symshrink.pipeline as pipeline
from symshrink.cli import main

phase, action, *argv = sys.argv[1:]


def fault():
    if action == "limit":  # from here on no file may grow past 4 KiB (SIGXFSZ is ignored: writes fail with EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    else:
        os.kill(os.getpid(), getattr(signal, action))


def at_start(function):
    def wrapped(*args, **kwargs):
        fault()
        return function(*args, **kwargs)
    return wrapped


class PartlyWritten:
    # onnx_ir as symshrink.modelio sees it (the sessions' temporary copies keep the real save): the staged model
    # is half written, then the fault
    def __getattr__(self, name):
        return getattr(onnx_ir, name)

    @staticmethod
    def save(model, path, **kwargs):
        if action != "limit":
            data = onnx_ir.to_proto(model).SerializeToString()
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.fsync(handle.fileno())
        fault()
        return onnx_ir.save(model, path, **kwargs)


if phase == "calibration":
    pipeline._input_moments = at_start(pipeline._input_moments)
elif phase == "rewrite":
    pipeline._write_choice = at_start(pipeline._write_choice)
elif phase == "verification":
    pipeline.verify = at_start(pipeline.verify)
elif phase == "save":
    modelio.ir = PartlyWritten()
elif phase != "none":
    raise SystemExit("unknown phase " + phase)
sys.exit(main(argv))
"""

PHASES = ("calibration", "rewrite", "verification", "save")


def mlp(hidden: int = 256) -> onnx.ModelProto:
    """x[?, 64] -> MatMul (64 x hidden) -> Relu -> MatMul (hidden x 16) -> y: two weight sites."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((64, hidden)) / 8).astype(np.float32), "W1"),
               numpy_helper.from_array((rng.standard_normal((hidden, 16)) / 16).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, bytes]:
    """The model, and the bytes an undisturbed run writes for it."""
    folder = tmp_path_factory.mktemp("reference")
    onnx.save(mlp(), folder / "m.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32))
    assert main(["compress", str(folder / "m.onnx"), "-o", str(folder / "out.onnx"), *ARGS]) == 0
    return folder / "m.onnx", (folder / "out.onnx").read_bytes()


@pytest.fixture
def job(tmp_path, reference) -> tuple[Path, Path, dict]:
    """A folder holding a copy of the model; the output path; the environment of a child run (its own TMPDIR)."""
    model = tmp_path / "work" / "m.onnx"
    model.parent.mkdir()
    model.write_bytes(reference[0].read_bytes())
    (model.parent / "calib.npz").write_bytes((reference[0].parent / "calib.npz").read_bytes())
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp")}
    return model, model.parent / "out.onnx", env


def _harness(phase: str, action: str, model: Path, out: Path, env: dict, preexec=None,
             args: tuple[str, ...] = ARGS) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-c", HARNESS, phase, action, "compress", str(model), "-o", str(out), *args]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180, preexec_fn=preexec)


def _temporaries(tmpdir: Path) -> list[str]:
    """What is left in a child run's TMPDIR (not `.ses`, which a compiled library writes there at import)."""
    return [name for name in _listing(tmpdir) if name != ".ses"]


def _staging(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*{STAGING_TAG}*"))


@pytest.mark.parametrize("phase", PHASES)
def test_sigterm_in_every_phase_leaves_nothing(phase: str, job) -> None:
    model, out, env = job
    digest, before = _digest(model), _listing(model.parent)
    done = _harness(phase, "SIGTERM", model, out, env)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and _digest(model) == digest
    assert _listing(model.parent) == before  # no staging folder, no partial file
    assert _temporaries(Path(env["TMPDIR"])) == []  # the temporary sessions' copies are gone too


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_in_every_phase_then_the_next_run_sweeps_and_writes(phase: str, job, reference) -> None:
    model, out, env = job
    digest = _digest(model)
    done = _harness(phase, "SIGKILL", model, out, env)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists() and _digest(model) == digest
    left = _staging(model.parent)
    if phase == "save":  # killed mid-write: the staged model, half written, is still in its staging folder
        assert len(left) == 1 and [p.name for p in left[0].iterdir()] == [out.name]
    else:
        assert left == []
    assert main(["compress", str(model), "-o", str(out), *ARGS]) == 0
    assert _staging(model.parent) == [] and out.read_bytes() == reference[1]
    assert sorted(p.name for p in model.parent.iterdir()) == ["calib.npz", "m.onnx", "out.onnx"]


def _ignore_sigxfsz() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limit_from_start() -> None:
    _ignore_sigxfsz()
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symshrink: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_file_size_limit_when_saving_exits_2_and_leaves_nothing(job) -> None:
    """RLIMIT_FSIZE lowered when the save starts: writing the staged model fails with EFBIG."""
    model, out, env = job
    digest, before = _digest(model), _listing(model.parent)
    done = _harness("save", "limit", model, out, env, _ignore_sigxfsz, _with_data(ARGS, model.parent / "calib.npz"))
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert f"cannot write {out}" in line and "too large" in line
    assert not out.exists() and _digest(model) == digest and _listing(model.parent) == before


def test_file_size_limit_from_the_start_exits_2_and_leaves_nothing(job) -> None:
    """RLIMIT_FSIZE small for the whole run (preexec_fn): the first file that grows past it fails (a temporary
    session copy of the model, larger than the output): exit 2 and one sentence, nothing left anywhere."""
    model, out, env = job
    digest, before = _digest(model), _listing(model.parent)
    done = _harness("none", "none", model, out, env, _limit_from_start, _with_data(ARGS, model.parent / "calib.npz"))
    assert done.returncode == 2, done.stderr
    assert "too large" in _one_line(done.stderr)
    assert not out.exists() and _digest(model) == digest and _listing(model.parent) == before
    assert _temporaries(Path(env["TMPDIR"])) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 KiB tmpfs (root and mount(8) only: skipped elsewhere), unmounted afterwards."""
    point = tmp_path / "full"
    point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(point)], capture_output=True,
                                 timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs: {err}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


def test_full_disk_exits_2_and_leaves_nothing(small_tmpfs, reference, capsys) -> None:
    model = reference[0]
    digest, out = _digest(model), small_tmpfs / "out.onnx"
    assert len(reference[1]) > 8192  # the output cannot fit
    code = main(["compress", str(model), "-o", str(out), *_with_data(ARGS, model.parent / "calib.npz")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and f"cannot write {out}" in line and "disk is full" in line, line
    assert list(small_tmpfs.iterdir()) == [] and _digest(model) == digest


def test_same_input_and_options_give_the_same_bytes(tmp_path, reference) -> None:
    """Two runs in fresh processes (string hashing seeded differently) write identical files."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "symshrink", "compress", str(reference[0]), "-o", str(tmp_path / f"{seed}.onnx"),
                        *ARGS], cwd=REPO, env={**env, "PYTHONHASHSEED": seed}, check=True, capture_output=True, timeout=180)
    assert (tmp_path / "1.onnx").read_bytes() == (tmp_path / "2.onnx").read_bytes() == reference[1]


def test_one_or_two_threads_give_the_same_bytes(tmp_path, reference) -> None:
    outputs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}.onnx"
        assert main(["compress", str(reference[0]), "-o", str(out), *ARGS, "--threads", threads]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    session = ort.InferenceSession(outputs[0], providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 64), np.float32)})[0].shape == (2, 16)
