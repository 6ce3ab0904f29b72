"""The hostile-input corpus (make_corpus.py) against the contract: exit 2 and one line on stderr for bad input (never
a traceback, never exit 3), the inputs unchanged, nothing left beside them but a successful run's output, and the
same request through the Python API raising BadInput, nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from symshrink.api import compress, save
from symshrink.cli import main
from symshrink.errors import BadInput
from tests.hostile.make_corpus import WIDTH, Case, make_corpus

REPO = Path(__file__).resolve().parents[2]
CASES = {case.name: case for case in make_corpus(None)}



@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    assert [case.name for case in make_corpus(root)] == list(CASES)
    return root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, hidden ones included: a file's digest, a folder, a symlink's target, or the kind
    of a special file (never opened: a FIFO would block)."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        mode = path.lstat().st_mode
        rel = path.relative_to(folder).as_posix()
        if stat.S_ISLNK(mode):
            entries[rel] = f"symlink -> {os.readlink(path)}"
        elif stat.S_ISDIR(mode):
            entries[rel] = "folder"
        elif stat.S_ISREG(mode):
            entries[rel] = _digest(path)
        else:
            entries[rel] = f"special {stat.S_IFMT(mode)}"
    return entries


def _run(case: Case, folder: Path, capsys) -> tuple[int, str, str]:
    """The CLI in this process (capsys), or in a child process for inputs a reader could block on."""
    if case.subprocess:
        done = subprocess.run([sys.executable, "-m", "symshrink", *case.argv], cwd=folder, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        return done.returncode, done.stdout, done.stderr
    code = main(list(case.argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _graphs(sub)


def _random_feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """One run of random inputs as the model declares them (open dimensions 2; an open rank: [2, 64])."""
    kinds = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    rng = np.random.default_rng(0)
    feed = {}
    for value in model.graph.input:
        tensor = value.type.tensor_type
        shape = [d.dim_value or 2 for d in tensor.shape.dim] if tensor.HasField("shape") else [2, WIDTH]
        feed[value.name] = rng.standard_normal(shape).astype(kinds[tensor.elem_type])
    return feed


def _check_output(case: Case, folder: Path) -> None:
    """The output of a successful run: a model onnxruntime runs, holding the ops the case keeps (with subgraphs)."""
    out = onnx.load(folder / case.output)
    ops = {node.op_type for graph in _graphs(out.graph) for node in graph.node}
    assert set(case.keeps) <= ops, f"{case.keeps} not all kept: {sorted(ops)}"
    source = onnx.load(folder / case.argv[1])
    for node in source.graph.node:  # each control-flow node keeps its subgraphs, each with a MatMul
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            (kept,) = [n for n in out.graph.node if n.name == node.name]
            assert sorted(a.name for a in kept.attribute) == sorted(a.name for a in node.attribute)
            for attribute in (a for a in kept.attribute if a.HasField("g")):
                assert "MatMul" in {n.op_type for n in attribute.g.node}, attribute.name
    session = ort.InferenceSession(str(folder / case.output), providers=["CPUExecutionProvider"])
    outputs = session.run(None, _random_feed(out))
    assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")


def _reasons(report: dict) -> str:
    """What a report says about the sites it left alone (not the paths in it)."""
    return json.dumps([report["passed_over"], report["skipped_groups"]])


def _api(case: Case) -> None:
    """The same request through the Python API: BadInput with one line for a refused case, a report otherwise."""
    api = case.api
    if api.call == "save":
        with pytest.raises(BadInput) as info:
            save(onnx.load(api.model), api.path, inputs=list(api.inputs), **api.kwargs)
    elif case.code == 0:
        proto, report = compress(api.model, api.calibration, **api.kwargs)
        assert isinstance(proto, onnx.ModelProto) and report.passed, report.failures
        if case.expect == "skip-with-reason":
            assert case.phrase in _reasons(report.to_dict())
        return
    else:
        with pytest.raises(BadInput) as info:
            compress(api.model, api.calibration, **api.kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    assert (api.phrase or case.phrase) in message


@pytest.mark.parametrize("name", list(CASES))
def test_case(name: str, corpus: Path, capsys, monkeypatch) -> None:
    case = CASES[name]
    folder = corpus / name
    before = _snapshot(folder)
    outside = {rel: _digest(corpus / rel) for rel in case.outside}
    monkeypatch.chdir(folder)
    code, out, err = _run(case, folder, capsys)

    assert code == case.code, err
    assert "Traceback" not in err
    if code != 0:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("symshrink: error: "), err
        assert case.phrase in lines[0], lines[0]
    else:
        assert all(line.startswith("WARNING: ") for line in err.splitlines()), err
        if case.expect == "skip-with-reason":
            assert case.phrase in _reasons(json.loads(out)), out
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k in before} == before  # every input as it was, none removed
    assert sorted(set(after) - set(before)) == ([case.output] if code == 0 and case.output else [])
    assert {rel: _digest(corpus / rel) for rel in case.outside} == outside
    if code == 0 and case.output:
        _check_output(case, folder)

    if case.api is not None:
        _api(case)
        assert _snapshot(folder) == after


def test_the_corpus_is_the_issue_list() -> None:
    """At least 40 cases, every input file small, every outcome one of the three."""
    assert len(CASES) >= 40
    assert {case.expect for case in CASES.values()} == {"exit 2", "skip-with-reason", "ok"}
    assert all(case.code in (0, 2) and (case.code == 0) == (case.output is not None) for case in CASES.values())


def test_corpus_files_are_small(corpus: Path) -> None:
    sizes = {p.relative_to(corpus).as_posix(): p.stat().st_size for p in corpus.rglob("*")
             if p.is_file() and not p.is_symlink() and p.name != "out.onnx"}
    assert max(sizes.values()) <= 64 * 1024, max(sizes.items(), key=lambda kv: kv[1])


def test_the_reliability_page_lists_every_case_and_fault_test() -> None:
    """docs/reliability.md has a row for each case and names each fault test."""
    page = (REPO / "docs" / "reliability.md").read_text()
    assert [name for name in CASES if f"| {name} |" not in page] == []
    faults = (Path(__file__).parent / "test_faults.py").read_text()
    tests = [line.split("(")[0].removeprefix("def ") for line in faults.splitlines() if line.startswith("def test_")]
    assert len(tests) == 7 and [test for test in tests if test not in page] == []
