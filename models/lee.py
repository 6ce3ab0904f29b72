"""The Lee corpus (Lee, Pincombe & Welsh 2005) as shipped in gensim 4.3.3's test data.

gensim itself is never installed (it would downgrade numpy and scipy): its wheel is downloaded once
with pip into `cache_dir()/wheels`, the three files used here are read out of it with zipfile and
cached under `cache_dir()/data/lee/`.

- `lee.cor`: 50 short news documents (latin-1), the evaluation set;
- `similarities0-1.txt`: 50 x 50 human similarity ratings of those documents (upper triangle used);
- `lee_background.cor`: 300 other news documents, used for calibration and perplexity.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from symshrink.errors import BadInput
from symshrink.models.types import cache_dir

__all__ = ["GENSIM", "lee_files", "lee_documents", "lee_background", "lee_background_text",
           "lee_similarities"]

log = logging.getLogger(__name__)

GENSIM = "gensim==4.3.3"
_MEMBERS = ("lee.cor", "similarities0-1.txt", "lee_background.cor")
_PREFIX = "gensim/test/test_data/"
# gensim 4.3.3 ships binary wheels only up to CPython 3.12; any wheel holds the same test data
_FALLBACK_PLATFORM = ["--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
                      "--implementation", "cp", "--abi", "cp311"]


def _find_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("gensim-4.3.3-*.whl"))
    return wheels[0] if wheels else None


def _pip_download(folder: Path, extra: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", GENSIM,
           "-d", str(folder), *extra]
    log.info("downloading the gensim wheel for the Lee corpus: %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _download_wheel(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for extra in ([], _FALLBACK_PLATFORM):
        result = _pip_download(folder, extra)
        wheel = _find_wheel(folder)
        if wheel is not None:
            return wheel
        log.info("pip download failed (%s): %s", result.returncode, result.stderr.strip()[-500:])
    raise BadInput(
        f"could not download the {GENSIM} wheel that holds the Lee corpus; run "
        f"`python -m pip download --no-deps --only-binary=:all: {GENSIM} -d {folder}` "
        "on a machine with PyPI access"
    )


def _extract(wheel: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member in _MEMBERS:
            data = zf.read(_PREFIX + member)
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{member}.")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target / member)


@functools.lru_cache(maxsize=1)
def lee_files() -> dict[str, Path]:
    """Paths of the three Lee files, downloading and extracting the gensim wheel the first time."""
    target = cache_dir() / "data" / "lee"
    paths = {m: target / m for m in _MEMBERS}
    if all(p.is_file() for p in paths.values()):
        return paths
    wheels = cache_dir() / "wheels"
    wheel = _find_wheel(wheels) or _download_wheel(wheels)
    try:
        _extract(wheel, target)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BadInput(f"{wheel} is not a usable {GENSIM} wheel ({exc}); delete it and retry") from exc
    return paths


def _read_lines(path: Path, encoding: str) -> list[str]:
    return [line.strip() for line in path.read_text(encoding=encoding).splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def lee_documents() -> tuple[str, ...]:
    """The 50 Lee evaluation documents, in the order of the similarity matrix."""
    docs = _read_lines(lee_files()["lee.cor"], "latin-1")
    if len(docs) != 50:
        raise BadInput(f"lee.cor holds {len(docs)} documents, expected 50; delete {cache_dir()}/data/lee")
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def lee_background() -> tuple[str, ...]:
    """The 300 Lee background documents (disjoint from the 50 evaluation documents)."""
    return tuple(_read_lines(lee_files()["lee_background.cor"], "latin-1"))


def lee_background_text() -> str:
    """The whole background corpus as one string (documents joined by newlines)."""
    return lee_files()["lee_background.cor"].read_text(encoding="latin-1")


@functools.lru_cache(maxsize=1)
def lee_similarities() -> np.ndarray:
    """The 50 x 50 human similarity matrix (only the upper triangle is filled in)."""
    sim = np.loadtxt(lee_files()["similarities0-1.txt"], dtype=np.float64)
    if sim.shape != (50, 50):
        raise BadInput(f"similarities0-1.txt has shape {sim.shape}, expected (50, 50)")
    return sim
