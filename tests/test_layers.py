"""Data flows one way: no module imports from a layer above its own, and the methods do not import each other
(the runtime reads stored formats from runtime.formats, never from the passes)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"symshrink": ROOT / "symshrink", "symshrink.passes": ROOT / "passes", "symshrink.runtime": ROOT / "runtime",
           "symshrink.models": ROOT / "models"}
# bottom to top; units of one layer may not import each other
LAYERS = [
    ["symshrink.errors"],
    ["symshrink.extras"],
    ["symshrink.models"],
    ["symshrink.runtime.formats"],
    ["symshrink.runtime"],
    ["symshrink.calibration.stats", "symshrink.passes.protocol"],
    ["symshrink.passes.analysis"],
    ["symshrink.passes.quant"],
    ["symshrink.passes.moment", "symshrink.passes.ternary", "symshrink.passes.hyper"],
    ["symshrink.allocate"],  # chooses among the methods' candidates
    ["symshrink.lazyweights"],  # reads a model's graph without its weights
    ["symshrink.calibration.feeds", "symshrink.modelio", "symshrink.baselines"],
    ["symshrink.options"],
    ["symshrink.rules", "symshrink.report", "symshrink.stream", "symshrink.cluster"],  # stream: runs a model block by block
    ["symshrink.pipeline"],
    ["symshrink.sweep"],  # runs the pipeline at several budgets
    ["symshrink.api", "symshrink.testing", "symshrink.cli"],
    ["symshrink.__main__", "symshrink"],  # the package's __init__ (its lazy API) and `python -m symshrink`
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    return max((u for u in LAYER if module == u or module.startswith(u + ".")), key=len)


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("symshrink"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from symshrink.passes.moment import budget`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("symshrink"))
    return names


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    own = _unit(module)
    for target in _imports(MODULES[module]):
        known = [m for m in (target, target.rsplit(".", 1)[0]) if m in MODULES]
        if not known or known[0] == "symshrink":  # the package itself (its __version__) is loaded first anyway
            continue
        other = _unit(known[0])
        assert other == own or LAYER[other] < LAYER[own], f"{module} ({own}) imports {target} ({other}), a layer above or beside"
