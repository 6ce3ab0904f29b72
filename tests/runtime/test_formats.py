"""The table of stored formats: every row's round trip within its named budget, its bytes as predicted, its
decode deterministic (llama.cpp's test-quantize-fns is the model); every format the passes write has a row;
the runtime imports nothing from the passes."""

import ast
import copy
from pathlib import Path

import numpy as np
import pytest

from symshrink.passes.hyper import function as hyper_function
from symshrink.passes.ternary import function as ternary_function
from symshrink.passes.ternary.codes import STORAGES
from symshrink.runtime.formats import FORMATS, FUNCTION_DOMAIN, HYPER_INPUTS, TERNARY_INPUTS, relative_error
from symshrink.runtime.kernels import KERNELS
from symshrink.runtime.ops import OPS

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(64, 32), (130, 24), (96, 48)]  # whole blocks, a ragged last block, per-column sizes that differ
CASES = [(name, index) for name, row in FORMATS.items() for index in range(len(row.settings))]


def _stored_inputs(row) -> tuple[str, ...]:
    """The names of the inputs the row's node reads from the stored arrays, in order."""
    if row.op_type == "DequantizeLinear":
        return ("q", "scale", "zero_point")
    return HYPER_INPUTS[row.op_type] if row.op_type in HYPER_INPUTS else TERNARY_INPUTS[1:]


@pytest.mark.parametrize("name, index", CASES, ids=[f"{name}-{i}" for name, i in CASES])
def test_round_trip_within_budget_bytes_as_predicted_and_decode_deterministic(name, index):
    row = FORMATS[name]
    settings = row.settings[index]
    for seed, shape in enumerate(SHAPES):
        weight = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
        stored = row.encode(weight, **settings)
        assert tuple(stored.arrays) == _stored_inputs(row)
        decoded = row.decode(stored)
        assert decoded.dtype == np.float32 and decoded.shape == weight.shape
        error = relative_error(weight, decoded)
        assert error <= row.budget.relative_error, f"{name} {settings} {shape}: {error:.4f} over {row.budget.name}"
        predicted = row.predict_bytes(shape, **settings)
        assert stored.nbytes(row.shared) == predicted
        assert row.bits_per_weight(shape, **settings) * weight.size / 8 == pytest.approx(predicted, rel=1e-12)
        again = row.decode(copy.deepcopy(stored))
        assert again.tobytes() == decoded.tobytes()
        recoded = row.encode(weight.copy(), **settings)
        assert all(recoded.arrays[k].tobytes() == a.tobytes() for k, a in stored.arrays.items())


def test_every_format_the_passes_write_has_a_row():
    for storage, radix in STORAGES.items():
        row = FORMATS[f"ternary-{storage}"]
        if radix is None:
            assert (row.domain, row.op_type) == ("", "DequantizeLinear")
        else:
            assert (row.domain, row.op_type) == (ternary_function.DOMAIN, ternary_function.function_name(radix))
    assert FORMATS["uint8-dequantize"].op_type == "DequantizeLinear"  # the 8-bit fallback of any storage
    hyper_rows = {(row.domain, row.op_type) for row in FORMATS.values()}
    for grouped in (False, True):
        assert (hyper_function.DOMAIN, hyper_function.function_name(grouped)) in hyper_rows
    for row in FORMATS.values():
        assert set(row.kernels) <= set(KERNELS), row.name
        assert row.op_type in OPS if row.domain == "" else row.domain == FUNCTION_DOMAIN
        assert row.budget.relative_error > 0 and row.settings


def test_runtime_imports_nothing_from_the_passes():
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n.split(".")[:2] == ["symshrink", "passes"] or n.split(".")[0] == "passes"]
    assert not offenders
