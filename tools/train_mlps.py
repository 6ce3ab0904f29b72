"""Train the two small zoo MLPs with scikit-learn and export them to ONNX with onnx.helper.

    python tools/train_mlps.py [--only fmnist|digits] [--out models/data]

scikit-learn comes with the zoo-data extra (pip install 'symshrink[zoo-data]'), not with the core install.

- `fmnist_mlp.onnx`: 784-512-256-10 ReLU MLP on the full Fashion-MNIST train set (Debian package
  `dataset-fashion-mnist`), pixels scaled to [0, 1]; adam, 35 epochs with a step learning-rate
  schedule (about 2 minutes on 2 cores; test accuracy about 0.899).
- `digits_mlp.onnx`: 64-128-10 ReLU MLP on the calibration half of scikit-learn's `load_digits`.

Graphs: input "input" float32 [batch, in], (MatMul + Add + Relu) per hidden layer, final
MatMul + Add giving "logits" float32 [batch, 10]; opset 17. Seeds are fixed, so a rerun on the same
library versions gives the same weights.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from symshrink.models.fmnist import load_digits_split, load_fmnist

log = logging.getLogger("train_mlps")
SEED = 0
OUT = Path(__file__).resolve().parents[1] / "models" / "data"


def export_mlp(weights: list[np.ndarray], biases: list[np.ndarray], path: Path, doc: str) -> None:
    """Write an MLP (ReLU between layers, none after the last) as an opset-17 ONNX graph."""
    nodes, inits = [], []
    x = "input"
    n_layers = len(weights)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        wn, bn = f"fc{i}.weight", f"fc{i}.bias"
        inits += [numpy_helper.from_array(w.astype(np.float32), wn),
                  numpy_helper.from_array(b.astype(np.float32), bn)]
        mm, add = f"fc{i}/matmul", "logits" if i == n_layers - 1 else f"fc{i}/add"
        nodes.append(helper.make_node("MatMul", [x, wn], [mm], name=f"fc{i}/MatMul"))
        nodes.append(helper.make_node("Add", [mm, bn], [add], name=f"fc{i}/Add"))
        x = add
        if i < n_layers - 1:
            x = f"fc{i}/relu"
            nodes.append(helper.make_node("Relu", [add], [x], name=f"fc{i}/Relu"))
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights[-1].shape[1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="symshrink-train_mlps", doc_string=doc)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def _fit(hidden: tuple[int, ...], x: np.ndarray, y: np.ndarray, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415

    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam", alpha=1e-4,
                        batch_size=256, learning_rate_init=1e-3, max_iter=max_iter, shuffle=True,
                        random_state=SEED, tol=0.0, n_iter_no_change=max_iter, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def _fit_stepped(hidden: tuple[int, ...], x: np.ndarray, y: np.ndarray,
                 schedule: list[tuple[int, float]]):
    """Adam with a step learning-rate schedule [(epochs, rate), ...], one partial_fit per epoch.

    scikit-learn has no schedule for adam, so the rate of its live optimizer (`_optimizer`) is set
    between epochs; the moments carry over."""
    from sklearn.neural_network import MLPClassifier  # noqa: PLC0415

    clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam", alpha=1e-4,
                        batch_size=256, learning_rate_init=schedule[0][1], shuffle=True, random_state=SEED)
    classes = np.unique(y)
    for epochs, rate in schedule:
        if hasattr(clf, "_optimizer"):
            clf._optimizer.learning_rate_init = rate
        for _ in range(epochs):
            clf.partial_fit(x, y, classes=classes)
    return clf


FMNIST_SCHEDULE = [(20, 1e-3), (10, 3e-4), (5, 1e-4)]


def train_fmnist(out: Path) -> None:
    xtr, ytr = load_fmnist("train")
    xte, yte = load_fmnist("test")
    xtr = xtr.reshape(len(xtr), -1).astype(np.float32) / 255.0
    xte = xte.reshape(len(xte), -1).astype(np.float32) / 255.0
    t = time.time()
    clf = _fit_stepped((512, 256), xtr, ytr, FMNIST_SCHEDULE)
    log.info("fmnist: trained %d epochs in %.0f s, sklearn test acc %.4f",
             sum(e for e, _ in FMNIST_SCHEDULE), time.time() - t, clf.score(xte, yte))
    path = out / "fmnist_mlp.onnx"
    export_mlp(clf.coefs_, clf.intercepts_, path,
               f"784-512-256-10 ReLU MLP, Fashion-MNIST train 60k, sklearn MLPClassifier adam, "
               f"(epochs, rate) {FMNIST_SCHEDULE}, seed {SEED}; input pixels/255")
    log.info("fmnist: wrote %s, onnxruntime test acc %.4f", path, _onnx_accuracy(path, xte, yte))


def train_digits(out: Path, epochs: int) -> None:
    xtr, ytr = load_digits_split("calib")
    xte, yte = load_digits_split("eval")
    clf = _fit((128,), xtr, ytr, epochs)
    path = out / "digits_mlp.onnx"
    export_mlp(clf.coefs_, clf.intercepts_, path,
               f"64-128-10 ReLU MLP, sklearn load_digits calib half, {clf.n_iter_} epochs, seed {SEED}; "
               "input pixels/16")
    log.info("digits: wrote %s, onnxruntime eval acc %.4f", path, _onnx_accuracy(path, xte, yte))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["fmnist", "digits"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--digits-epochs", type=int, default=200)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.only in (None, "digits"):
        train_digits(args.out, args.digits_epochs)
    if args.only in (None, "fmnist"):
        train_fmnist(args.out)


if __name__ == "__main__":
    main()
