"""The op and kernel code calls, through `xp`, only functions that CuPy has too (checked without a GPU: CuPy
imports on a machine without one). Semantics on the device are the GPU tests' business."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

cupy = pytest.importorskip("cupy")

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
ARRAY_CODE = [RUNTIME / "ops.py", RUNTIME / "kernels" / "hyper.py", RUNTIME / "kernels" / "launch.py"]


def _namespace_calls(path: Path) -> set[str]:
    """Names read from `xp` or `ctx.xp` (xp.einsum, xp.float32...), with dotted submodules (xp.linalg.norm)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        chain, value = [node.attr], node.value
        while isinstance(value, ast.Attribute) and value.attr != "xp":
            chain.insert(0, value.attr)
            value = value.value
        is_xp = (isinstance(value, ast.Name) and value.id == "xp") or (isinstance(value, ast.Attribute) and value.attr == "xp")
        if is_xp:
            names.add(".".join(chain))
    return names


@pytest.mark.parametrize("path", ARRAY_CODE, ids=lambda p: p.name)
def test_every_namespace_function_exists_in_cupy(path):
    names = _namespace_calls(path)
    assert names, "no xp calls found: the scan is broken"
    missing = []
    for name in sorted(names):
        target = cupy
        for part in name.split("."):
            target = getattr(target, part, None)
        if target is None:
            missing.append(name)
    assert not missing, f"{path.name} calls xp functions CuPy lacks: {missing}"
