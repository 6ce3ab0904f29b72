"""Tests of the vision zoo members: committed MLPs, their data sets, PP-OCR and MobileNetV2 export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from symshrink.errors import BadInput
from symshrink.models import fmnist, ocr, vision
from symshrink.models.types import InputSpec

ort = pytest.importorskip("onnxruntime")


def _has_fmnist() -> bool:
    try:
        fmnist.fmnist_dir()
    except BadInput:
        return False
    return True


def _has_fonts() -> bool:
    try:
        ocr.font_dir()
    except BadInput:
        return False
    return True


needs_fmnist = pytest.mark.skipif(not _has_fmnist(), reason="Debian package dataset-fashion-mnist not installed")
needs_fonts = pytest.mark.skipif(not _has_fonts(), reason="Debian package fonts-dejavu-core not installed")


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _model(name: str):
    return {m.name: m for m in vision.MODELS}[name]


def test_lists_are_consistent():
    names = {d.name for d in vision.DATASETS}
    tasks = {t.name for t in vision.TASKS}
    for m in vision.MODELS:
        assert m.calib in names, m.name
        assert m.task in tasks, m.name


def test_fmnist_mlp_shape(tmp_path):
    path = _model("fmnist-mlp").materialise(tmp_path)
    assert path.is_file() and path.parent.parent == tmp_path
    model = onnx.load(path)
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    shapes = sorted(tuple(t.dims) for t in model.graph.initializer)
    assert shapes == sorted([(784, 512), (512,), (512, 256), (256,), (256, 10), (10,)])
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Relu"] * 2 + ["MatMul", "Add"]


@needs_fmnist
def test_fmnist_mlp_accuracy(tmp_path):
    sess = _session(_model("fmnist-mlp").materialise(tmp_path))
    assert vision.fmnist_accuracy(sess) >= 0.88


def test_digits_mlp_accuracy(tmp_path):
    pytest.importorskip("sklearn")
    sess = _session(_model("digits-mlp").materialise(tmp_path))
    assert vision.digits_accuracy(sess) >= 0.9


@needs_fmnist
def test_fmnist_feeds_and_splits():
    spec = [InputSpec("input", "float32", ("batch", 784))]
    calib = vision.DATASETS[0].load(spec, "calib", 300)
    assert [f["input"].shape for f in calib] == [(256, 784), (44, 784)]
    assert calib[0]["input"].dtype == np.float32 and 0 <= calib[0]["input"].min() <= calib[0]["input"].max() <= 1
    ev = vision.DATASETS[0].load(spec, "eval", 10)
    # calib samples come from the train file, eval from the test file: check no image is in both
    train_rows = {r.tobytes() for f in calib for r in f["input"]}
    assert not any(r.tobytes() in train_rows for r in ev[0]["input"])
    img = vision.DATASETS[0].load([InputSpec("x", "float32", (None, 3, 64, 64))], "calib", 2)
    assert img[0]["x"].shape == (2, 3, 64, 64)


def test_digits_splits_disjoint():
    pytest.importorskip("sklearn")
    xc, _ = fmnist.load_digits_split("calib")
    xe, _ = fmnist.load_digits_split("eval")
    assert len(xc) + len(xe) == 1797
    rows = {r.tobytes() for r in xc}
    # digits holds a few duplicate images; the index split must still be disjoint and near-complete
    assert sum(r.tobytes() in rows for r in xe) < 10


def test_ocr_words_disjoint():
    calib, ev = ocr.words("calib"), ocr.words("eval")
    assert len(ev) == 200 and len(calib) >= 200
    assert not set(calib) & set(ev)


@pytest.mark.parametrize("inputs", [
    [],
    [InputSpec("a", "float32", ("b", 784)), InputSpec("b", "float32", ("b", 784))],
    [InputSpec("input", "int64", ("b", 784))],
    [InputSpec("input", "float32", ("b", 100))],
])
def test_bad_input_spec(inputs):
    for name in ("fmnist", "digits"):
        ds = {d.name: d for d in vision.DATASETS}[name]
        with pytest.raises(BadInput):
            ds.load(inputs, "calib", 4)


def test_bad_input_spec_ocr():
    ds = {d.name: d for d in vision.DATASETS}
    with pytest.raises(BadInput):
        ds["ocr-words"].load([InputSpec("x", "float32", ("b", 784))], "calib", 4)
    with pytest.raises(BadInput):
        ds["ocr-words"].load([InputSpec("x", "float32", ("b", 3, 32, "w"))], "calib", 4)
    with pytest.raises(BadInput):
        ds["fmnist"].load([InputSpec("x", "float32", ("b", 784))], "train", 4)


@needs_fonts
@pytest.mark.slow
def test_ppocr_rec_exact_match(tmp_path):
    path = _model("ppocr-rec").materialise(tmp_path)
    sess = _session(path)
    assert ocr.rec_exact_match(sess, n=64) >= 0.95
    feeds = {d.name: d for d in vision.DATASETS}["ocr-words"].load(
        [InputSpec("x", "float32", ("b", 3, 48, "w"))], "calib", 20)
    assert sum(len(f["x"]) for f in feeds) == 20 and all(f["x"].shape[2] == 48 for f in feeds)


@needs_fonts
@pytest.mark.slow
def test_ppocr_cls_accuracy(tmp_path):
    sess = _session(_model("ppocr-cls").materialise(tmp_path))
    assert ocr.cls_accuracy(sess, n=64) >= 0.95


@needs_fonts
@pytest.mark.slow
def test_ppocr_det_f1(tmp_path):
    sess = _session(_model("ppocr-det").materialise(tmp_path))
    assert ocr.det_f1(sess, n=3) >= 0.6


@pytest.mark.zoo
@needs_fmnist
@pytest.mark.slow
def test_mobilenetv2_export(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    try:
        vision._mobilenet_weights()
    except BadInput as e:
        pytest.skip(str(e))
    path = vision.mobilenet_onnx(tmp_path)
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits", "features"]
    x = vision.fmnist_images("test", np.arange(4), vision.MOBILENET_SIZE)
    logits, feats = sess.run(None, {"input": x})
    assert logits.shape == (4, 1000) and feats.shape == (4, 1280)


def _probe_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, 600)
    x = rng.standard_normal((600, 20))
    x[:, 0] += 4.0 * y  # the class shows in one feature, on a scale of 1e3 to test the standardising
    x[:, 0] *= 1e3
    x[:, 1] = 7.0  # a constant feature is left as it is
    return x[:400], y[:400], x[400:], y[400:]


def test_logistic_probe_separates_and_standardises():
    data = _probe_data()
    assert vision.logistic_probe(*data, c=1.0) > 0.9  # classes 4 sigma apart: about 0.95 at best
    # a strong ridge (tiny C) pulls the weights to zero: the intercepts alone give the majority class
    assert vision.logistic_probe(*data, c=1e-9) < 0.5


def test_logistic_probe_matches_scikit_learn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    x_train, y_train, x_test, y_test = _probe_data(1)
    x_train[:, 2:] += 0.3 * y_train[:, None]  # a weak signal everywhere: the ridge matters
    x_test[:, 2:] += 0.3 * y_test[:, None]
    for c in (vision.PROBE_C, 0.1):
        scaler = preprocessing.StandardScaler().fit(x_train)
        clf = linear_model.LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x_train), y_train)
        want = clf.score(scaler.transform(x_test), y_test)
        assert vision.logistic_probe(x_train, y_train, x_test, y_test, c=c) == pytest.approx(want, abs=0.01)


@needs_fonts
def test_rendered_words_and_pages_fit_the_ocr_formats():
    img = ocr.render_text("symshrink", font=1, size=28)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.min() < 128 < img.max()
    rec = ocr.rec_batch([img, ocr.render_text("a")])
    assert rec.shape[:3] == (2, 3, ocr.REC_HEIGHT) and rec.shape[3] >= ocr.REC_MIN_WIDTH
    assert -1.0 <= rec.min() and rec.max() <= 1.0
    assert ocr.cls_batch([img]).shape == (1, 3, *ocr.CLS_SHAPE)
    (page, boxes), = ocr.det_pages("eval", 1)
    assert page.shape == (*ocr.PAGE_SHAPE, 3) and len(boxes) > 0
    h, w = ocr.PAGE_SHAPE
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
