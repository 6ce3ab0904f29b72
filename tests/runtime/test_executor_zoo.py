"""The executor reproduces onnxruntime on the zoo's real models and real data.

For each model, a few samples of the eval split of its calibration data set (Lee sentences, rendered OCR
words and pages, digits, Fashion-MNIST) run through `Executor` and through an onnxruntime CPU session
(default graph optimisations, 2 threads). Every graph output is compared, pooled over the feeds, by the
relative L2 error ||executor - onnxruntime|| / ||onnxruntime|| (integer outputs must match exactly). Where
an output is a Softmax or Sigmoid, its input (the logits) is compared as well: probabilities saturated at 0
and 1 would hide errors in everything before them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

from symshrink.calibration.feeds import load_feeds
from symshrink.errors import BadInput
from symshrink.models.registry import cache_dir, get_model
from symshrink.runtime.diff import compare_outputs, format_diffs
from symshrink.runtime.executor import Executor
from symshrink.runtime.ort import input_specs, run_all, session_for_model
from tests.runtime.strict_device import strict_backend

pytest.importorskip("onnxruntime")

# Tolerances on the relative L2 error. Both runtimes compute in float32 and differ only in summation order
# (onnxruntime: MLAS blocked GEMM / convolution kernels and fused nodes, Conv+BatchNormalization folded into
# one weight; the executor: numpy BLAS matmuls, one strided slice per kernel offset), so the error is a few
# float32 roundings, amplified with depth. The margins over the measured errors leave room for other CPUs
# (onnxruntime picks AVX2 / AVX-512 kernels at run time, numpy its BLAS).
MLP_RTOL = 1e-5  # 2-3 dense layers: measured 8e-8 (digits-mlp), 2e-7 (fmnist-mlp)
# conv nets and transformers, 20-60 layers deep: measured 4.8e-7 (minilm-l3), 8.5e-7 (minilm-l6),
# 3.0e-6 (ppocr-rec logits), 2.1e-6 (ppocr-cls logits), 1.7e-6 (ppocr-det), 3.3e-6 (mobilenetv2 features)
DEEP_RTOL = 1e-4

slow = pytest.mark.slow  # a real model from the zoo's packages: minutes on a fresh machine
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="exported with torch (pip install 'symshrink[zoo]')")


@dataclass(frozen=True)
class ZooCase:
    model: str
    samples: int  # taken from the eval split of the model's calibration data set
    max_rel_l2: float


CASES = [
    pytest.param(ZooCase("digits-mlp", 64, MLP_RTOL), id="digits-mlp"),
    pytest.param(ZooCase("fmnist-mlp", 64, MLP_RTOL), id="fmnist-mlp"),
    pytest.param(ZooCase("minilm-l3", 3, DEEP_RTOL), id="minilm-l3", marks=slow),  # 3 sentences, batch 1
    pytest.param(ZooCase("ppocr-rec", 24, DEEP_RTOL), id="ppocr-rec", marks=slow),  # batches of 16 and 8 words
    pytest.param(ZooCase("ppocr-cls", 24, DEEP_RTOL), id="ppocr-cls", marks=slow),  # 12 words, upright and rotated
    pytest.param(ZooCase("ppocr-det", 2, DEEP_RTOL), id="ppocr-det", marks=slow),  # 2 pages of 480 x 640
    pytest.param(ZooCase("minilm-l6", 3, DEEP_RTOL), id="minilm-l6", marks=[slow, pytest.mark.zoo, needs_torch]),
    pytest.param(ZooCase("mobilenetv2", 16, DEEP_RTOL), id="mobilenetv2", marks=[slow, pytest.mark.zoo, needs_torch]),
]


def _logits_of_probabilities(model: ir.Model) -> list[ir.Value]:
    """Inputs of the Softmax / Sigmoid nodes behind graph outputs (through Identity nodes)."""
    found = []
    for value in model.graph.outputs:
        producer = value.producer()
        while producer is not None and producer.op_type == "Identity":
            producer = producer.inputs[0].producer()
        if producer is not None and producer.op_type in ("Softmax", "Sigmoid"):
            found.append(producer.inputs[0])
    return found


def _feeds(case: ZooCase, session) -> list[dict[str, np.ndarray]]:
    """Real feeds; a single batch (the MLPs' and MobileNet's data sets batch by 256) is halved, so that every
    model runs at least two feeds."""
    try:
        feeds = load_feeds(get_model(case.model).calib, input_specs(session), "eval", case.samples)
    except BadInput as err:  # a data set's Debian package (Fashion-MNIST, DejaVu fonts) is not installed
        pytest.skip(str(err))
    if len(feeds) == 1:
        half = len(next(iter(feeds[0].values()))) // 2
        feeds = [{k: v[:half] for k, v in feeds[0].items()}, {k: v[half:] for k, v in feeds[0].items()}]
    return feeds


@pytest.mark.parametrize("case", CASES)
def test_executor_matches_onnxruntime(case: ZooCase):
    model = ir.load(get_model(case.model).materialise(cache_dir()))
    model.graph.outputs.extend(_logits_of_probabilities(model))
    session = session_for_model(model, threads=2)
    feeds = _feeds(case, session)
    names = [v.name for v in model.graph.outputs]
    reference = run_all(session, feeds, names)
    executor = Executor(model)
    diffs = compare_outputs(reference, [executor.run(feed) for feed in feeds])
    assert [d.name for d in diffs] == names
    worst = max(d.rel_l2 for d in diffs)
    assert worst <= case.max_rel_l2, f"{case.model}: relative L2 error {worst:.3g} > {case.max_rel_l2:g}\n" \
                                     + format_diffs(diffs)


@pytest.mark.parametrize("case", [c for c in CASES if not any(m.name == "zoo" for m in c.marks)])
def test_placement_on_a_strict_stand_in_device(case: ZooCase):
    """With `strict_device` standing in for CuPy (mixing host and device arrays raises, as CuPy does), the
    executor gives the CPU backend's outputs bit for bit, and copies nothing back to the host but the outputs:
    shape arithmetic never waits on the device."""
    model = ir.load(get_model(case.model).materialise(cache_dir()))
    feeds = _feeds(case, session_for_model(model, threads=2))[:2]
    backend = strict_backend()
    on_device, on_cpu = Executor(model, backend), Executor(model)
    for feed in feeds:
        before = backend.xp.downloads
        outputs = on_device.run(feed)
        assert backend.xp.downloads - before == len(outputs)
        for name, expected in on_cpu.run(feed).items():
            np.testing.assert_array_equal(outputs[name], expected)
