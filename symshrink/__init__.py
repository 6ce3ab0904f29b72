"""symshrink: a model-compression compiler for ONNX.

Compiler passes find permutation-symmetric groups (FFN hidden units, conv channels, attention heads)
and rewrite them (moment reduction, ternary and hyperfunction codes); models run on stock onnxruntime.
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"


def _check_runtime() -> None:
    # onnxruntime and onnxruntime-gpu both provide the `onnxruntime` module; one of them must be present.
    if importlib.util.find_spec("onnxruntime") is None:
        raise ImportError(
            "symshrink needs onnxruntime: install the [cpu] extra (pip install 'symshrink[cpu]') "
            "or the [gpu] extra (pip install 'symshrink[gpu]')"
        )


_check_runtime()

__all__ = ["compress", "save", "CompressOptions", "CompressReport", "__version__"]
_API = {"compress", "save", "CompressOptions", "CompressReport"}


def __getattr__(name: str):
    # the API pulls in onnxruntime and the passes: only when asked for, so `import symshrink` stays light
    if name in _API:
        from symshrink import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module 'symshrink' has no attribute {name!r}")
